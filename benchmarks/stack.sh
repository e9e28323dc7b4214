# Sourced by the benchmark scripts: the real stack on $LOREC_DATA_DIR, stopped when the script exits.
#   start_redis LOG                  redis-server for $LOREC_REDIS_URL (AOF), unless one answers already
#   start_engine PORT LOG            `lorec engine` on PORT, returns once /health answers
#   gateway_restart LOG [VAR=value ...]  (re)starts `lorec serve` on $LOREC_PORT with extra environment,
#                                    returns once /readyz answers
LOREC=.venv/bin/lorec
pids=()
gateway=
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

start_redis() {
  redis-cli -u "$LOREC_REDIS_URL" ping >/dev/null 2>&1 && return 0
  mkdir -p "$LOREC_DATA_DIR/redis"
  local port
  port=$(echo "$LOREC_REDIS_URL" | sed -E 's#.*:([0-9]+)/.*#\1#')
  redis-server --port "$port" --bind 127.0.0.1 --dir "$(realpath "$LOREC_DATA_DIR/redis")" \
    --appendonly yes --appendfsync everysec --save "" >"$1" 2>&1 &
  pids+=($!)
  until redis-cli -u "$LOREC_REDIS_URL" ping >/dev/null 2>&1; do sleep 0.5; done
}

start_engine() {
  $LOREC engine --port "$1" >"$2" 2>&1 & pids+=($!)
  until curl -fs "http://127.0.0.1:$1/health" >/dev/null; do sleep 5; done
}

gateway_restart() {
  local log=$1; shift
  [ -z "$gateway" ] || { kill "$gateway"; wait "$gateway" 2>/dev/null || true; }
  env "$@" $LOREC serve >>"$log" 2>&1 & gateway=$!; pids+=($gateway)
  until curl -fs "http://127.0.0.1:$LOREC_PORT/readyz" >/dev/null; do sleep 2; done
}

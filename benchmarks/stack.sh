# Sourced by the run_*.sh scripts: the data folder and Redis of one dataset, the gateway's port
# (LOREC_PORT, default 8000) and the engine's (ENGINE_PORT, default 8100; either may be set before
# sourcing), and `up LOG COMMAND...`, which starts a process of the stack (`lorec stack`,
# service/stack.py) in the background, waits for its "ready" line and stops it when the script exits.
export LOREC_DATA_DIR=${LOREC_DATA_DIR:-var} LOREC_REDIS_URL=${LOREC_REDIS_URL:-redis://127.0.0.1:6399/0}
PORT=${LOREC_PORT:-8000}; ENGINE_PORT=${ENGINE_PORT:-8100}
export LOREC_PORT=$PORT LOREC_ENGINE_URL=http://127.0.0.1:$ENGINE_PORT
pids=(); trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
up() { local log=$1; shift; : >"$log"; "$@" >>"$log" 2>&1 & pids+=($!); until grep -qs "^ready" "$log"; do
  kill -0 "$!" 2>/dev/null || { tail -20 "$log" >&2; exit 1; }; sleep 1; done; }
LOREC=.venv/bin/lorec; mkdir -p "$LOREC_DATA_DIR/logs"

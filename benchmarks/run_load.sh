#!/usr/bin/env bash
# Locust load test against the real stack, stats into benchmarks/results/locust-u<USERS>_*.csv.
#
#   bash benchmarks/run_load.sh [USERS] [DURATION] [RETRIEVAL]      # e.g. 4 3m subr
#
# Starts redis-server, the vLLM engine and the gateway on $LOREC_DATA_DIR (default var/, ML-100K
# ingested when needed), runs tests/load/locustfile.py headless for DURATION with USERS simulated
# backends (mostly /v1/rank with 20 candidates, some /v1/ctr and /v1/events), then stops everything.
# RETRIEVAL sets the gateway's LOREC_RETRIEVAL_MODE (subr, recent or slate).
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-4}; DURATION=${2:-3m}; RETRIEVAL=${3:-subr}
export LOREC_PORT=${LOREC_PORT:-8010} LOREC_RETRIEVAL_MODE=$RETRIEVAL; ENGINE_PORT=${ENGINE_PORT:-8110}
[ -x .venv/bin/locust ] || { echo "locust missing: .venv/bin/pip install -e '.[bench]'" >&2; exit 1; }
source benchmarks/stack.sh
up "$LOREC_DATA_DIR/logs/stack-load.log" $LOREC stack --redis --engine-port "$ENGINE_PORT"
$LOREC ingest movielens --dir "${LOREC_DATA:-../shared/data/ml-100k}"
up "$LOREC_DATA_DIR/logs/gateway-load.log" $LOREC stack --gateway-port "$LOREC_PORT"
export LOREC_API_KEY=${LOREC_API_KEY:-$(.venv/bin/python -c "
from service.auth import client_key; from service.config import Settings; print(client_key(Settings(), 'write'))")}
# Warm-up so the first measured requests do not pay for adapter loading and kernel start-up.
curl -fs -X POST "http://127.0.0.1:$LOREC_PORT/v1/rank" -H "authorization: Bearer $LOREC_API_KEY" \
  -H 'content-type: application/json' -d '{"user_id": "1", "item_ids": ["1", "2", "3"]}' >/dev/null
.venv/bin/locust -f tests/load/locustfile.py --headless -u "$USERS" -r "$USERS" -t "$DURATION" \
  --host "http://127.0.0.1:$LOREC_PORT" --csv "benchmarks/results/locust-u$USERS-$RETRIEVAL" --only-summary

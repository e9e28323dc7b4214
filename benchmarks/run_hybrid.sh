#!/usr/bin/env bash
# The served hybrid of one dataset, fitted and measured through the real serving path, into
# benchmarks/results/quality.json (then: .venv/bin/python benchmarks/report.py):
#
#   bash benchmarks/run_hybrid.sh ../shared/data/ml-100k ADAPTER CRM [FIT_N] [EVAL_N] [METHOD]
#
# On the store of $LOREC_DATA_DIR (ingested, the adapter ADAPTER in its registry, the CRM CRM under
# $LOREC_DATA_DIR/crm): starts redis-server and the engine, a gateway serving ADAPTER (shared) and CRM,
# (LOREC_ADAPTER_MODE=personal or cohort: ADAPTER names the RecLoRA bank under $LOREC_DATA_DIR/reclora),
# fits the combiner on FIT_N (default 2000) seeded validation samples scored through it, restarts the
# gateway with the combiner (the hybrid is then its default), and evaluates EVAL_N (default 10000; ML-100K:
# the whole test split; 0: fit only, the validation figures are in the combiner's manifest) seeded test samples once, each at its own as_of: the served hybrid and both
# components on the same samples, the cold slices and the gain over the CRM (METHOD, default hybrid).
# The CRM alone is also scored offline on the same samples (row crm-gbdt, with its validation figures).
# Each gateway pass keeps a journal under $LOREC_DATA_DIR/eval: re-running after a cut goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?MovieLens folder}; ADAPTER=${2:?adapter name}; CRM=${3:?CRM name}
FIT_N=${4:-2000}; EVAL_N=${5:-10000}; METHOD=${6:-hybrid}
source benchmarks/stack.sh
MODE=${LOREC_ADAPTER_MODE:-shared}; export LOREC_CRM=$CRM LOREC_ADAPTER_MODE=$MODE
case $MODE in
  personal|cohort) export LOREC_RECLORA_BANK=$ADAPTER; SERVED="LOREC_ADAPTER_MODE=$MODE LOREC_RECLORA_BANK=$ADAPTER" ;;
  *) export LOREC_DEFAULT_ADAPTER=$ADAPTER; SERVED="LOREC_DEFAULT_ADAPTER=$ADAPTER" ;;
esac
GATEWAY="http://127.0.0.1:$PORT"
up "$LOREC_DATA_DIR/logs/stack-hybrid.log" $LOREC stack --redis --engine-port "$ENGINE_PORT"
up "$LOREC_DATA_DIR/logs/gateway-fit.log" env LOREC_COMBINER= $LOREC stack --gateway-port "$PORT"
COMBINER=$($LOREC train combiner --dir "$DATA" --gateway "$GATEWAY" --n "$FIT_N" \
  --journal-dir "$LOREC_DATA_DIR/eval" | tail -1 | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['combiner'])")
echo "combiner: $COMBINER" >&2
[ "$EVAL_N" -gt 0 ] || exit 0
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
up "$LOREC_DATA_DIR/logs/gateway-hybrid.log" env LOREC_COMBINER="$COMBINER" $LOREC stack --gateway-port "$PORT"
$LOREC eval --dir "$DATA" --gateway "$GATEWAY" --mode "$MODE" --scorer hybrid --n "$EVAL_N" --offline-n 1000 \
  --journal-dir "$LOREC_DATA_DIR/eval" --method "$METHOD"
$LOREC eval --dir "$DATA" --crm --n "$EVAL_N" --method crm-gbdt
echo "$SERVED LOREC_CRM=$CRM LOREC_COMBINER=$COMBINER" >&2

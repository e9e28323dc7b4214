#!/usr/bin/env bash
# Evaluations of already trained adapters through the real serving path (no training), into
# benchmarks/results/quality.json:
#
#   bash benchmarks/run_study.sh ../shared/data/ml-100k ADAPTER BANK [N]
#
# - retrieval study (issue 5): the ReiT adapter ADAPTER scoring slates (one user's consecutive test
#   samples, 20 per request at the earliest one's as_of; N / 20 seeded slates) with `subr`, `recent`
#   and `slate` history (methods reit-n256-slates-<retrieval>): same requests, only the history differs;
# - RecLoRA (issue 4): the bank BANK in personal mode with the adapter refreshed at every event
#   (LOREC_PERSONAL_REFRESH_EVENTS=1, the offline reference's exact-history gating) and its cohorts
#   (COHORTS, default "8 128"; 32 is in run_quality.sh's rows).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?MovieLens folder}; ADAPTER=${2:?ReiT adapter name}; BANK=${3:?RecLoRA bank name}; N=${4:-500}
source benchmarks/stack.sh
up "$LOREC_DATA_DIR/logs/stack-study.log" $LOREC stack --redis --engine-port "$ENGINE_PORT"
gateway=
start_gateway() {  # (re)starts the gateway with extra environment, e.g. LOREC_COHORTS=8
  [ -z "$gateway" ] || { kill "$gateway"; wait "$gateway" 2>/dev/null || true; }
  up "$LOREC_DATA_DIR/logs/gateway-study.log" env "$@" $LOREC stack --gateway-port "$PORT"; gateway=${pids[-1]}; }
evaluate() { $LOREC eval --dir "$DATA" --gateway "http://127.0.0.1:$PORT" --n "$N" ${EVAL_ARGS:-} "$@" || true; }
start_gateway
for retrieval in ${RETRIEVALS:-subr recent slate}; do
  evaluate --adapter "$ADAPTER" --retrieval "$retrieval" --slate-size 20 --method "${METHOD:-reit-n256}-slates-$retrieval"
done
export LOREC_RECLORA_BANK=$BANK
start_gateway LOREC_PERSONAL_REFRESH_EVENTS=1
evaluate --mode personal --method reclora-personal-refresh1 --offline-dtype float32
for c in ${COHORTS:-8 128}; do
  start_gateway LOREC_COHORTS=$c
  evaluate --mode cohort --method "reclora-cohort-$c" --no-offline
done

#!/usr/bin/env bash
# Quality runs for one MovieLens folder through the real serving path, results into
# benchmarks/results/quality.json (then: .venv/bin/python benchmarks/report.py).
#
#   bash benchmarks/run_quality.sh ../shared/data/ml-100k [EVAL_N] [LORA_EVAL_N] [N_TRAIN...]
#
# Starts redis-server on the data folder $LOREC_DATA_DIR (default var/), ingests when needed (one data
# folder and Redis per dataset: ingest refuses a second dataset in a store that holds one), trains
# a ReiT LoRA on N few-shot samples for each N, then starts the vLLM engine and the gateway and
# evaluates: zero-shot, then each adapter (SKIP_ZERO_SHOT=1 skips the zero-shot run;
# TRAIN_ARGS replaces the trainer's options, default "--n-valid 500 --eval-every 32"; EVAL_ARGS adds
# eval options, e.g. "--offline-dtype float32", or "--offline-n 1000" to check a seeded 1,000 of a
# 10,000-sample evaluation offline instead of all of them; a recipe variant, e.g. TRAIN_ARGS="... --rank 32
# --alpha 64", is its own run and adapter, METHOD_SUFFIX="-r32" names its rows reit-nN-r32).
# RECLORA_N="256 ..." also trains the CRM when missing and a RecLoRA bank per N, restarts the gateway
# on it and evaluates mode personal and the cohorts
# (SKIP_REIT=1 skips the ReiT runs; COHORTS="8 32 128" the cohort sizes evaluated; RECLORA_ARGS replaces
# TRAIN_ARGS for the bank). EVAL_N defaults to 10000 (the issue's minimum seeded slice);
# LoRA evaluation has its own size (LORA_EVAL_N).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?MovieLens folder}; EVAL_N=${2:-10000}; LORA_EVAL_N=${3:-$EVAL_N}; shift $(( $# < 3 ? $# : 3 ))
N_TRAIN=("${@:-256 1024 4096}")
source benchmarks/stack.sh
up "$LOREC_DATA_DIR/logs/stack-redis.log" $LOREC stack --redis
$LOREC ingest movielens --dir "$DATA"
json_field() { .venv/bin/python -c "import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])['$1'])"; }
# Training first, the engine after: an idle vLLM engine polls and takes ~20% of a core from training.
reit=() banks=()
[ -n "${SKIP_REIT:-}" ] || for n in ${N_TRAIN[@]}; do
  reit+=("$n:$($LOREC train reit --dir "$DATA" --n "$n" ${TRAIN_ARGS:---n-valid 500 --eval-every 32} | json_field adapter)")
done
for n in ${RECLORA_N:-}; do
  ls "$LOREC_DATA_DIR"/crm/*-din.pt >/dev/null 2>&1 || $LOREC train crm --dir "$DATA"
  banks+=("$($LOREC train reclora --dir "$DATA" --n "$n" ${RECLORA_ARGS:-${TRAIN_ARGS:---n-valid 500 --eval-every 32}} \
    | json_field bank)")
done
up "$LOREC_DATA_DIR/logs/stack-engine.log" $LOREC stack --engine-port "$ENGINE_PORT"
gateway=
start_gateway() {  # (re)starts the gateway with extra environment, e.g. LOREC_RECLORA_BANK=...
  [ -z "$gateway" ] || { kill "$gateway"; wait "$gateway" 2>/dev/null || true; }
  up "$LOREC_DATA_DIR/logs/gateway-quality.log" env "$@" $LOREC stack --gateway-port "$PORT"; gateway=${pids[-1]}; }
# Each evaluation keeps a journal of its gateway scores: re-running the script after a cut goes on where it stopped.
evaluate() { $LOREC eval --dir "$DATA" --gateway "http://127.0.0.1:$PORT" --journal-dir "$LOREC_DATA_DIR/eval" \
  ${EVAL_ARGS:-} "$@" || true; }
start_gateway
# An eval whose gateway and offline scores disagree is still recorded (with where they differ): go on.
[ -n "${SKIP_ZERO_SHOT:-}" ] || evaluate --adapter base --n "$EVAL_N" --method zero-shot
for run in "${reit[@]}"; do
  evaluate --adapter "${run#*:}" --n "$LORA_EVAL_N" --method "reit-n${run%%:*}${METHOD_SUFFIX:-}"
done
for bank in "${banks[@]}"; do
  export LOREC_RECLORA_BANK="$bank"  # the gateway serves it, the evaluation reads it for the offline reference
  start_gateway
  evaluate --mode personal --n "$LORA_EVAL_N" --method "reclora-personal"
  for c in ${COHORTS:-8 32 128}; do
    start_gateway LOREC_COHORTS=$c
    evaluate --mode cohort --n "$LORA_EVAL_N" --method "reclora-cohort-$c"
  done
done

#!/usr/bin/env bash
# ReiT adapters at larger N, fitted from prompt bundles on a machine with a GPU and nothing of lorec's
# stack but torch + transformers + peft (prompts need the item index, so they are built where it lives):
#
#   here:  lorec train prompts --dir DATA --n N --n-valid 1000 [--test-n 10000] --out BUNDLES/TAG-nN.npz
#   there: bash benchmarks/gpu_quality.sh fit   BUNDLES MODEL RUNS [MAX_SECONDS [VARIANTS]]  # one fit per bundle
#          bash benchmarks/gpu_quality.sh score BUNDLES MODEL RUNS EXTRA SCORES    # waits, then scores
#   here:  lorec train reit --bundle BUNDLES/TAG-nN.npz --run-dir RUNS/TAG-nN      # exports the finished run
#
# fit: every bundle trains in its own background process (same recipe as the CPU runs: r=8, alpha=16,
# q/v, lr 1e-3, batch 8, up to 2 epochs, validation every 1/8 epoch, patience 3, bf16), on the GPU when
# there is one, stopped by the time budget if it runs out (the best checkpoint by validation is kept).
# VARIANTS: lines "TAG SUFFIX FIT-OPTIONS..." add runs RUNS/TAG-SUFFIX of bundle TAG with other options
# (e.g. "ml1m-n4096 r32 --rank 32 --alpha 64").
# score: every bundle with a test part (TAG-*.npz) is scored in float32 by the base model, every run of
# the same TAG and every adapter folder EXTRA/TAG-*; one JSON per pair in SCORES.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
cmd=$1 bundles=$2 model=$3 runs=$4

fit_one() {  # TAG RUN_NAME BUDGET [FIT-OPTIONS...]
  local tag=$1 name=$2 budget=$3; shift 3
  local n=${tag##*-n}
  local eval_every=$(( n / 32 > 32 ? n / 32 : 32 ))  # 2 prompts per sample, batch 8: n/4 steps an epoch
  OMP_NUM_THREADS=2 setsid nohup $PY -m adapters.bundle fit "$bundles/$tag.npz" --model "$model" \
    --run-dir "$runs/$name" --device "$DEVICE" --max-epochs 2 --eval-every "$eval_every" --max-seconds "$budget" \
    "$@" > "$runs/$name.log" 2>&1 &
}

fit_all() {
  local budget=${1:-600} variants=${2:-}
  mkdir -p "$runs"
  for b in "$bundles"/*.npz; do fit_one "$(basename "$b" .npz)" "$(basename "$b" .npz)" "$budget"; done
  [ -z "$variants" ] || while read -r tag suffix options; do
    [ -n "$tag" ] && fit_one "$tag" "$tag-$suffix" "$budget" $options
  done < "$variants"
}

wait_fits() {
  while pgrep -f "adapters.bundle fit" > /dev/null; do sleep 5; done
  for f in "$runs"/*.log; do echo "$f: $(tail -c 400 "$f" | tr '\r' '\n' | tail -2)"; done
}

score_all() {
  local extra=$1 scores=$2
  mkdir -p "$scores"
  for b in "$bundles"/*.npz; do
    $PY -c "import numpy as np, sys; sys.exit('test_tokens' not in np.load('$b'))" || continue
    local tag=$(basename "$b" .npz); tag=${tag%-n*}
    OMP_NUM_THREADS=1 $PY -m adapters.bundle score "$b" --model "$model" --device "$DEVICE" --out "$scores/$tag-base.json" &
    for a in "$runs/$tag"-n*/best "$extra/$tag"-n*; do
      [ -d "$a" ] || continue
      local name=$(basename "$(dirname "$a")"); [ "$(basename "$a")" = best ] || name=$(basename "$a")
      OMP_NUM_THREADS=1 $PY -m adapters.bundle score "$b" --model "$model" --adapter "$a" --device "$DEVICE" \
        --out "$scores/$name.json" &
    done
  done
  wait
}

case $cmd in
  fit) fit_all "${5:-600}" "${6:-}" ;;
  score) wait_fits; score_all "$5" "$6" ;;
  *) echo "usage: $0 fit|score ..." >&2; exit 2 ;;
esac

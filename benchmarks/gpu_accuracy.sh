#!/usr/bin/env bash
# The accuracy benchmark on one GPU machine: many single-rank trainings at once (each is small),
# beside the CUDA tests. Three drivers share the machine:
#   grid   every head at N = 1e3 … 1e6, seeds 0 1, 400 steps (learned heads at their tuned settings)
#   sweep  Prototype Memory's options one at a time at N = 1e4, seeds 0 1
#   long   every head at N = 1e3 for 1000 steps (do the learned heads catch up?)
#
#   TUNED="full_fc:head.lr_scale=10 partial_fc:head.lr_scale=10" bash benchmarks/gpu_accuracy.sh
#
# Results (one JSON line per finished run) land in $OUT/{grid,sweep,long}.jsonl; turn them into
# tables and plots with `python -m benchmarks.accuracy report $OUT/grid.jsonl`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_accuracy}
WORK=${WORK:-/tmp/gpu_accuracy_work}
LIMIT=${LIMIT:-360}  # seconds for each driver; finished runs are kept when it cuts the rest
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
tuned=()
[ -n "${TUNED:-}" ] && read -r -a tuned <<< "--head-extra $TUNED"
common=(--workers 1 --threads 1 --pairs "${PAIRS:-20000}")
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date +%T; } > "$OUT/machine.txt"
(timeout 200 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider > "$OUT/cuda_tests.txt" 2>&1
 echo "exit $?" >> "$OUT/cuda_tests.txt") &
timeout "$LIMIT" python3 -m benchmarks.accuracy grid --identities 1e3 --seeds 0 --steps 1000 \
  --jobs 3 "${common[@]}" "${tuned[@]}" --out-dir "$WORK/long" \
  > "$OUT/long.log" 2>&1 &
timeout "$LIMIT" python3 -m benchmarks.accuracy grid --seeds 0 1 --jobs 6 "${common[@]}" \
  "${tuned[@]}" --out-dir "$WORK/grid" > "$OUT/grid.log" 2>&1 &
timeout "$LIMIT" python3 -m benchmarks.accuracy sweep --seeds 0 1 --jobs 5 "${common[@]}" \
  --out-dir "$WORK/sweep" > "$OUT/sweep.log" 2>&1 &
wait
for name in grid sweep long; do
  cp "$WORK/$name/results.jsonl" "$OUT/$name.jsonl" 2>/dev/null || echo "no $name results"
done
date +%T >> "$OUT/machine.txt"
tail -n 3 "$OUT"/*.log "$OUT/cuda_tests.txt"

#!/usr/bin/env bash
# The accuracy benchmark on one GPU machine: many single-rank trainings at once (each is small),
# beside the CUDA tests. One queue, what matters most first: every head at N = 1e3 … 1e6, seeds
# 0 1, 400 steps (learned heads at their tuned settings), then Prototype Memory's options one at a
# time at N = 1e4 (`grid --pm-sweep-at 1e4`). QUEUE replaces that queue; CUDA_TESTS=0 leaves the
# CPUs to the runs.
#
#   TUNED="full_fc:head.lr_scale=100 partial_fc:head.lr_scale=100" LIMIT=250 bash benchmarks/gpu_accuracy.sh
#   QUEUE="sweep --identities 1e4 --seeds 0 1 --jobs 12" CUDA_TESTS=0 LIMIT=230 bash benchmarks/gpu_accuracy.sh
#
# Results (one JSON line per finished run) land in $OUT/grid.jsonl; turn them into
# tables and plots with `python -m benchmarks.accuracy report $OUT/grid.jsonl`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_accuracy}
WORK=${WORK:-/tmp/gpu_accuracy_work}
LIMIT=${LIMIT:-360}  # seconds for the queue; finished runs are kept when it cuts the rest
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
if [ "${CUDA_TESTS:-1}" != 0 ]; then
  (timeout 200 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider > "$OUT/cuda_tests.txt" 2>&1
   echo "exit $?" >> "$OUT/cuda_tests.txt") &
fi
read -r -a queue <<< "${QUEUE:-grid --seeds 0 1 --jobs 10 --pm-sweep-at 1e4}"
timeout "$LIMIT" python3 -m benchmarks.accuracy "${queue[@]}" \
  "${common[@]}" "${tuned[@]}" --out-dir "$WORK/grid" > "$OUT/grid.log" 2>&1
wait
cp "$WORK/grid/results.jsonl" "$OUT/grid.jsonl" 2>/dev/null || echo "no results"
date +%T >> "$OUT/machine.txt"
tail -n 3 "$OUT"/*.log "$OUT"/cuda_tests.txt 2>/dev/null

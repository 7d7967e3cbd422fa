#!/usr/bin/env bash
# One prepared script for a GPU machine: versions, the CUDA tests (an NCCL training run among them),
# the head scaling benchmark (fp32; Prototype Memory in bf16 too) and end-to-end throughput (r50,
# bf16). Every section has its own time limit, so one that hangs does not lose the others.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default /tmp/gpu_check)
#
# Machines without internet: put wheels of DeepSpeed and its pure-Python needs in .whl/ first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
pack() { tar -czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null; }
section() {  # section NAME SECONDS COMMAND...: run with a limit, log it, pack what exists so far
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -40
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
  pack
}
section versions 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c 'import torch, deepspeed; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"deepspeed\", deepspeed.__version__, torch.cuda.get_device_name(0))'; nproc"
section cuda_tests ${CUDA_TESTS_S:-180} python3 -m pytest -q -m cuda tests/ -p no:cacheprovider
section head_scaling_fp32 ${HEAD_S:-200} python3 -m benchmarks.head_scaling --full --worlds 1 \
  --warmup 3 --repeats 10 --out-dir "$WORK/head_scaling_fp32"
section head_scaling_bf16 ${HEAD_BF16_S:-90} python3 -m benchmarks.head_scaling --full --worlds 1 \
  --heads prototype_memory --dtype bfloat16 --warmup 3 --repeats 10 \
  --out-dir "$WORK/head_scaling_bf16"
section train_throughput ${TRAIN_S:-150} python3 -m benchmarks.train_throughput --worlds 1 \
  --identities 10000 100000000 --model r50 --image-size 112 --precision bf16 --classes 128 \
  --per-class 2 --capacity 65536 --steps 30 --warmup 5 --workers 6 --threads 4 \
  --out "$WORK/train_throughput_r50_bf16.json"
if [ -f "${PROBE:-}" ]; then section probe 120 bash -c "WORK=$WORK; source $PROBE"; fi
echo "done $(date +%T)" | tee -a "$LOG"

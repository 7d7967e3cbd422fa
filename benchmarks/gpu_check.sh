#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see README "GPU checks"): versions, the CUDA tests,
# an NCCL training smoke run, and the head benchmarks (fp32, bf16) into $OUT.
# Usage there: bash benchmarks/gpu_check.sh   (wheels of DeepSpeed & co. in .whl/, carried)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
python3 -m pytest -q -x -m cuda tests/ 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"
for dtype in float32 bfloat16; do
  for learned in "" "--learned"; do
    python3 -m benchmarks.head_step --device cuda --dtype $dtype --batch 1024 --columns 1048576 \
      --repeats 10 $learned --out "$OUT/head_step_${dtype}${learned:+_learned}.json" 2>&1 | tail -1
  done
done | tee "$OUT/head_step.txt"

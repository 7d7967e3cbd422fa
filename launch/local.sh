#!/usr/bin/env bash
# Train on one machine: one process per GPU, or two gloo processes on a CPU-only machine.
#
#   launch/local.sh                                            # the CPU demo (embedded default)
#   launch/local.sh --config configs/ms1mv3_r50_pm.yaml        # all GPUs of this node
#   launch/local.sh --config configs/cpu_demo.yaml run.steps=100 optim.lr=0.05
#   launch/local.sh --config configs/ms1mv3_r50_pm.yaml --resume auto   # continue the newest checkpoint
#   NPROC=4 launch/local.sh --config ...                       # 4 processes (CUDA_VISIBLE_DEVICES picks GPUs)
#
# Every argument goes to `python -m pm_dist.train` (docs/training.md). The process group back-end
# is chosen by the code: NCCL when CUDA is available, gloo otherwise (override: dist.backend=...).
#
# Environment:
#   NPROC      processes (default: the visible GPUs; 2 without CUDA). torchrun's "gpu", "cpu" and
#              "auto" work too, but "cpu"/"auto" on a CPU machine mean one process per core.
#   TORCHRUN   the torchrun to use (default: the repository's .venv/bin/torchrun, else the one on PATH)
#   MASTER_PORT  rendezvous port (default: torchrun --standalone picks a free one)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -z "${TORCHRUN:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/torchrun" ]]; then
        TORCHRUN="$REPO/.venv/bin/torchrun"
    else
        TORCHRUN=torchrun
    fi
fi
if ! command -v "$TORCHRUN" >/dev/null 2>&1; then
    echo "launch/local.sh: $TORCHRUN not found (run 'make install', or set TORCHRUN)" >&2
    exit 2
fi

# A group that torchrun restarts (--max-restarts) must not read its predecessor's addresses from
# a rendezvous store shared across restarts (pytorch/pytorch#135712): give each its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# pm_dist importable without `pip install -e .`; config paths stay relative to the caller's directory.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "${NPROC:-}" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        # Set (possibly empty: no GPU). Count the listed devices.
        IFS=, read -r -a _devices <<< "$CUDA_VISIBLE_DEVICES"
        NPROC=${#_devices[@]}
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L | grep -c '^GPU' || true)
    else
        NPROC=0
    fi
    if [[ "$NPROC" -lt 1 ]]; then
        NPROC=2  # no GPU: two CPU processes on gloo
    fi
fi

rdzv=(--standalone)
if [[ -n "${MASTER_PORT:-}" ]]; then
    rdzv=(--rdzv_backend=c10d --rdzv_endpoint="localhost:${MASTER_PORT}" --nnodes=1)
fi

echo "launch/local.sh: $NPROC processes: $TORCHRUN ${rdzv[*]} --nproc_per_node=$NPROC -m pm_dist.train $*" >&2
exec "$TORCHRUN" "${rdzv[@]}" --nproc_per_node="$NPROC" -m pm_dist.train "$@"

"""One head step against the matrix products it cannot avoid, timed side by side.

The floor of a Prototype Memory step is two products: the logits E·Wᵀ [B, C] and the embedding
gradient dlogits·W [B, D] (prototypes take no gradient). A learned head adds dlogitsᵀ·E [C, D].
This script times, in one run and interleaved so machine noise hits both alike:

* ``floor``: the products alone (plus a fresh [B, C] buffer),
* ``softmax``: ``sharded_margin_softmax`` forward + backward on the same tensors,

and prints the ratio. This is the softmax alone, in one process: the whole head step as training
runs it (gather, weight normalization, memory update, optimizer, two ranks sharing the machine)
against its floor is ``benchmarks/head_scaling.py`` (docs/benchmarks.md).

    python -m benchmarks.head_step [--batch 512 --dim 512 --columns 131072 --repeats 5]
        [--device cuda --dtype bfloat16] [--learned] [--out head_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pm_dist.heads.margin import Margin
from pm_dist.heads.softmax import sharded_margin_softmax


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_step(emb, weight, learned: bool):
    logits = emb @ weight.t()
    grad_e = logits @ weight
    if learned:
        grad_w = logits.t() @ emb
        return grad_e, grad_w
    return grad_e


def softmax_step(emb, weight, labels, learned: bool):
    e = emb.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(learned)
    res = sharded_margin_softmax(e, w, labels, Margin(s=64.0, m1=1.0, m2=0.5, m3=0.0))
    res.loss.backward()
    return e.grad


def time_it(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--columns", type=int, default=131072)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--learned", action="store_true", help="also the weight gradient (FC heads)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    emb = F.normalize(torch.randn(args.batch, args.dim, generator=g)).to(device, dtype)
    weight = F.normalize(torch.randn(args.columns, args.dim, generator=g)).to(device, dtype)
    labels = torch.randint(0, args.columns, (args.batch,), generator=g).to(device)

    floor_fn = lambda: floor_step(emb, weight, args.learned)  # noqa: E731
    softmax_fn = lambda: softmax_step(emb, weight, labels, args.learned)  # noqa: E731
    floor_fn(), softmax_fn()  # warm-up (allocator, kernels)
    floors, softmaxes = [], []
    for _ in range(args.repeats):  # interleaved: drift and noise hit both
        floors.append(time_it(floor_fn, device))
        softmaxes.append(time_it(softmax_fn, device))
    floor_s, softmax_s = statistics.median(floors), statistics.median(softmaxes)
    products = 3 if args.learned else 2
    gflop = products * 2 * args.batch * args.dim * args.columns / 1e9
    result = {
        "batch": args.batch, "dim": args.dim, "columns": args.columns, "learned": args.learned,
        "device": str(device), "dtype": args.dtype, "repeats": args.repeats,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "floor_s": floor_s, "softmax_s": softmax_s, "ratio": softmax_s / floor_s,
        "floor_tflops": gflop / floor_s / 1e3, "floors": floors, "softmaxes": softmaxes,
    }
    print(f"{args.batch}×{args.dim} · {args.columns} columns, {args.dtype} on {device} "
          f"({'learned' if args.learned else 'prototype'} head, median of {args.repeats}): "
          f"floor {floor_s * 1e3:.1f} ms ({result['floor_tflops']:.2f} TFLOP/s), "
          f"softmax step {softmax_s * 1e3:.1f} ms, ratio {result['ratio']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

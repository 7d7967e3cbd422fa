"""Measure an encoder's CPU training throughput (forward + backward + SGD step), images/s.

    python -m benchmarks.encoder_speed --arch tiny --image-size 32 --batch 128 --threads 2

Used for the numbers in docs/models.md; a quick way to choose an encoder and image size
that a CPU run can afford. Inputs are random, so only speed is meaningful.
"""

from __future__ import annotations

import argparse
import time

import torch

from pm_dist.models import MODEL_NAMES, build_model


def train_throughput(arch: str, image_size: int, batch: int, steps: int = 10, warmup: int = 2,
                     embedding_size: int = 512) -> float:
    """Images per second for ``steps`` timed training steps after ``warmup`` untimed ones."""
    model = build_model(arch, embedding_size, image_size).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny", choices=MODEL_NAMES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = train_throughput(args.arch, args.image_size, args.batch, args.steps)
    params = sum(p.numel() for p in build_model(args.arch, 512, args.image_size).parameters())
    print(f"{args.arch} S={args.image_size} batch={args.batch} threads={torch.get_num_threads()} "
          f"params={params / 1e6:.2f}M: {rate:.3g} img/s (fwd+bwd+step)")


if __name__ == "__main__":
    main()

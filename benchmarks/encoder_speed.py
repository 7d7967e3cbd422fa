"""Measure an encoder's CPU training throughput (forward + backward + SGD step), images/s.

    python -m benchmarks.encoder_speed --arch tiny --image-size 32 --batch 128 --threads 2

Used for the numbers in docs/models.md; a quick way to choose an encoder and image size
that a CPU run can afford. Inputs are random, so only speed is meaningful.
"""

from __future__ import annotations

import argparse
import time

import torch

from pm_dist.models import build_model, canonical_name


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


def arch_name(name: str) -> str:
    """``--arch``: a pm_dist encoder name or an insightface one (r18, r34, r50, r100, mbf),
    resolved to pm_dist's; an unknown name is refused with the valid ones."""
    try:
        return canonical_name(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny", type=arch_name,
                        help="encoder: tiny, mobilefacenet, iresnet18/34/50/100, or insightface's "
                             "r18, r34, r50, r100, mbf")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = train_throughput(args.arch, args.image_size, args.batch, args.steps)
    params = sum(p.numel() for p in build_model(args.arch, 512, args.image_size).parameters())
    print(f"{args.arch} S={args.image_size} batch={args.batch} threads={torch.get_num_threads()} "
          f"params={params / 1e6:.2f}M: {rate:.3g} img/s (fwd+bwd+step)")


if __name__ == "__main__":
    main()

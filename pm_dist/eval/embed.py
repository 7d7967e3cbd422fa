"""Embedding extraction for evaluation, spread over every rank when launched with torchrun.

Every rank embeds a contiguous run of whole batches and the per-rank embeddings are all-gathered in
rank order, so each rank ends with all of them and computes the same metrics: no rank waits idle while
rank 0 evaluates alone (a known stall of insightface's callback). The batches are cut from the global
image list before it is shared out, so each image is embedded in a batch of exactly the same
composition at any world size; hence W ranks give the same embeddings as one process.

Input is normalized as insightface does, ``((x / 255) - 0.5) / 0.5`` on [N, 3, H, W] RGB; with
``flip=True`` each image is embedded a second time mirrored left-right (the "-Flip" numbers).

Collectives stay equal on every rank: each runs the same number of steps and calls the model in each
(on a filler image where it has no batch, since a ZeRO-3 engine gathers parameters inside forward),
and after each step all ranks learn whether one failed (an undecodable file, say), so a failure on one
rank raises the same error, naming the item, on all of them instead of leaving the others blocked in
the next collective.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pm_dist.distributed import (all_gather_rows, all_reduce_, collective_device, first_failure,
                                 get_rank, get_world_size)

from pm_dist.data.transforms import normalize

from .images import as_source
from .protocol import l2_normalize


class EmbeddingError(RuntimeError):
    """Extraction failed on some rank; the message carries that rank's reason."""


@dataclass
class Embeddings:
    """Raw model outputs for every image, in order (float32 [N, D]); ``flipped`` for the mirrored images."""

    plain: np.ndarray
    flipped: np.ndarray | None

    def combined(self) -> np.ndarray:
        """float64 [N, D]: plain + flipped (insightface adds the two float64 copies), not normalized."""
        out = self.plain.astype(np.float64)
        if self.flipped is not None:
            out = out + self.flipped.astype(np.float64)
        return out

    def normalized(self) -> np.ndarray:
        """The evaluation embedding: L2-normalized ``combined()`` (float64)."""
        return l2_normalize(self.combined())

    def xnorm(self) -> float:
        """insightface's XNorm: the mean L2 norm of all raw outputs (plain and flipped)."""
        parts = [self.plain] if self.flipped is None else [self.plain, self.flipped]
        norms = np.concatenate([np.linalg.norm(p.astype(np.float64), axis=1) for p in parts])
        return float(norms.mean())


def batch_range(num_images: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The batch indices [b0, b1) this rank embeds: whole global batches, shared out contiguously."""
    num_batches = math.ceil(num_images / batch_size)
    return rank * num_batches // world, (rank + 1) * num_batches // world


def to_input(batch: np.ndarray | torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB → the model's input [B, 3, H, W] in [-1, 1] (as training's)."""
    return normalize(batch, device=device).to(dtype)


def _input_dtype(model) -> torch.dtype:
    """The dtype the model computes in (a bf16/fp16 engine wants half inputs)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def slowest_rank_seconds(start: float) -> float:
    """Wall time since ``start`` on the slowest rank (one all-reduce), so every rank reports the same."""
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=collective_device())
    return float(all_reduce_(elapsed, dist.ReduceOp.MAX).item())


@torch.no_grad()
def extract_embeddings(model, images, batch_size: int = 64, device="cpu", flip: bool = True) -> Embeddings:
    """Embed every image of ``images`` (uint8 [N, H, W, 3] array or an ``eval.images`` source).

    ``model`` maps float [B, 3, S, S] to [B, D] (an ``nn.Module``, put in eval mode for the call and
    restored afterwards, or any callable). Under an initialised process group every rank must call this
    with the same images and batch size; every rank returns all N embeddings.
    """
    source = as_source(images)
    n = len(source)
    if n == 0:
        raise ValueError("no images to embed")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    coll = collective_device()
    b0, b1 = batch_range(n, batch_size, rank, world)
    steps = math.ceil(math.ceil(n / batch_size) / world)  # the same on every rank
    dtype = _input_dtype(model)

    # An idle rank (no batch left, or its read failed) still runs the model, on this one image, so that
    # every rank calls it equally often: a ZeRO-3 engine gathers its parameters inside forward.
    filler = to_input(source.read(0, 1), device, dtype)

    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    plain, flipped = [], []
    try:
        for step in range(steps):
            failure, x = None, None
            b = b0 + step
            if b < b1:
                try:
                    x = to_input(source.read(b * batch_size, min((b + 1) * batch_size, n)), device, dtype)
                except Exception as exc:  # reported on every rank below
                    failure = f"{type(exc).__name__}: {exc}"
            try:
                out = model(filler if x is None else x).float().cpu()
                out_flip = model(torch.flip(filler if x is None else x, dims=[3])).float().cpu() if flip else None
            except Exception as exc:
                failure = failure or f"{type(exc).__name__}: {exc}"
            if x is not None and failure is None:
                plain.append(out)
                flipped.append(out_flip)
            failed = first_failure(failure)
            if failed is not None:
                raise EmbeddingError(f"embedding extraction failed on rank {failed[0]}: {failed[1]}")
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()

    dim = out.shape[1]  # every rank ran the model at least once

    def gather(parts: list[torch.Tensor]) -> np.ndarray:
        local = torch.cat(parts) if parts else torch.zeros(0, dim)
        return all_gather_rows(local.to(coll)).cpu().numpy()

    return Embeddings(gather(plain), gather(flipped) if flip else None)

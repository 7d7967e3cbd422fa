"""What every classifier head is: the interface the trainer talks to, and the helpers heads share.

A head runs on the *global* batch (embeddings gathered from every rank, identical everywhere) and
holds its own shard of the classifier columns. The trainer knows heads only through ``Head``:

* ``forward(embeddings, labels) -> HeadOutput``: loss, accuracy and statistics, identical on
  every rank; called by every rank with the same batch.
* ``learned``: whether it has parameters that an optimizer steps (Full/Partial FC) or not
  (Prototype Memory). The trainer builds that optimizer outside DeepSpeed (DeepSpeed would
  broadcast and average a sharded weight).
* ``shard_state(optimizer)``: this rank's state for a checkpoint (with the optimizer's buffers).
* ``load_shards(shards, optimizer)``: restore from the shards a save wrote at *any* world size.
  ``shards`` is a ``ShardFiles``: indexing it reads one rank's file, so a head reads only what it
  needs (its own shard when nothing changed).
* ``report_hardest``: when True, ``HeadOutput.hardest_class`` names each row's hardest non-target
  class and ``HeadOutput.hardest_cos`` holds its cosine (doppelganger mining); off (the default),
  both are None and the softmax issues two all-reduces instead of three.

A new head is a module with a ``Head`` subclass and one ``register_head`` line
(``pm_dist.heads.registry``); see docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadOutput:
    """One head step, identical on every rank."""

    loss: torch.Tensor  # scalar, differentiable
    accuracy: torch.Tensor  # scalar
    hardest_class: torch.Tensor | None  # [N] class of the hardest non-target column (−1: none);
    #                                     None unless the head's ``report_hardest`` is True
    stats: dict[str, float] = field(default_factory=dict)
    # [N] cosine to that column (−inf: none), fp32, no gradient; None unless ``report_hardest``
    hardest_cos: torch.Tensor | None = None


class ShardFiles(Sequence):
    """The per-rank head states of one save, read lazily: ``shards[r]`` loads rank r's file (once).

    ``len(shards)`` is the world size of the save. Built from a list of loaders, so a test can pass
    in-memory states (``ShardFiles.of(states)``) and a checkpoint passes file readers.
    """

    def __init__(self, loaders: Sequence[Callable[[], dict]]):
        self._loaders = list(loaders)
        self._cache: dict[int, dict] = {}

    @classmethod
    def of(cls, states: Sequence[dict]) -> ShardFiles:
        return cls([(lambda s=s: s) for s in states])

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, rank):
        if isinstance(rank, slice):
            return [self[r] for r in range(len(self))[rank]]
        if rank not in self._cache:
            self._cache[rank] = self._loaders[rank]()
        return self._cache[rank]

    def forget(self, rank: int) -> None:
        """Drop a loaded shard (resharding reads them one at a time)."""
        self._cache.pop(rank, None)

    @property
    def loaded(self) -> list[int]:
        return sorted(self._cache)


class Head(nn.Module):
    """Base of every classifier head (see the module docstring for the contract)."""

    learned: bool = False
    report_hardest: bool = False

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        raise NotImplementedError

    def shard_state(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        raise NotImplementedError

    def load_shards(self, shards: ShardFiles,
                    optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Restore this rank's state; returns notes for the log (what was resharded or dropped)."""
        raise NotImplementedError


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, end) of the classes rank owns; the first N mod W ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels are the same on every rank, so every rank raises together: no one is left waiting."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = ((labels < 0) | (labels >= num_classes)).nonzero().squeeze(1)[:8].tolist()
        raise ValueError(f"labels out of range [0, {num_classes}) at global batch rows {bad}: "
                         f"{labels[bad].tolist()}")

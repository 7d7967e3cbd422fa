"""Configuration of the Prototype Memory head: one dataclass for every choice the method leaves open.

It is the ``head.memory`` section of a run config (docs/prototype_memory.md explains each option and
why its default was chosen). ``validate()`` refuses nonsense with an error that names the option;
``pm_dist.config_io.from_dict`` calls it after loading YAML. ``num_classes`` is not a user setting:
the trainer fills it from the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GENERATIONS = ("normalized_mean", "raw_mean")
POSITIVES = ("fresh", "leave_one_out")
REFRESHES = ("ema", "overwrite")
EVICTIONS = ("oldest_refresh", "fifo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MemoryConfig:
    """Options of the Prototype Memory (docs/prototype_memory.md explains each one)."""

    capacity: int = 512  # M: prototypes held across all ranks (rank r holds class_range(M, W, r))
    num_classes: int | None = None  # N: identities in the dataset (from the data); sizes the table
    # how a class's prototype is made from its exemplars in the global batch
    generation: Literal["normalized_mean", "raw_mean"] = "normalized_mean"
    # target of a batch sample: its class's prototype from the batch without the sample itself,
    # or its class slot as refreshed this step (which includes the sample: an easier target)
    positive: Literal["fresh", "leave_one_out"] = "leave_one_out"
    # a class already in memory: p ← normalize(α·p_old + (1−α)·p_new), or p ← p_new
    refresh: Literal["ema", "overwrite"] = "ema"
    ema_alpha: float = 0.5
    # which slot a new class takes when the shard is full
    eviction: Literal["oldest_refresh", "fifo"] = "oldest_refresh"
    # free slots not refreshed for more than this many steps (None: never)
    forget_after: int | None = None
    # let the loss differentiate through this step's fresh prototypes (the stored copy never is)
    prototype_grad: bool = False
    # storage and matmul dtype of the prototypes; the softmax reduction is fp32 either way
    dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> MemoryConfig:
        _int_at_least("capacity", self.capacity, 1)
        if self.num_classes is not None:
            _int_at_least("num_classes", self.num_classes, 1)
        _choice("generation", self.generation, GENERATIONS)
        _choice("positive", self.positive, POSITIVES)
        _choice("refresh", self.refresh, REFRESHES)
        _choice("eviction", self.eviction, EVICTIONS)
        _choice("dtype", self.dtype, tuple(DTYPES))
        alpha = self.ema_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            # α = 1 would never let a refresh change the prototype; α = 0 is plain overwrite.
            raise ValueError(f"memory option ema_alpha must be a number in [0, 1), got {alpha!r}")
        if self.forget_after is not None:
            _int_at_least("forget_after", self.forget_after, 1)
        if not isinstance(self.prototype_grad, bool):
            raise ValueError(f"memory option prototype_grad must be true or false, got "
                             f"{self.prototype_grad!r}")
        if self.prototype_grad and self.positive == "leave_one_out":
            # The distributed softmax takes no gradient through per-row target vectors, so the
            # leave-one-out positive could not carry it: refuse rather than silently drop it.
            raise ValueError("memory options prototype_grad=True and positive='leave_one_out' "
                             "cannot be combined: the leave-one-out target takes no gradient "
                             "(set positive: fresh to differentiate through the prototypes)")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_run(self, classes_per_batch: int, world_size: int | None) -> None:
        """What the run's shapes demand (the head registry's check for ``head.memory``)."""
        if self.num_classes is not None:
            raise ValueError("head.memory.num_classes comes from the dataset; do not set it")
        if world_size is not None and self.capacity < self.min_capacity(classes_per_batch,
                                                                          world_size):
            raise ValueError(
                f"head.memory.capacity={self.capacity} is too small for {world_size} ranks: all "
                f"{classes_per_batch} classes of a batch may land on one rank, so every shard "
                f"needs {classes_per_batch} slots; set head.memory.capacity ≥ "
                f"{self.min_capacity(classes_per_batch, world_size)}")

    def min_capacity(self, classes_per_batch: int, world_size: int) -> int:
        """Smallest M for which every shard can hold a whole batch's classes (they may all land on
        one rank): the smallest shard has floor(M / W) slots."""
        return classes_per_batch * world_size


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"memory option {name} must be an integer ≥ {low}, got {value!r}")


def _choice(name: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"memory option {name} must be one of {list(options)}, got {value!r}")

"""Classifier heads on the gathered global batch: Prototype Memory and the learned baselines."""

from __future__ import annotations

import torch

from pm_dist.heads.fc import FullFC, HeadOutput, PartialFC
from pm_dist.heads.margin import Margin, build_margin
from pm_dist.heads.memory import PrototypeMemory

HEAD_NAMES = ("prototype_memory", "full_fc", "partial_fc")


def build_head(cfg, num_classes: int, world_size: int, device, group=None) -> torch.nn.Module:
    """The head named by ``cfg.head.name`` (a ``pm_dist.config.RunConfig``), on ``device``."""
    h = cfg.head
    margin = h.margin.build()
    dim = cfg.model.embedding_size
    if h.name == "prototype_memory":
        return PrototypeMemory(dim, h.memory_config(num_classes), margin,
                               classes_per_batch=cfg.batch.classes_per_batch, group=group,
                               device=device)
    if h.name == "full_fc":
        return FullFC(dim, num_classes, margin, seed=cfg.run.seed, group=group).to(device)
    if h.name == "partial_fc":
        return PartialFC(dim, num_classes, margin, sample_rate=h.sample_rate, seed=cfg.run.seed,
                         group=group).to(device)
    raise ValueError(f"unknown head {h.name!r}: choose one of {', '.join(HEAD_NAMES)}")


__all__ = ["HEAD_NAMES", "build_head", "FullFC", "PartialFC", "PrototypeMemory", "HeadOutput",
           "Margin", "build_margin"]

"""Classifier heads on the gathered global batch: Prototype Memory and the learned baselines.

Every head is a ``pm_dist.heads.base.Head`` registered under its config name; the three built in
are registered here. Add your own with ``register_head`` (docs/extending.md).
"""

from __future__ import annotations

from pm_dist.heads.base import Head, HeadOutput, ShardFiles, check_labels, class_range
from pm_dist.heads.fc import FullFC, FullFCOptions, PartialFC, PartialFCOptions
from pm_dist.heads.margin import Margin, build_margin
from pm_dist.heads.memory import PrototypeMemory
from pm_dist.heads.memory_config import MemoryConfig
from pm_dist.heads.registry import HEADS, HeadContext, HeadSpec, build_head, head_spec, register_head

register_head("prototype_memory", PrototypeMemory.build, options=MemoryConfig, section="memory",
              check=lambda o, classes_per_batch, world: o.check_run(classes_per_batch, world))
register_head("full_fc", FullFC.build, options=FullFCOptions, learned=True)
register_head("partial_fc", PartialFC.build, options=PartialFCOptions, learned=True)

__all__ = ["HEADS", "FullFC", "FullFCOptions", "Head", "HeadContext", "HeadOutput", "HeadSpec",
           "Margin", "MemoryConfig", "PartialFC", "PartialFCOptions", "PrototypeMemory",
           "ShardFiles", "build_head", "build_margin", "check_labels", "class_range", "head_spec",
           "register_head"]

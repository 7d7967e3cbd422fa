"""The head registry: config name → how to build the head and what its options are.

Each head registers once (see the bottom of ``pm_dist.heads``)::

    register_head("partial_fc", PartialFC.build, options=PartialFCOptions, section="partial_fc",
                  learned=True)

and from then on ``head.name: partial_fc`` selects it, ``head.partial_fc.*`` holds its options
(type-checked like every other config key), and the trainer builds, saves and restores it through
``pm_dist.heads.base.Head`` without knowing its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pm_dist.heads.base import Head
from pm_dist.heads.margin import Margin
from pm_dist.suggest import did_you_mean


@dataclass(frozen=True)
class HeadContext:
    """What a head is built for: the run's shapes and where it lives."""

    embedding_size: int
    num_classes: int  # identities in the dataset
    classes_per_batch: int  # P of the global batch
    world_size: int
    margin: Margin
    seed: int = 0
    device: torch.device | str = "cpu"
    group: Any = None  # process group (None: the default one)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    build: Callable[[Any, HeadContext], Head]  # (options, context) -> head on context.device
    options: type  # dataclass of the head's options, config section ``head.<section>``
    section: str
    learned: bool  # has parameters: the trainer gives it an optimizer
    # check(options, classes_per_batch, world_size or None): raise ValueError naming the key for a
    # setting that cannot work (world_size is None while loading, known at the pre-flight check)
    check: Callable[[Any, int, int | None], None] | None = None


HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, build: Callable[[Any, HeadContext], Head], *, options: type,
                  section: str | None = None, learned: bool = False,
                  check: Callable[[Any, int, int | None], None] | None = None) -> HeadSpec:
    """Make ``head.name: <name>`` build ``build(options, context)``. Registering a name again
    replaces it (a notebook re-running its cell)."""
    spec = HeadSpec(name, build, options, section or name, learned, check)
    for other in HEADS.values():
        if other.section == spec.section and other.name != name:
            raise ValueError(f"head {name!r}: config section head.{spec.section} is already "
                             f"used by head {other.name!r}")
    HEADS[name] = spec
    return spec


def head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}{did_you_mean(name, HEADS)}: registered heads are "
                         f"{', '.join(sorted(HEADS))}")
    return HEADS[name]


def build_head(name: str, options: Any, context: HeadContext) -> Head:
    spec = head_spec(name)
    head = spec.build(options, context)
    if not isinstance(head, Head):
        raise TypeError(f"head {name!r} built a {type(head).__name__}, not a pm_dist Head")
    return head

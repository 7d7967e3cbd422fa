"""A head and an evaluation suite from outside pm_dist, as a user writes them (docs/extending.md).

``CenterHead``: learned class centres, sharded by contiguous class ranges, a CosFace softmax
through pm_dist's distributed softmax. ``NormSuite``: the mean embedding norm of seeded random
images — a stand-in for a user's own benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pm_dist.distributed import get_rank, get_world_size
from pm_dist.eval.embed import extract_embeddings
from pm_dist.eval.suites import Suite, register_suite
from pm_dist.heads import Head, HeadOutput, class_range, register_head
from pm_dist.heads.softmax import sharded_margin_softmax


@dataclass
class CenterOptions:
    """``head.centers``: the options of the toy head."""

    init_scale: float = 0.01

    def validate(self):
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")


class CenterHead(Head):
    learned = True

    def __init__(self, options: CenterOptions, ctx):
        super().__init__()
        self.num_classes, self.margin, self.group = ctx.num_classes, ctx.margin, ctx.group
        self.rank, self.world = get_rank(ctx.group), get_world_size(ctx.group)
        self.start, self.end = class_range(ctx.num_classes, self.world, self.rank)
        gen = torch.Generator().manual_seed(1000 + self.rank)
        self.centers = torch.nn.Parameter(
            torch.randn(self.end - self.start, ctx.embedding_size, generator=gen)
            * options.init_scale)
        self.to(ctx.device)

    def forward(self, embeddings, labels) -> HeadOutput:
        mine = (labels >= self.start) & (labels < self.end)
        local_target = torch.where(mine, labels - self.start, torch.full_like(labels, -1))
        res = sharded_margin_softmax(F.normalize(embeddings.float()), F.normalize(self.centers),
                                     local_target, self.margin, group=self.group)
        return HeadOutput(res.loss, res.accuracy, None, {"centers": float(self.end - self.start)})

    def shard_state(self, optimizer=None) -> dict:
        state = {"centers": self.centers.detach().clone()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        return state

    def load_shards(self, shards, optimizer=None) -> list[str]:
        if len(shards) != self.world:
            full = torch.cat([shards[r]["centers"] for r in range(len(shards))])
            self.centers.data.copy_(full[self.start:self.end])
            return [f"centres resharded from {len(shards)} ranks (optimizer state restarts)"]
        own = shards[self.rank]
        self.centers.data.copy_(own["centers"])
        if optimizer is not None and "optimizer" in own:
            optimizer.load_state_dict(own["optimizer"])
        return []


register_head("centers", CenterHead, options=CenterOptions, learned=True)


@register_suite("mean_norm")
@dataclass
class NormSuite(Suite):
    images: int = 16
    seed: int = 0

    def run(self, model, ctx):
        rng = np.random.default_rng(self.seed)
        batch = rng.integers(0, 256, (self.images, ctx.image_size, ctx.image_size, 3), np.uint8)
        emb = extract_embeddings(model, batch, ctx.batch_size, ctx.device, flip=False)
        norms = np.linalg.norm(emb.plain, axis=1)
        return [{"name": "toy-norms", "kind": "toy", "mean_norm": float(norms.mean()),
                 "images": self.images}]

    def headline(self, result):
        return {"mean_norm": result["mean_norm"]}

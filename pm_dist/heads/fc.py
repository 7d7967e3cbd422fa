"""Learned-weight baselines: Full FC and Partial FC, model parallel over class ranges.

Both keep an N×D weight matrix split into contiguous class ranges (rank r owns
``class_range(N, W, r)``; the split may be uneven) and share the distributed softmax with the
Prototype Memory, so benchmarks compare heads on the same core. They are plain modules: the
training loop gives them their own optimizer, outside DeepSpeed, whose parameter broadcast and
gradient averaging would corrupt a sharded weight.

Partial FC (An et al., insightface's ``PartialFC_V2``) keeps every positive class of the global batch
plus a random subset of the other local classes, ``max(int(r·C_r), #positives)`` columns per rank.
Each rank draws from its own generator seeded by (seed, rank, step), so ranks never share a pattern
and a resumed run draws the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pm_dist.distributed import get_rank, get_world_size
from pm_dist.heads.base import Head, HeadOutput, ShardFiles, check_labels, class_range
from pm_dist.heads.margin import Margin
from pm_dist.heads.softmax import WORKSPACE, sharded_margin_softmax


@dataclass
class FullFCOptions:
    """``head.full_fc`` options."""

    init_std: float = 0.01  # weights start as N(0, init_std²) (normalized before use)

    def validate(self):
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


@dataclass
class PartialFCOptions(FullFCOptions):
    """``head.partial_fc`` options."""

    sample_rate: float = 0.1  # share of each rank's negative classes used per step

    def validate(self):
        super().validate()
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")


class FullFC(Head):
    """Model-parallel learned class weights: rank r holds rows [start, end) of the N×D matrix."""

    learned = True

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin, *, seed: int = 0,
                 init_std: float = 0.01, group=None):
        super().__init__()
        self.num_classes, self.margin, self.group, self.seed = num_classes, margin, group, seed
        self.rank, self.world_size = get_rank(group), get_world_size(group)
        self.start, self.end = class_range(num_classes, self.world_size, self.rank)
        gen = torch.Generator().manual_seed(_mix(seed, self.rank))
        self.weight = nn.Parameter(
            torch.randn(self.end - self.start, embedding_size, generator=gen) * init_std)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """``embeddings`` [N, D] and ``labels`` [N]: the global batch, the same on every rank."""
        check_labels(labels, self.num_classes)
        local_target = torch.where((labels >= self.start) & (labels < self.end),
                                   labels - self.start, torch.full_like(labels, -1))
        weight, column_ids, local_target = self._columns(labels, local_target)
        res = sharded_margin_softmax(F.normalize(embeddings.float()), normalize_rows(weight, reuse_grad=True),
                                     local_target, self.margin, column_ids=column_ids,
                                     group=self.group, hardest_ids=self.report_hardest)
        return HeadOutput(res.loss, res.accuracy, res.hardest_id,
                          {"columns": float(weight.shape[0])},
                          res.hardest_cos if self.report_hardest else None)

    def _columns(self, labels, local_target):
        ids = torch.arange(self.start, self.end, device=labels.device)
        return self.weight, ids, local_target

    @classmethod
    def build(cls, options: FullFCOptions, ctx) -> FullFC:
        return cls(ctx.embedding_size, ctx.num_classes, ctx.margin, seed=ctx.seed,
                   init_std=options.init_std, group=ctx.group).to(ctx.device)

    # -------------------------------------------------------------------- save / restore
    def shard_state(self, optimizer=None) -> dict:
        """This rank's rows (and its optimizer's state, whose row-shaped buffers reshard with them)."""
        state = {"head": self.state_dict(), "start": self.start, "end": self.end,
                 "num_classes": self.num_classes}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        return state

    def load_shards(self, shards: ShardFiles, optimizer=None) -> list[str]:
        """Own rows from the save of the same world size (only this rank's file is read); else only
        the saved shards whose class ranges overlap this rank's are read, concatenated in rank order
        (class order) and sliced to this rank's rows, optimizer buffers included."""
        old_world = len(shards)
        if old_world == self.world_size:
            needed = [self.rank]
        else:
            ranges = [class_range(self.num_classes, old_world, r) for r in range(old_world)]
            needed = [r for r, (lo, hi) in enumerate(ranges) if lo < self.end and hi > self.start]
        states = [shards[r] for r in needed or [0]]
        saved = states[0]
        if saved.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"head saved for {saved['num_classes']} classes, this run has "
                             f"{self.num_classes}")
        if old_world == self.world_size:
            self.load_state_dict(saved["head"])
            if optimizer is not None and "optimizer" in saved:
                optimizer.load_state_dict(saved["optimizer"])
            return []
        first = class_range(self.num_classes, old_world, (needed or [0])[0])[0]
        module, optim = reshard_fc_state(states, self.start - first, self.end - first)
        self.load_state_dict(module)
        if optimizer is not None and optim is not None:
            optimizer.load_state_dict(optim)
        return [f"class weights resharded from {old_world} to {self.world_size} ranks"]


class PartialFC(FullFC):
    """Full FC that uses, each step, the positives plus a random ``sample_rate`` of the negatives."""

    @classmethod
    def build(cls, options: PartialFCOptions, ctx) -> PartialFC:
        return cls(ctx.embedding_size, ctx.num_classes, ctx.margin, sample_rate=options.sample_rate,
                   seed=ctx.seed, init_std=options.init_std, group=ctx.group).to(ctx.device)

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin, *,
                 sample_rate: float = 0.1, seed: int = 0, init_std: float = 0.01, group=None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"partial_fc sample_rate must be in (0, 1], got {sample_rate}")
        super().__init__(embedding_size, num_classes, margin, seed=seed, init_std=init_std,
                         group=group)
        self.sample_rate = sample_rate
        self.step = 0  # advances every forward; part of the state so resume draws the same columns

    def _columns(self, labels, local_target):
        step, self.step = self.step, self.step + 1
        local = self.end - self.start
        if self.sample_rate >= 1.0:
            return super()._columns(labels, local_target)
        positives = torch.unique(local_target[local_target >= 0])
        num_sample = max(int(self.sample_rate * local), positives.numel())
        gen = torch.Generator().manual_seed(_mix(self.seed, self.rank, step))
        score = torch.rand(local, generator=gen).to(labels.device)
        score[positives] = 2.0  # positives always win the draw
        index = torch.topk(score, num_sample).indices.sort().values
        remapped = torch.searchsorted(index, local_target.clamp_min(0))
        local_target = torch.where(local_target >= 0, remapped, local_target)
        return self.weight[index], index + self.start, local_target

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state):
        self.step = int(state["step"])


class _NormalizeRows(torch.autograd.Function):
    """``F.normalize(w, dim=1)`` with its backward in closed form, one pass over [C, D]:

        d/dw (w / ‖w‖) applied to g = (g − ŵ·⟨g, ŵ⟩) / ‖w‖

    where autograd through ``F.normalize`` runs a dozen elementwise kernels over the whole weight
    (div, mul, neg, sum, expand…). Rows whose norm is below ``eps`` are divided by ``eps`` as
    ``F.normalize`` does, and get g / eps (the clamp has no derivative there)."""

    @staticmethod
    def forward(ctx, w, eps: float, reuse_grad: bool):
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(eps)
        if reuse_grad and w.device.type == "cpu" and w.dtype == torch.float32:
            # the heads' own use: the [C, D] result lives in a buffer kept between steps
            w_hat = torch.div(w, norm, out=WORKSPACE.take("normalized weight", w.shape, w.device))
        else:
            w_hat = w / norm
        ctx.save_for_backward(w_hat, norm)
        ctx.eps, ctx.reuse_grad = eps, reuse_grad
        return w_hat

    @staticmethod
    def backward(ctx, g):
        w_hat, norm = ctx.saved_tensors
        if w_hat.device.type == "cpu":
            dot = _row_dots(g, w_hat)
        else:  # one batched [1, D]·[D, 1] product: no [C, D] temporary, one kernel
            c, d = w_hat.shape
            dot = torch.bmm(g.reshape(c, 1, d), w_hat.reshape(c, d, 1)).reshape(c, 1)
        dot.masked_fill_(norm <= ctx.eps, 0.0)  # clamped rows: w / eps, no projection
        if ctx.reuse_grad and g.is_contiguous():
            grad = g.addcmul_(w_hat, dot, value=-1.0)  # the caller's gradient is ours to reuse
            WORKSPACE.give("normalized weight", w_hat)
        else:
            grad = torch.addcmul(g, w_hat, dot, value=-1.0)
        return grad.div_(norm), None, None


def normalize_rows(w: torch.Tensor, eps: float = 1e-12, *, reuse_grad: bool = False) -> torch.Tensor:
    """Rows of ``w`` scaled to unit L2 norm (``F.normalize(w, dim=1, eps=eps)``), differentiable
    with a closed-form backward (``_NormalizeRows``). ``reuse_grad=True`` lets the backward write
    into the incoming gradient instead of a new [C, D] tensor: only for a result whose sole
    consumer hands it a gradient nothing else reads (the heads' softmax); on CPU the result then
    lives in a buffer reused from step to step (``softmax.WORKSPACE``), valid until the backward."""
    return _NormalizeRows.apply(w, eps, reuse_grad)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash of a str)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


def reshard_fc_state(states: list[dict], start: int, end: int) -> tuple[dict, dict | None]:
    """Rows [start, end) of an FC head saved by W ranks (``states`` in rank order), for a new split.

    ``states[r]`` is what rank r saved: ``{"head": module state, "optimizer": optimizer state}``.
    Weight rows and every optimizer buffer shaped like them (momentum, Adam moments) are
    concatenated in rank order, which is class order, and sliced; scalar optimizer state and the
    hyper-parameters come from rank 0. Returns (module state, optimizer state or None).
    """
    full = torch.cat([s["head"]["weight"] for s in states])
    module = {k: v for k, v in states[0]["head"].items() if k != "weight"}
    module["weight"] = full[start:end].clone()
    if "optimizer" not in states[0]:
        return module, None
    optim = {"param_groups": states[0]["optimizer"]["param_groups"], "state": {}}
    for pid, buffers in states[0]["optimizer"]["state"].items():
        new = {}
        for name, value in buffers.items():
            if torch.is_tensor(value) and value.dim() == 2:
                rows = torch.cat([s["optimizer"]["state"][pid][name] for s in states])
                new[name] = rows[start:end].clone()
            else:
                new[name] = value
        optim["state"][pid] = new
    return module, optim


def _row_dots(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 2048) -> torch.Tensor:
    """⟨a_i, b_i⟩ for every row, as [C, 1], in blocks of rows: the product of a block stays in cache,
    so the whole is one read of each operand with no [C, D] temporary. (A batched [1, D]·[D, 1]
    ``bmm``, also temporary-free, measured 2.5× slower at 131,072 × 512 on one CPU thread: 78 ms
    against 30 ms.)"""
    c = a.shape[0]
    out = torch.empty(c, 1, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    scratch = torch.empty(min(c, rows_per_chunk), a.shape[1], dtype=out.dtype, device=a.device)
    for lo in range(0, c, rows_per_chunk):
        hi = min(lo + rows_per_chunk, c)
        block = torch.mul(a[lo:hi], b[lo:hi], out=scratch[:hi - lo])
        torch.sum(block, dim=1, keepdim=True, out=out[lo:hi])
    return out

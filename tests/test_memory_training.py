"""A short CPU training run through the Prototype Memory at world size 2.

A small MLP encodes Gaussian-cluster inputs (one cluster per identity); each rank encodes its half
of every global batch, ``gather_embeddings`` builds the global batch, the memory head (default
options but ``positive="fresh"``, CosFace s = 64) gives the loss, and encoder gradients are averaged
over ranks as DeepSpeed would. Plain SGD for 60 steps. The positive does not change the memory's
statistics below; it is pinned because 60 steps show learning only for ``fresh`` (loss 0.60–0.78×
its first full-memory value over seeds 0–4, centres' nearest-neighbour cosine 0.79–0.87 → 0.64–0.66),
while the leave-one-out default falls 0.79–1.00× in 60 steps and 0.79–0.92× in 150 on this toy. The
default was chosen on the accuracy benchmark (docs/prototype_memory.md, "Why these defaults").

What the statistics should do, with P classes drawn uniformly from N identities per step and M
slots evicted oldest-refresh-first: the memory holds the M most recently seen classes, so once it is
full a drawn class is a hit with probability M/N, every miss evicts exactly one slot, and the
memory spans the last t* = ln(1 − M/N) / ln(1 − P/N) steps: ages stay around t*, not growing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pm_dist.distributed import gather_embeddings, get_rank, get_world_size
from pm_dist.heads.margin import cosface
from pm_dist.heads.memory import MemoryConfig, PrototypeMemory

IDS, D_IN, DIM, P, K, CAPACITY, STEPS, LR = 96, 16, 16, 16, 2, 64, 60, 0.01


def _separation(encoder, centres) -> float:
    """Mean cosine of each identity's centre embedding to its nearest other identity."""
    with torch.no_grad():
        emb = F.normalize(encoder(centres))
        return float((emb @ emb.t()).fill_diagonal_(-2.0).max(1).values.mean())


def _rank_train(seed: int):
    rank, world = get_rank(), get_world_size()
    centres = torch.randn(IDS, D_IN, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the same initial encoder on every rank (DeepSpeed broadcasts it)
    encoder = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, DIM))
    head = PrototypeMemory(DIM, MemoryConfig(capacity=CAPACITY, num_classes=IDS, positive="fresh"), cosface(),
                           classes_per_batch=P)
    opt = torch.optim.SGD(encoder.parameters(), lr=LR)
    before = _separation(encoder, centres)
    history = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(seed * 7919 + step)  # sampling depends on (seed, step)
        classes = torch.randperm(IDS, generator=g)[:P]
        labels = classes.repeat(K)[torch.randperm(P * K, generator=g)]  # classes split over ranks
        x = centres[labels] + 0.7 * torch.randn(P * K, D_IN, generator=g)
        rows = P * K // world
        out = head(gather_embeddings(encoder(x[rank * rows:(rank + 1) * rows])), labels)
        opt.zero_grad()
        out.loss.backward()
        for p in encoder.parameters():  # DeepSpeed's data-parallel averaging
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        history.append(dict(out.stats, loss=out.loss.item(), acc=out.accuracy.item()))
    return history, before, _separation(encoder, centres)


def test_short_training_run(dist_pool):
    results = dist_pool(2).run(_rank_train, 0)
    history, before, after = results[0]
    assert results[1][0] == history  # every rank reports the same steps
    assert all(h["skipped"] == 0 for h in history)

    span = math.log(1 - CAPACITY / IDS) / math.log(1 - P / IDS)  # ≈ 6 steps
    assert history[0]["hit_rate"] == 0 and history[0]["occupancy"] == P / CAPACITY
    full = next(i for i, h in enumerate(history) if h["occupancy"] == 1.0)
    assert full <= span + 2  # the memory fills once M distinct classes have come by
    steady = history[full:]
    assert all(h["occupancy"] == 1.0 for h in steady)

    loss = [h["loss"] for h in history]
    early = sum(loss[full: full + 10]) / 10  # first ten steps with a full memory
    late = sum(loss[-10:]) / 10
    assert late < 0.75 * early, (early, late)
    assert after < before  # identities moved apart

    for h in steady[1:]:  # after it filled, each class that is not a hit evicts one slot
        assert h["evictions"] == pytest.approx(P * (1 - h["hit_rate"]))
    hit_rate = sum(h["hit_rate"] for h in steady) / len(steady)
    assert abs(hit_rate - CAPACITY / IDS) < 0.08, hit_rate
    target_age = sum(h["target_age_mean"] for h in steady) / len(steady)
    neg_age = sum(h["neg_age_mean"] for h in steady) / len(steady)
    assert 1.0 < target_age < span and 1.0 < neg_age < span, (target_age, neg_age, span)
    assert max(h["neg_age_max"] for h in steady) <= 3 * span  # bounded, not growing

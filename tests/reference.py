"""Plain single-process references, written to be obviously right rather than fast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_target_logit(cos_t: torch.Tensor, s: float, m1: float, m2: float, m3: float):
    """s·(cos(m1·θ + m2) − m3), falling back to s·(cos θ − m3 − m2·sin m2) where m1·θ + m2 > π."""
    cos_t = cos_t.clamp(-1.0, 1.0)
    angle = m1 * torch.acos(cos_t) + m2
    value = torch.where(angle <= math.pi, torch.cos(angle), cos_t - m2 * math.sin(m2))
    return s * (value - m3)


def margin_cross_entropy(cos: torch.Tensor, labels: torch.Tensor, s, m1, m2, m3, mask=None):
    """Mean CE of the full [N, C] cosine matrix with the margin on the target; autograd does the rest.

    Returns (loss, accuracy, hardest non-target column per row or −1).
    """
    n = cos.shape[0]
    rows = torch.arange(n)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    target = margin_target_logit(cos[rows, labels], s, m1, m2, m3)
    logits = torch.where(onehot, target.unsqueeze(1), s * cos)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(0) & ~onehot, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        raw = cos.detach().clone()
        if mask is not None:
            raw[:, ~mask] = float("-inf")
        acc = (raw.argmax(1) == labels).float().mean()
        raw[onehot] = float("-inf")
        best, hardest = raw.max(1)
        hardest = torch.where(torch.isfinite(best), hardest, torch.full_like(hardest, -1))
    return loss, acc, hardest


class ReferenceMemory:
    """Prototype Memory as plain dicts, float64: class c lives in dict c mod W, which holds at most
    its shard's share of the capacity (the first M mod W shards one more). Each entry is
    {"proto": [D] tensor, "refreshed": step, "inserted": step}. The rules, one at a time:

    * a batch whose embeddings are not all finite changes nothing (step included);
    * forgetting: an entry with step − refreshed > forget_after is deleted, before anything else;
    * the batch prototype of class c is normalize(mean of its exemplars), the exemplars normalized
      first or not (``generation``);
    * a class already here: proto ← normalize(α·old + (1−α)·new) (EMA) or new; refreshed ← step;
    * a new class in a full dict evicts the entry with the smallest (refreshed, class) — or
      (inserted, class) for FIFO — among those not refreshed this step;
    * loss: margin CE of each row against every entry of every dict, target its own class; the
      leave-one-out positive is normalize(mean of the *other* exemplars of its class), or the entry
      itself for a class with one exemplar. Prototypes carry gradient only with ``prototype_grad``.
    """

    def __init__(self, capacity, world_size, *, generation="normalized_mean", positive="leave_one_out",
                 refresh="ema", ema_alpha=0.5, eviction="oldest_refresh", forget_after=None,
                 prototype_grad=False, **_ignored):
        self.capacity, self.world_size = capacity, world_size
        self.caps = [capacity // world_size + (1 if r < capacity % world_size else 0)
                     for r in range(world_size)]
        self.shards = [{} for _ in range(world_size)]
        self.generation, self.positive, self.prototype_grad = generation, positive, prototype_grad
        self.refresh, self.alpha = refresh, ema_alpha
        self.eviction, self.forget_after = eviction, forget_after
        self.step = 0

    def entries(self):
        """{class: (prototype, age as the next step will see it)}."""
        return {c: (e["proto"], self.step - e["refreshed"])
                for shard in self.shards for c, e in shard.items()}

    def _prototype(self, rows):
        if self.generation == "normalized_mean":
            rows = F.normalize(rows, dim=1)
        return F.normalize(rows.mean(0), dim=0)

    def forward(self, embeddings, labels, s, m1, m2, m3):
        """One step: None when skipped, else (loss, accuracy, hardest class per row, stats)."""
        t, e = self.step, embeddings
        if not torch.isfinite(e).all():
            return None
        forgotten = 0
        if self.forget_after is not None:
            for shard in self.shards:
                for c in [c for c, v in shard.items() if t - v["refreshed"] > self.forget_after]:
                    del shard[c]
                    forgotten += 1

        labels_list = labels.tolist()
        classes = sorted(set(labels_list))
        source = e if self.prototype_grad else e.detach()
        fresh = {c: self._prototype(source[labels == c]) for c in classes}
        live, hits, target_ages, evictions = {}, 0, [], 0
        for c in classes:  # refresh the classes already here
            shard = self.shards[c % self.world_size]
            if c in shard:
                hits += 1
                target_ages.append(t - shard[c]["refreshed"])
                old = shard[c]["proto"]
                new = (F.normalize(self.alpha * old + (1 - self.alpha) * fresh[c], dim=0)
                       if self.refresh == "ema" else fresh[c])
                shard[c]["proto"], shard[c]["refreshed"] = new.detach(), t
                live[c] = new
        for c in classes:  # then place the new ones
            shard = self.shards[c % self.world_size]
            if c in live:
                continue
            if len(shard) == self.caps[c % self.world_size]:
                time = "refreshed" if self.eviction == "oldest_refresh" else "inserted"
                victim = min((v[time], k) for k, v in shard.items() if v["refreshed"] < t)[1]
                del shard[victim]
                evictions += 1
            shard[c] = {"proto": fresh[c].detach(), "refreshed": t, "inserted": t}
            live[c] = fresh[c]

        cols = sorted(c for shard in self.shards for c in shard)
        protos = torch.stack([live[c] if c in live else self.shards[c % self.world_size][c]["proto"]
                              for c in cols])
        normed = F.normalize(e, dim=1)
        cos = normed @ protos.t()
        target = torch.tensor([cols.index(c) for c in labels_list])
        if self.positive == "leave_one_out":
            vectors = []
            for i, c in enumerate(labels_list):
                others = [j for j, cj in enumerate(labels_list) if cj == c and j != i]
                vectors.append(self._prototype(e.detach()[others]) if others else live[c].detach())
            target_cos = (normed * torch.stack(vectors)).sum(1)
            onehot = F.one_hot(target, len(cols)).bool()
            cos = torch.where(onehot, target_cos.unsqueeze(1), cos)
        loss, acc, hardest = self._cross_entropy(cos, target, s, m1, m2, m3)
        hardest_class = torch.tensor([cols[h] if h >= 0 else -1 for h in hardest.tolist()])
        ages = [t - self.shards[c % self.world_size][c]["refreshed"] for c in cols]
        stats = {
            "occupancy": len(cols) / self.capacity,
            "hit_rate": hits / len(classes),
            "evictions": float(evictions),
            "forgotten": float(forgotten),
            "neg_age_mean": sum(ages) / len(ages),
            "neg_age_max": float(max(ages)),
            "target_age_mean": sum(target_ages) / len(target_ages) if target_ages else 0.0,
            "skipped": 0.0,
        }
        self.step += 1
        return loss, acc, hardest_class, stats

    @staticmethod
    def _cross_entropy(cos, target, s, m1, m2, m3):
        """``margin_cross_entropy``, except that CosFace skips the arccos: a sample that is its own
        class's only exemplar has cosine exactly 1 to its prototype, where d arccos is infinite and
        autograd would give 0·∞ = NaN for a logit whose true derivative is s."""
        if m1 != 1.0 or m2 != 0.0:
            return margin_cross_entropy(cos, target, s, m1, m2, m3)
        onehot = F.one_hot(target, cos.shape[1]).bool()
        loss = F.cross_entropy(torch.where(onehot, s * (cos - m3), s * cos), target)
        with torch.no_grad():
            acc = (cos.argmax(1) == target).double().mean()
            best, hardest = cos.masked_fill(onehot, float("-inf")).max(1)
            hardest = torch.where(torch.isfinite(best), hardest, torch.full_like(hardest, -1))
        return loss, acc, hardest

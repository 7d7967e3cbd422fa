"""Prototype Memory head, sharded over ranks (docs/prototype_memory.md).

A bounded memory of M class prototypes replaces the learned N×D classifier. Class c lives on rank
``c mod W`` only, so every lookup is local. Rank r holds ``class_range(M, W, r)``-many slots:

    protos     [M_r, D]  prototypes (float32 or bfloat16: ``MemoryConfig.dtype``), zero when empty
    slot_class [M_r]     int64 class id, −1 for an empty slot
    refreshed  [M_r]     int64 step of the last refresh (age = step − refreshed)
    inserted   [M_r]     int64 step the class entered the slot (FIFO eviction)
    table      [⌈N/W⌉]   int32 slot of class c at index c // W, −1 when absent: 4 bytes per identity
                         across all ranks, the only per-identity cost

One step (``forward``), on the global batch gathered by the training loop, identical on every rank:

1. Skip test: a non-finite embedding or generated prototype writes nothing. An embedding or class
   sum whose norm overflows float32 counts as non-finite (normalizing would silently turn it into
   a zero vector); with raw-mean generation a class sum can overflow where its rows do not.
   Generation runs for every batch class on every rank (O(batch·D)), so every rank sees the same
   prototypes and takes the same decision without a collective.
2. Forgetting: slots with step − refreshed > ``forget_after`` are freed (one O(M_r) pass).
3. Generation: one prototype per batch class from all its exemplars (the batch is global, so a class
   split across ranks gets one prototype from all of them).
4. Update on the owner: hits are refreshed (EMA or overwrite); new classes take free slots, then
   evict the oldest slots by (refreshed, class) or (inserted, class), one O(M_r) top-k. Slots
   refreshed or inserted this step are never evicted in it.
5. Softmax of the normalized batch against the whole shard (empty slots masked) through
   ``sharded_margin_softmax``; the target is the row's class slot, or its leave-one-out prototype.
6. Statistics: one all-gather of ten numbers per rank.

Every rank issues the same collectives each step whatever it owns (the softmax's two all-reduces,
three with ``report_hardest``,
then the statistics all-gather; a skipped step issues only the all-gather, on every rank). Per-step
cost is O(batch·D + M_r·D) plus the two matrix products; it never depends on N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from pm_dist.distributed import all_gather_rows, get_rank, get_world_size
from pm_dist.heads.base import Head, HeadOutput, ShardFiles, check_labels, class_range
from pm_dist.heads.margin import Margin
from pm_dist.heads.memory_config import MemoryConfig
from pm_dist.heads.softmax import sharded_margin_softmax

__all__ = ["MemoryConfig", "PrototypeMemory", "STATE_FORMAT"]

STATE_FORMAT = "pm_dist.prototype_memory/1"
_INT64_MAX = torch.iinfo(torch.int64).max
# the per-rank numbers summed over ranks for the statistics (the maximum age follows them)
_STATE_TENSORS = ("protos", "slot_class", "refreshed", "inserted")  # protos first
_SUM_KEYS = ("occupied", "hits", "batch_classes", "evictions", "forgotten", "neg_age_sum",
             "neg_count", "target_age_sum", "target_count")


class PrototypeMemory(Head):
    """Sharded Prototype Memory head: ``head(embeddings [N, D], labels [N]) -> HeadOutput``.

    Called identically on every rank with the same gathered global batch (as Full/Partial FC). It
    has no parameters: keep it outside DeepSpeed and give it no optimizer. Save and restore it with
    ``shard_state`` / ``load_shards`` (per shard, with global metadata; any world size on load); its
    buffers are not part of a parent module's state dict.
    """

    @classmethod
    def build(cls, options: MemoryConfig, ctx) -> PrototypeMemory:
        """From ``head.memory`` options; the number of identities comes from the dataset."""
        config = dataclasses.replace(options, num_classes=ctx.num_classes)
        return cls(ctx.embedding_size, config, ctx.margin, classes_per_batch=ctx.classes_per_batch,
                   group=ctx.group, device=ctx.device)

    def __init__(self, embedding_size: int, config: MemoryConfig, margin: Margin, *,
                 classes_per_batch: int | None = None, group=None,
                 device: torch.device | str | None = None):
        super().__init__()
        config.validate()
        if config.num_classes is None:
            raise ValueError("memory option num_classes (identities in the dataset) must be set")
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) \
                or embedding_size < 1:
            raise ValueError(f"embedding_size must be an integer ≥ 1, got {embedding_size!r}")
        self.config, self.margin, self.group, self.dim = config, margin, group, embedding_size
        self.rank, self.world_size = get_rank(group), get_world_size(group)
        world, cap = self.world_size, config.capacity
        if cap < world:
            raise ValueError(f"memory option capacity={cap} is smaller than the world size "
                             f"{world}: every rank needs a slot (set capacity ≥ {world})")
        self.shard_capacities = [end - start for start, end in
                                 (class_range(cap, world, r) for r in range(world))]
        if classes_per_batch is not None:
            if isinstance(classes_per_batch, bool) or not isinstance(classes_per_batch, int) \
                    or classes_per_batch < 1:
                raise ValueError(f"classes_per_batch must be an integer ≥ 1, "
                                 f"got {classes_per_batch!r}")
            if min(self.shard_capacities) < classes_per_batch:
                raise ValueError(self._too_small(classes_per_batch, min(self.shard_capacities)))
        self.classes_per_batch = classes_per_batch

        m_r = self.shard_capacities[self.rank]
        self.register_buffer("protos", torch.zeros(m_r, embedding_size, dtype=config.torch_dtype,
                                                   device=device), persistent=False)
        for name in ("slot_class", "refreshed", "inserted"):
            self.register_buffer(name, torch.full((m_r,), -1, dtype=torch.int64, device=device),
                                 persistent=False)
        table = torch.full((-(-config.num_classes // world),), -1, dtype=torch.int32, device=device)
        self.register_buffer("table", table, persistent=False)
        self.step = 0  # index of the next step; advances on every step that is not skipped

    # ------------------------------------------------------------------------------------ step
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """One step on the global batch ``embeddings`` [N, D] (any float dtype, unnormalized) and
        ``labels`` [N], the same on every rank. Returns loss, accuracy, the class of each row's
        hardest non-target prototype (−1: none) and statistics (floats, same on every rank)."""
        cfg, world = self.config, self.world_size
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, {self.dim}] batch, "
                             f"got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be [N]={embeddings.shape[0]}, got {tuple(labels.shape)}")
        check_labels(labels, cfg.num_classes)
        labels = labels.to(self.protos.device, torch.int64)
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self._check_fits(classes)

        x = embeddings.float()
        # F.normalize, keeping the norms: a norm that overflows (or is NaN) marks a bad row that
        # F.normalize would silently turn into a zero vector
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        normed = x / norms.clamp_min(1e-12)
        src = normed if cfg.generation == "normalized_mean" else x
        if not cfg.prototype_grad:
            src = src.detach()
        # mean then normalize == normalize the sum: the count is a positive scale
        sums = src.new_zeros(len(classes), self.dim).index_add(0, inverse, src)
        sum_norms = torch.linalg.vector_norm(sums, dim=1, keepdim=True)
        fresh = sums / sum_norms.clamp_min(1e-12)
        if not bool(torch.isfinite(norms).all() & torch.isfinite(sum_norms).all()):
            return self._skipped_step(x)

        step = self.step
        forgotten = self._forget(step)
        owned = (classes % world == self.rank).nonzero().squeeze(1)  # indices into classes
        with torch.no_grad():
            upd = self._update(classes[owned], fresh[owned].detach(), step)

        weight = self.protos
        if cfg.prototype_grad:  # same values as stored, but differentiable w.r.t. the batch
            live = fresh[owned]
            if cfg.refresh == "ema" and upd["hit"].any():
                blended = F.normalize(cfg.ema_alpha * upd["old"]
                                      + (1.0 - cfg.ema_alpha) * live[upd["hit"]])
                live = live.index_put((upd["hit"].nonzero().squeeze(1),), blended)
            weight = self.protos.index_copy(0, upd["slots"], live.to(self.protos.dtype))

        row_owned = labels % world == self.rank
        local_target = torch.where(row_owned, self.table[labels // world].long(),
                                   torch.full_like(labels, -1))
        target_vectors = None
        if cfg.positive == "leave_one_out":
            own = src.detach()
            loo = F.normalize(sums.detach()[inverse] - own)
            # a class with a single exemplar has no "others": fall back to its fresh slot
            slot_value = weight.detach()[local_target.clamp_min(0)].float()
            target_vectors = torch.where((counts[inverse] > 1).unsqueeze(1), loo, slot_value)

        res = sharded_margin_softmax(normed, weight, local_target, self.margin,
                                     column_mask=self.slot_class >= 0, column_ids=self.slot_class,
                                     target_vectors=target_vectors, group=self.group,
                                     hardest_ids=self.report_hardest)
        stats = self._stats(step, len(owned), upd["hit"].sum(), upd["evictions"], forgotten,
                            upd["target_age"])
        self.step = step + 1
        return HeadOutput(res.loss, res.accuracy, res.hardest_id, stats,
                          res.hardest_cos if self.report_hardest else None)

    def _check_fits(self, classes: torch.Tensor) -> None:
        """Every class of a step needs its own slot on its owner: refuse a batch whose classes
        overflow a shard (the batch is the same on every rank, so every rank refuses together)."""
        per_shard = torch.bincount(classes % self.world_size, minlength=self.world_size).tolist()
        for r, (k, cap) in enumerate(zip(per_shard, self.shard_capacities)):
            if k > cap:
                raise ValueError(f"{k} distinct classes of this batch belong to rank {r}, whose "
                                 f"shard has {cap} slots. " + self._too_small(len(classes), cap))

    def _too_small(self, per_batch: int, smallest: int) -> str:
        m = self.config.min_capacity(per_batch, self.world_size)
        return (f"memory option capacity={self.config.capacity} is too small for batches of "
                f"{per_batch} classes at world size {self.world_size} (smallest shard: {smallest} "
                f"slots; a batch's classes may all live on one rank): the minimum is capacity = "
                f"classes per batch × world size = {m}")

    def _forget(self, step: int) -> int:
        if self.config.forget_after is None:
            return 0
        stale = ((self.slot_class >= 0) & (step - self.refreshed > self.config.forget_after))
        slots = stale.nonzero().squeeze(1)
        self._free(slots)
        return slots.numel()

    def _free(self, slots: torch.Tensor) -> None:
        """Empty the given occupied slots (an empty slot's class −1 would index the table's end)."""
        if slots.numel():
            self.table[self.slot_class[slots] // self.world_size] = -1
            self.slot_class[slots] = -1
            self.refreshed[slots] = -1
            self.inserted[slots] = -1
            self.protos[slots] = 0

    def _update(self, own_classes: torch.Tensor, fresh: torch.Tensor, step: int) -> dict:
        """Refresh the classes already here, place the new ones; returns what the step needs."""
        cfg, world = self.config, self.world_size
        slots = self.table[own_classes // world].long()
        hit = slots >= 0
        hit_slots = slots[hit]
        target_age = step - self.refreshed[hit_slots]
        old = self.protos[hit_slots].float()
        if cfg.refresh == "ema":
            value = F.normalize(cfg.ema_alpha * old + (1.0 - cfg.ema_alpha) * fresh[hit])
        else:
            value = fresh[hit]
        self.protos[hit_slots] = value.to(self.protos.dtype)
        self.refreshed[hit_slots] = step

        new = (~hit).nonzero().squeeze(1)
        free = (self.slot_class < 0).nonzero().squeeze(1)
        evict = max(0, new.numel() - free.numel())
        dest = free[:new.numel()]
        if evict:
            victims = self._victims(evict, step)
            self.table[self.slot_class[victims] // world] = -1
            dest = torch.cat([dest, victims])
        new_classes = own_classes[new]
        self.protos[dest] = fresh[new].to(self.protos.dtype)
        self.slot_class[dest] = new_classes
        self.refreshed[dest] = step
        self.inserted[dest] = step
        self.table[new_classes // world] = dest.int()
        slots[new] = dest
        return dict(slots=slots, hit=hit, old=old, evictions=evict, target_age=target_age)

    def _victims(self, count: int, step: int) -> torch.Tensor:
        """The ``count`` eligible slots that go first: smallest (time, class) with time the last
        refresh or the insertion; slots touched this step are not eligible. One O(M_r) top-k."""
        n = self.config.num_classes
        if (step + 1) * n >= 2 ** 62:
            raise OverflowError(f"eviction key step·num_classes overflows int64 at step {step}")
        time = self.refreshed if self.config.eviction == "oldest_refresh" else self.inserted
        key = time * n + self.slot_class  # unique per occupied slot: class ids are unique
        key = key.masked_fill((self.slot_class < 0) | (self.refreshed >= step), _INT64_MAX)
        # sorted: the victims' order decides which new class lands in which slot, and unsorted
        # top-k orders differ between devices (CPU and CUDA would fill the memory differently)
        return torch.topk(key, count, largest=False, sorted=True).indices

    # ------------------------------------------------------------------------ statistics, skip
    def _stats(self, step: int, batch_classes, hits, evictions, forgotten, target_age,
               skipped: bool = False) -> dict[str, float]:
        """One all-gather of ten numbers per rank, every step on every rank, summed (and the age
        maximum taken) locally: one latency-bound collective rather than a SUM and a MAX. Ages of
        the negatives: every prototype the softmax saw (occupied slots after the update)."""
        occupied = self.slot_class >= 0
        ages = (step - self.refreshed)[occupied]
        device = self.protos.device
        values = [occupied.sum(), hits, batch_classes, evictions, forgotten, ages.sum(),
                  ages.numel(), target_age.sum(), target_age.numel(),
                  ages.max() if ages.numel() else 0]
        mine = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        every = all_gather_rows(mine.unsqueeze(0), self.group, sizes=[1] * self.world_size)
        s = dict(zip(_SUM_KEYS, every[:, :-1].sum(0).tolist()))
        return {
            "occupancy": s["occupied"] / self.config.capacity,
            "hit_rate": s["hits"] / s["batch_classes"] if s["batch_classes"] else 0.0,
            "evictions": s["evictions"],
            "forgotten": s["forgotten"],
            "neg_age_mean": s["neg_age_sum"] / s["neg_count"] if s["neg_count"] else 0.0,
            "neg_age_max": float(every[:, -1].max()),
            "target_age_mean": (s["target_age_sum"] / s["target_count"]
                                if s["target_count"] else 0.0),
            "skipped": 1.0 if skipped else 0.0,
        }

    def _skipped_step(self, x: torch.Tensor) -> HeadOutput:
        """Nothing is written and the step counter stays; the loss is NaN but still attached to the
        graph, so a loop that calls backward anyway gets NaN gradients and skips the update."""
        none = torch.zeros(0, dtype=torch.int64, device=x.device)
        stats = self._stats(self.step, 0, 0, 0, 0, none, skipped=True)
        loss = (x * float("nan")).sum()  # NaN gradients, not zeros: no optimizer can miss it
        hardest = hardest_cos = None
        if self.report_hardest:
            hardest = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
            hardest_cos = torch.full((x.shape[0],), float("-inf"), device=x.device)
        return HeadOutput(loss, torch.tensor(float("nan"), device=x.device), hardest, stats,
                          hardest_cos)

    # ------------------------------------------------------------------------------- content
    def entries(self) -> dict[str, torch.Tensor]:
        """This shard's content, sorted by class: ``classes`` [k], ``protos`` [k, D] (fp32) and
        ``age`` [k] as the next step will see it (self.step − last refresh)."""
        occupied = (self.slot_class >= 0).nonzero().squeeze(1)
        order = occupied[torch.argsort(self.slot_class[occupied])]
        return {"classes": self.slot_class[order].clone(), "protos": self.protos[order].float(),
                "age": self.step - self.refreshed[order]}

    @property
    def occupancy(self) -> int:
        """Occupied slots of this shard."""
        return int((self.slot_class >= 0).sum())

    # ------------------------------------------------------------------------ save / restore
    def shard_state(self, optimizer=None) -> dict:
        """This shard plus the global metadata needed to restore it at any world size."""
        return {
            "format": STATE_FORMAT,
            "capacity": self.config.capacity, "dim": self.dim, "world_size": self.world_size,
            "rank": self.rank, "step": self.step, "num_classes": self.config.num_classes,
            "config": dataclasses.asdict(self.config),
            **{name: getattr(self, name).detach().clone() for name in _STATE_TENSORS},
        }

    def load_shards(self, shards: ShardFiles, optimizer=None) -> list[str]:
        dropped = self.restore(shards)
        return [f"{dropped} prototypes did not fit the new shards (the oldest were dropped)"] \
            if dropped else []

    def restore(self, shards: Sequence[dict] | Iterable[dict] | dict) -> int:
        """Rebuild this rank's shard from saved shards; returns how many entries were dropped.

        Same world size and capacity: only this rank's own shard is read (``shards[rank]`` of a
        sequence, or the matching one of an iterable), an exact copy (slot order included, so a
        resumed run continues bit for bit). Otherwise every shard of the save is read, one at a
        time; this rank keeps the entries of classes c with c mod W == rank, in class order.
        Beyond its capacity it keeps those the eviction policy would evict last.
        """
        if isinstance(shards, dict):
            shards = [shards]
        if isinstance(shards, Sequence) and len(shards) == self.world_size:
            own = shards[self.rank]
            if (isinstance(own, dict) and own.get("world_size") == self.world_size
                    and own.get("capacity") == self.config.capacity
                    and own.get("rank") == self.rank):
                return self._rebuild([own])
        if isinstance(shards, ShardFiles):
            return self._rebuild(self._one_at_a_time(shards))
        return self._rebuild(shards)

    @staticmethod
    def _one_at_a_time(shards: ShardFiles):
        for r in range(len(shards)):
            yield shards[r]
            shards.forget(r)

    def _rebuild(self, shards: Iterable[dict]) -> int:
        save = exact = None  # (world_size, step, capacity) of the save; this rank's own shard
        ranks, parts = [], []
        for state in shards:
            self._check_shard(state)
            this = (state["world_size"], state["step"], state["capacity"])
            if save is not None and this != save:
                raise ValueError(f"memory shards come from different saves: (world_size, step, "
                                 f"capacity) {save} vs {this}")
            save = this
            ranks.append(state["rank"])
            if (save[0], save[2], state["rank"]) == (self.world_size, self.config.capacity,
                                                     self.rank):
                exact = state
            sc = state["slot_class"]
            mine = (sc >= 0) & (sc % self.world_size == self.rank)
            parts.append({k: state[k][mine] for k in _STATE_TENSORS})
        if save is None:
            raise ValueError("no memory shards given")
        saved_world, saved_step, saved_cap = save
        if exact is None and sorted(ranks) != list(range(saved_world)):
            raise ValueError(f"memory saved at world size {saved_world} (capacity {saved_cap}) "
                             f"needs all its shards to load at world size {self.world_size} "
                             f"(capacity {self.config.capacity}); got ranks {sorted(ranks)}")

        # start empty (O(N/W) for the table: fine on load, never done per step)
        self.protos.zero_()
        for name in _STATE_TENSORS[1:]:
            getattr(self, name).fill_(-1)
        self.table.fill_(-1)
        self.step = int(saved_step)
        if exact is not None:
            for name in _STATE_TENSORS:
                getattr(self, name).copy_(exact[name])
            slots = (self.slot_class >= 0).nonzero().squeeze(1)
            self.table[self.slot_class[slots] // self.world_size] = slots.int()
            return 0
        got = {k: torch.cat([p[k].to(self.protos.device) for p in parts]) for k in _STATE_TENSORS}
        keep = self._keep_newest(got, self.protos.shape[0])
        order = keep[torch.argsort(got["slot_class"][keep])]
        k = order.numel()
        for name in _STATE_TENSORS:
            getattr(self, name)[:k] = got[name][order]  # (copy_ casts a bf16/fp32 difference)
        self.table[self.slot_class[:k] // self.world_size] = torch.arange(
            k, dtype=torch.int32, device=self.protos.device)
        return got["slot_class"].numel() - k

    def _keep_newest(self, got: dict, room: int) -> torch.Tensor:
        """Indices of the ``room`` entries the eviction policy would evict last."""
        total = got["slot_class"].numel()
        if total <= room:
            return torch.arange(total, device=got["slot_class"].device)
        time = got["refreshed"] if self.config.eviction == "oldest_refresh" else got["inserted"]
        key = time * self.config.num_classes + got["slot_class"]
        return torch.topk(key, room, largest=True, sorted=True).indices  # device-independent

    def _check_shard(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a prototype memory shard (format {found!r}, expected "
                             f"{STATE_FORMAT!r})")
        if state["dim"] != self.dim:
            raise ValueError(f"memory shard has prototypes of dimension {state['dim']}, this head "
                             f"has embedding_size {self.dim}")
        occupied = state["slot_class"][state["slot_class"] >= 0]
        if occupied.numel() and int(occupied.max()) >= self.config.num_classes:
            raise ValueError(f"memory shard holds class {int(occupied.max())}, beyond memory "
                             f"option num_classes={self.config.num_classes}")

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, capacity={c.capacity} ({self.protos.shape[0]} on rank "
                f"{self.rank}/{self.world_size}), num_classes={c.num_classes}, dtype={c.dtype}")

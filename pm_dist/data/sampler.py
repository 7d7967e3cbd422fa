"""The distributed P×K sampler: each global batch is P identities × K images, split across ranks.

**Determinism.** Batch ``step`` is a pure function of (seed, step) (and of what a proposer returns):
its random stream is PCG64 seeded with (seed, step), so a run resumed at step s replays s, s+1, …
exactly, on any rank, with no state to checkpoint. Every rank computes the same global batch and keeps
its own equal slice, so the union of the W slices *is* the single-process global batch, whatever W.

**Layout.** Identity-major: positions j·K .. j·K+K-1 hold K images of the j-th identity. Rank r of W
keeps positions [r·B/W, (r+1)·B/W) with B = P·K, which must divide by W.

**Identities.** P distinct identities per batch, drawn uniformly or with probability proportional to
their image count (successive draws without replacement). Uniform draws over N identities need no
table (N may be 10⁸); count weighting uses the dataset's count array when it has one and otherwise
rejection against ``max_count``. Identities with fewer than ``MIN_IMAGES`` = 2 images are never
drawn as batch identities (nor proposed): with one image, its "prototype from K images" would be
one image K times, and leave-one-out's "other exemplars" the row itself. ``num_ineligible`` says
how many a dataset with a count table loses to the rule; without a table (synthetic identities)
such a draw is redrawn.

**Images.** K distinct images of each identity when it has at least K; an identity with
2 ≤ n < K images gives all n (in random order) and then K−n more drawn with replacement, so its
prototype comes from n ≥ 2 distinct images (its repeated rows are copies, with their own flips).

**Proposer hook.** ``set_proposer(fn, fraction)`` lets a miner choose ``round(fraction·P)`` of the
identities. The sampler first draws the rest at random, then calls
``fn(step, rng, num)`` or, when ``fn`` declares a ``drawn`` parameter, ``fn(step, rng, num, drawn=...)``
with the identities already drawn (so a doppelganger miner can return their look-alikes). ``rng`` is
a generator seeded from (seed, step). Proposals that are out of range raise; duplicates and empty
identities are dropped, and any shortfall is filled at random. The doppelganger miner
(``pm_dist.mining``, the ``mining`` config section) is the proposer the trainer connects: it returns
the look-alikes of the drawn identities from a table that every rank holds alike, so the batch stays
identical on every rank and replays on resume.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import numpy as np

_TAG_CLASSES, _TAG_IMAGES, _TAG_PROPOSE = 11, 12, 13
MIN_IMAGES = 2  # an identity with fewer distinct images is never a batch identity


class PKBatch(NamedTuple):
    """Sample indices and labels of a batch, identity-major."""

    indices: np.ndarray  # int64, dataset sample indices
    labels: np.ndarray  # int64, identity of each sample


def step_rng(seed: int, step: int, tag: int) -> np.random.Generator:
    """The random stream of one purpose (tag) at one step: independent of everything else."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(step), tag])))


def _first_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values in order of first appearance."""
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


class PKSampler:
    def __init__(
        self,
        index,
        P: int,
        K: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        weighting: str = "uniform",
        proposer: Callable | None = None,
        proposal_fraction: float = 0.5,
    ):
        if not isinstance(P, (int, np.integer)) or P < 1:
            raise ValueError(f"P (identities per batch) must be a positive integer, got {P!r}")
        if not isinstance(K, (int, np.integer)) or K < 2:
            raise ValueError(f"K (images per identity) must be an integer >= 2 (a prototype needs "
                             f"two images), got {K!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if (P * K) % world_size:
            raise ValueError(f"the global batch P*K = {P}*{K} = {P * K} does not split equally over "
                             f"{world_size} ranks; choose P*K divisible by the world size")
        if weighting not in ("uniform", "count"):
            raise ValueError(f'weighting must be "uniform" or "count", got {weighting!r}')
        self.index = index
        self.P, self.K = int(P), int(K)
        self.world_size, self.rank = int(world_size), int(rank)
        self.seed = int(seed)
        self.weighting = weighting
        self.num_classes = int(index.num_classes)
        self.local_size = self.P * self.K // self.world_size

        counts = index.count_array()
        self._counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        if self._counts is not None and (self._counts < MIN_IMAGES).any():
            self._eligible = np.flatnonzero(self._counts >= MIN_IMAGES)
        else:
            self._eligible = None
        self.num_eligible = self.num_classes if self._eligible is None else int(self._eligible.size)
        # identities the rule leaves out (known with a count table; 0 without one)
        self.num_ineligible = self.num_classes - self.num_eligible
        if self.P > self.num_eligible:
            raise ValueError(f"P = {self.P} identities per batch but the dataset has only "
                             f"{self.num_eligible} identities with at least {MIN_IMAGES} images")
        if weighting == "count" and self._counts is not None:
            self._cum = np.cumsum(np.where(self._counts >= MIN_IMAGES, self._counts, 0))
        self._proposer, self._proposer_takes_drawn, self.proposal_fraction = None, False, 0.0
        if proposer is not None:
            self.set_proposer(proposer, proposal_fraction)

    # -- proposer -------------------------------------------------------------------------------
    def set_proposer(self, proposer: Callable | None, fraction: float = 0.5) -> None:
        """Let ``proposer`` choose round(fraction·P) identities of every batch (None removes it)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"proposal fraction must be in [0, 1], got {fraction}")
        self._proposer, self.proposal_fraction = proposer, float(fraction)
        self._proposer_takes_drawn = False
        if proposer is not None:
            try:
                params = inspect.signature(proposer).parameters
            except (TypeError, ValueError):
                params = {}
            self._proposer_takes_drawn = "drawn" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    # -- drawing identities ----------------------------------------------------------------------
    def _draw_with_replacement(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.weighting == "uniform":
            pos = rng.integers(0, self.num_eligible, size=n)
            if self._eligible is not None:
                return self._eligible[pos]
            if self._counts is None:  # no table: redraw identities below MIN_IMAGES
                pos = pos[self._enough_images(pos)]
                while len(pos) < n:
                    more = rng.integers(0, self.num_classes, size=n - len(pos))
                    pos = np.concatenate([pos, more[self._enough_images(more)]])
            return pos
        if self._counts is not None:  # inverse CDF over the cumulative counts: exact integers
            return np.searchsorted(self._cum, rng.integers(0, int(self._cum[-1]), size=n), side="right")
        out = []  # rejection against max_count: needs no table
        while sum(len(o) for o in out) < n:
            cand = rng.integers(0, self.num_classes, size=2 * n)
            have = np.asarray(self.index.counts(cand))
            keep = (rng.integers(0, self.index.max_count, size=2 * n) < have) & (have >= MIN_IMAGES)
            out.append(cand[keep])
        return np.concatenate(out)[:n]

    def _draw_distinct(self, rng: np.random.Generator, n: int, exclude: np.ndarray) -> np.ndarray:
        """n distinct identities not in ``exclude``, in draw order."""
        if n <= 0:
            return np.zeros(0, np.int64)
        available = self.num_eligible - len(exclude)
        if n > available:
            raise ValueError(f"cannot draw {n} more distinct identities: only {available} left")
        if self.weighting == "uniform" and 4 * (n + len(exclude)) > self.num_eligible:
            # dense case (few identities): a permutation is cheaper than rejecting duplicates
            pool = np.arange(self.num_eligible) if self._eligible is None else self._eligible
            perm = pool[rng.permutation(self.num_eligible)]
            return perm[~np.isin(perm, exclude)][:n]
        chosen = np.zeros(0, np.int64)
        for _ in range(10_000):
            cand = self._draw_with_replacement(rng, 2 * (n - len(chosen)) + 8)
            cand = cand[~np.isin(cand, exclude)]
            chosen = _first_unique(np.concatenate([chosen, cand]))
            if len(chosen) >= n:
                return chosen[:n].astype(np.int64)
        raise RuntimeError(f"could not draw {n} distinct identities by count weighting "
                           f"(the counts are too concentrated); use weighting='uniform'")

    def _propose(self, step: int, drawn: np.ndarray, num: int) -> np.ndarray:
        rng = step_rng(self.seed, step, _TAG_PROPOSE)
        if self._proposer_takes_drawn:
            out = self._proposer(step, rng, num, drawn=drawn.copy())
        else:
            out = self._proposer(step, rng, num)
        out = np.asarray(out if out is not None else [], dtype=np.int64).reshape(-1)
        if out.size and (out.min() < 0 or out.max() >= self.num_classes):
            bad = int(out[(out < 0) | (out >= self.num_classes)][0])
            raise ValueError(f"proposer returned identity {bad}, outside [0, {self.num_classes})")
        out = _first_unique(out[~np.isin(out, drawn)])
        return out[self._enough_images(out)][:num]

    def _enough_images(self, classes: np.ndarray) -> np.ndarray:
        counts = self._counts[classes] if self._counts is not None else self.index.counts(classes)
        return np.asarray(counts) >= MIN_IMAGES

    def classes(self, step: int) -> np.ndarray:
        """The P identities of global batch ``step``, in batch order."""
        rng = step_rng(self.seed, step, _TAG_CLASSES)
        num_prop = int(round(self.proposal_fraction * self.P)) if self._proposer is not None else 0
        drawn = self._draw_distinct(rng, self.P - num_prop, np.zeros(0, np.int64))
        if num_prop == 0:
            return drawn
        proposed = self._propose(step, drawn, num_prop)
        chosen = np.concatenate([drawn, proposed])
        fill = self._draw_distinct(rng, self.P - len(chosen), chosen)
        return np.concatenate([chosen, fill]).astype(np.int64)

    # -- drawing images -------------------------------------------------------------------------
    def _draw_images(self, rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
        """[P, K] image numbers: distinct within an identity where it has ≥ K images."""
        P, K = len(counts), self.K
        ks = np.empty((P, K), np.int64)
        small = counts < 4 * K
        rows = np.flatnonzero(small)
        if rows.size:  # few images: order random keys, take the first K valid ones
            keys = rng.random((rows.size, 4 * K))
            keys[np.arange(4 * K)[None, :] >= counts[rows, None]] = 2.0  # invalid slots sort last
            first = np.argsort(keys, axis=1, kind="stable")[:, :K]
            short = first >= counts[rows, None]  # only when n < K: top up with replacement
            refill = rng.integers(0, np.maximum(counts[rows, None], 1), size=first.shape)
            ks[rows] = np.where(short, refill, first)
        rows = np.flatnonzero(~small)
        todo = rows
        while todo.size:  # many images: draw, redraw the rows that repeat an image (rarely)
            draw = rng.integers(0, counts[todo, None], size=(todo.size, K))
            ks[todo] = draw
            s = np.sort(draw, axis=1)
            todo = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        return ks

    # -- batches --------------------------------------------------------------------------------
    def global_batch(self, step: int) -> PKBatch:
        """All P·K samples of batch ``step`` (identical on every rank)."""
        classes = self.classes(step)
        counts = np.asarray(self.index.counts(classes), dtype=np.int64)
        ks = self._draw_images(step_rng(self.seed, step, _TAG_IMAGES), counts)
        labels = np.repeat(classes, self.K)
        return PKBatch(np.asarray(self.index.sample_index(labels, ks.reshape(-1)), np.int64), labels)

    @property
    def local_slice(self) -> slice:
        """This rank's positions in the global batch."""
        return slice(self.rank * self.local_size, (self.rank + 1) * self.local_size)

    def local_batch(self, step: int) -> PKBatch:
        """This rank's equal slice of global batch ``step``."""
        batch = self.global_batch(step)
        sl = self.local_slice
        return PKBatch(batch.indices[sl], batch.labels[sl])

"""Synthetic face identities: a dataset of any size that needs no download and no storage.

Identity ``c``'s look is a function of (seed, c) only and its ``k``-th image a function of
(seed, c, k) only: nothing is stored per identity, so 10⁷ or 10⁸ identities cost nothing until an
image is drawn, and every process and machine renders the same bytes (see ``render.py`` for why the
arithmetic is exact). What it offers beside training images:

* **Long tail.** Images per identity follow a discretised log-normal truncated to
  [min_images, max_images]; the default (median 16, σ 0.9, 2..400: mean ≈ 24) resembles
  WebFace42M (2M identities, 42M images). ``counts`` is a vectorised hash, no table.
* **Planted doppelgangers.** Identities pair up as (2m, 2m+1); a hashed fraction of pairs are
  look-alikes: the odd member's latent vector is moved towards the even member's, to
  ``doppelganger_distance`` of their independent distance (0 = identical twins, 1 = unrelated).
  ``doppelganger_pairs`` gives the ground truth.
* **Held-out identities** for evaluation live in a separate key range (key 2⁴⁰ + j), so they are
  disjoint from training identities by construction and do not change when ``num_identities`` does:
  evaluation sets are comparable across training-set sizes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .render import LATENT_DIM, Nuisance, face_layer, frontal_image, render_image

HELDOUT_BASE = 1 << 40  # identity keys at and above this are held-out identities
_TAG_LATENT, _TAG_IMAGE, _TAG_COUNT, _TAG_TWIN, _TAG_EVAL = 1, 2, 3, 4, 5
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fast vectorised hash."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, tag: int, keys: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) for each key, a pure function of (seed, tag, key)."""
    base = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + tag) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h = _mix64(np.asarray(keys, dtype=np.uint64) ^ base)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))


def lognormal_count_cdf(median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """CDF over counts lo..hi of a log-normal rounded to integers and truncated to [lo, hi].

    Entry i is P(count ≤ lo + i); the last entry is 1. sigma = 0 puts all mass on round(median).
    """
    n = np.arange(lo, hi + 1, dtype=np.float64)
    if sigma == 0:
        target = min(max(int(round(median)), lo), hi)
        return (n >= target).astype(np.float64)
    upper = [0.5 * (1.0 + math.erf((math.log(v + 0.5) - math.log(median)) / (sigma * math.sqrt(2.0))))
             for v in n]
    below = 0.5 * (1.0 + math.erf((math.log(lo - 0.5) - math.log(median)) / (sigma * math.sqrt(2.0)))) \
        if lo > 0.5 else 0.0
    cdf = (np.asarray(upper) - below) / (upper[-1] - below)
    cdf[-1] = 1.0
    return cdf


@dataclass(frozen=True)
class IdentificationSet:
    """Gallery (one image per identity) and probes (other images of the same identities)."""

    gallery: np.ndarray  # uint8 [G, S, S, 3]
    gallery_labels: np.ndarray  # int64 [G], held-out identity numbers
    probes: np.ndarray  # uint8 [G * probes_per_id, S, S, 3]
    probe_labels: np.ndarray  # int64


class SyntheticIdentities:
    """The generator. ``render(c, k)`` is training image k of identity c; see the module docstring."""

    def __init__(
        self,
        num_identities: int,
        image_size: int = 32,
        seed: int = 0,
        *,
        count_median: float = 16.0,
        count_sigma: float = 0.9,
        min_images: int = 2,
        max_images: int = 400,
        doppelganger_fraction: float = 0.1,
        doppelganger_distance: float = 0.3,
        heldout_identities: int = 1000,
        nuisance: float = 1.0,
        cache_size: int = 256,
    ):
        if num_identities < 1 or num_identities >= HELDOUT_BASE:
            raise ValueError(f"num_identities must be in [1, 2**40), got {num_identities}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not 1 <= min_images <= max_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {min_images}, {max_images}")
        if max_images >= 1 << 20:
            raise ValueError(f"max_images must be < 2**20, got {max_images}")
        if count_median <= 0 or count_sigma < 0:
            raise ValueError(f"need count_median > 0 and count_sigma >= 0, got {count_median}, {count_sigma}")
        if not 0.0 <= doppelganger_fraction <= 1.0:
            raise ValueError(f"doppelganger_fraction must be in [0, 1], got {doppelganger_fraction}")
        if not 0.0 <= doppelganger_distance <= 1.0:
            raise ValueError(f"doppelganger_distance must be in [0, 1], got {doppelganger_distance}")
        if heldout_identities < 0:
            raise ValueError(f"heldout_identities must be >= 0, got {heldout_identities}")
        self.num_identities = int(num_identities)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.count_median, self.count_sigma = float(count_median), float(count_sigma)
        self.min_images, self.max_images = int(min_images), int(max_images)
        self.doppelganger_fraction = float(doppelganger_fraction)
        self.doppelganger_distance = float(doppelganger_distance)
        self.heldout_identities = int(heldout_identities)
        self.nuisance_scale = float(nuisance)
        self.nuisance = Nuisance(nuisance)
        self.cache_size = int(cache_size)
        self._cdf = lognormal_count_cdf(count_median, count_sigma, min_images, max_images)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- the index protocol's ingredients ------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.num_identities

    def params(self) -> dict:
        """Everything that defines the generator's output (recorded in converted manifests)."""
        return dict(
            num_identities=self.num_identities, image_size=self.image_size, seed=self.seed,
            count_median=self.count_median, count_sigma=self.count_sigma, min_images=self.min_images,
            max_images=self.max_images, doppelganger_fraction=self.doppelganger_fraction,
            doppelganger_distance=self.doppelganger_distance,
            heldout_identities=self.heldout_identities, nuisance=self.nuisance_scale,
        )

    def counts(self, classes) -> np.ndarray:
        """Images per identity for the given training identities (int64, vectorised, no table)."""
        classes = np.asarray(classes, dtype=np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_identities):
            raise IndexError(f"identity out of range [0, {self.num_identities})")
        u = hash_uniform(self.seed, _TAG_COUNT, classes)
        return self.min_images + np.searchsorted(self._cdf, u, side="right").astype(np.int64)

    # -- looks -------------------------------------------------------------------------------
    def _own_latent(self, key: int) -> np.ndarray:
        return _rng(self.seed, _TAG_LATENT, key).random(LATENT_DIM)

    def twin_key(self, keys) -> np.ndarray:
        """For each identity key, the key of its planted look-alike, or -1."""
        keys = np.asarray(keys, dtype=np.int64)
        partner = keys ^ 1
        planted = hash_uniform(self.seed, _TAG_TWIN, keys >> 1) < self.doppelganger_fraction
        return np.where(planted, partner, -1)

    def latent(self, key: int) -> np.ndarray:
        """An identity's latent look vector. The odd member of a planted pair is pulled towards
        the even one's own latent (mixing only exact float64 operations)."""
        own = self._own_latent(key)
        if key & 1 and self.twin_key(key) >= 0:
            anchor = self._own_latent(key ^ 1)
            return anchor + self.doppelganger_distance * (own - anchor)
        return own

    def layer(self, key: int) -> np.ndarray:
        """The identity's head layer (premultiplied RGBA), cached: a P×K batch reuses it K times."""
        layer = self._cache.get(key)
        if layer is None:
            layer = face_layer(self.latent(key), self.image_size)
            if self.cache_size > 0:
                self._cache[key] = layer
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return layer

    def render_key(self, key: int, k: int) -> np.ndarray:
        rng = _rng(self.seed, _TAG_IMAGE, int(key), int(k))
        return render_image(self.layer(int(key)), rng, self.nuisance)

    def render(self, c: int, k: int) -> np.ndarray:
        """Training image k of identity c: uint8 RGB [S, S, 3]."""
        if not 0 <= c < self.num_identities:
            raise IndexError(f"identity {c} out of range [0, {self.num_identities})")
        if k < 0:
            raise IndexError(f"image number must be >= 0, got {k}")
        return self.render_key(c, k)

    def render_heldout(self, j: int, k: int) -> np.ndarray:
        """Image k of held-out identity j (0 <= j < heldout_identities)."""
        if not 0 <= j < self.heldout_identities:
            raise IndexError(f"held-out identity {j} out of range [0, {self.heldout_identities})")
        return self.render_key(HELDOUT_BASE + j, k)

    def frontal(self, key: int) -> np.ndarray:
        """The identity's look with no nuisance (flat grey background): for measuring likeness."""
        return frontal_image(self.layer(int(key)))

    def doppelganger_pairs(self, heldout: bool = False) -> np.ndarray:
        """Planted look-alike pairs, int64 [n, 2] (even, odd) of training identities, or of held-out
        identity numbers when ``heldout``. Vectorised over pairs; O(N) output by nature."""
        n = self.heldout_identities if heldout else self.num_identities
        base = HELDOUT_BASE if heldout else 0
        even = np.arange(0, n - 1, 2, dtype=np.int64)
        planted = self.twin_key(even + base) >= 0
        even = even[planted]
        return np.stack([even, even + 1], axis=1)

    # -- evaluation sets ---------------------------------------------------------------------
    def _heldout_rng(self, what: int, seed: int) -> np.random.Generator:
        return _rng(self.seed, _TAG_EVAL, what, seed)

    def verification_pairs(self, num_pairs: int, seed: int = 0, hard_fraction: float = 0.0):
        """LFW-style pairs of held-out identities: (uint8 [2n, S, S, 3], bool issame [n]).

        Pair i is images 2i and 2i+1, exactly as an insightface ``.bin`` set is laid out; half the
        pairs are the same identity (two different images). ``hard_fraction`` of the different pairs
        are planted look-alikes (where the held-out set has any).
        """
        if self.heldout_identities < 2:
            raise ValueError("verification pairs need heldout_identities >= 2")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        rng = self._heldout_rng(1, seed)
        issame = np.zeros(num_pairs, dtype=bool)
        issame[: (num_pairs + 1) // 2] = True
        issame = issame[rng.permutation(num_pairs)]
        twins = self.doppelganger_pairs(heldout=True)
        out = np.empty((2 * num_pairs, self.image_size, self.image_size, 3), np.uint8)
        for i in range(num_pairs):
            a = int(rng.integers(self.heldout_identities))
            if issame[i]:
                b = a
                ka, kb = rng.choice(1 << 20, size=2, replace=False)
            else:
                if len(twins) and rng.random() < hard_fraction:
                    a, b = (int(x) for x in twins[rng.integers(len(twins))])
                else:
                    b = int(rng.integers(self.heldout_identities - 1))
                    b += b >= a
                ka, kb = rng.integers(1 << 20, size=2)
            out[2 * i] = self.render_heldout(a, int(ka))
            out[2 * i + 1] = self.render_heldout(b, int(kb))
        return out, issame

    def identification_split(self, num_identities: int, probes_per_id: int = 1, seed: int = 0
                             ) -> IdentificationSet:
        """A 1:N identification set over ``num_identities`` held-out identities: image 0 of each is
        the gallery, images 1..probes_per_id the probes."""
        if not 1 <= num_identities <= self.heldout_identities:
            raise ValueError(
                f"num_identities must be in [1, heldout_identities={self.heldout_identities}], "
                f"got {num_identities}")
        if probes_per_id < 1:
            raise ValueError(f"probes_per_id must be >= 1, got {probes_per_id}")
        rng = self._heldout_rng(2, seed)
        ids = np.sort(rng.choice(self.heldout_identities, size=num_identities, replace=False)).astype(np.int64)
        gallery = np.stack([self.render_heldout(int(j), 0) for j in ids])
        probes = np.stack([self.render_heldout(int(j), k) for j in ids for k in range(1, probes_per_id + 1)])
        return IdentificationSet(gallery, ids, probes, np.repeat(ids, probes_per_id))

    def __getstate__(self):  # workers start with an empty cache
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

"""``DataConfig``: everything that decides what the training loader yields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DataConfig:
    """Data settings of a run. ``validate()`` raises ``ValueError`` naming the first bad field."""

    source: str = "synthetic"  # "synthetic" | "arrow"
    path: str | None = None  # Arrow dataset directory (source="arrow")
    image_size: int = 32  # side of the square images the loader yields (Arrow images are resized)
    seed: int = 0  # sampling, augmentation and (synthetic) identities
    augment: bool = True  # horizontal flip with probability 1/2
    bad_sample: str = "error"  # "error": raise naming file/index | "skip": drop, count and log
    num_workers: int = 2  # DataLoader worker processes (0: load in the training process)
    prefetch_factor: int = 2  # batches each worker loads ahead
    sampling: str = "uniform"  # identities drawn "uniform"ly or proportionally to their image "count"

    # synthetic identities (source="synthetic")
    num_identities: int = 1000
    count_median: float = 16.0  # log-normal images-per-identity: median ...
    count_sigma: float = 0.9  # ... and spread; 0 gives every identity round(count_median) images
    min_images: int = 2
    max_images: int = 400
    doppelganger_fraction: float = 0.1  # share of identities in a planted look-alike pair
    doppelganger_distance: float = 0.3  # 0: identical twins, 1: unrelated
    heldout_identities: int = 1000  # identities reserved for evaluation, disjoint from training
    nuisance: float = 1.0  # strength of pose, light, occlusion and noise variation

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a mapping (a YAML section), rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown data config field(s): {', '.join(unknown)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> "DataConfig":
        def bad(field: str, why: str):
            raise ValueError(f"DataConfig.{field} = {getattr(self, field)!r}: {why}")

        if self.source not in ("synthetic", "arrow"):
            bad("source", 'must be "synthetic" or "arrow"')
        if self.source == "arrow" and not self.path:
            bad("path", 'an Arrow dataset directory is required when source="arrow"')
        if not isinstance(self.image_size, int) or self.image_size < 8:
            bad("image_size", "must be an integer >= 8")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be a non-negative integer")
        if self.bad_sample not in ("error", "skip"):
            bad("bad_sample", 'must be "error" or "skip"')
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "must be a non-negative integer")
        if not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1:
            bad("prefetch_factor", "must be an integer >= 1")
        if self.sampling not in ("uniform", "count"):
            bad("sampling", 'must be "uniform" or "count"')
        if not isinstance(self.num_identities, int) or self.num_identities < 1:
            bad("num_identities", "must be a positive integer")
        if not self.count_median > 0:
            bad("count_median", "must be > 0")
        if not self.count_sigma >= 0:
            bad("count_sigma", "must be >= 0")
        if not isinstance(self.min_images, int) or self.min_images < 1:
            bad("min_images", "must be an integer >= 1")
        if not isinstance(self.max_images, int) or not self.min_images <= self.max_images < 1 << 20:
            bad("max_images", "must be an integer in [min_images, 2**20)")
        if not 0.0 <= self.doppelganger_fraction <= 1.0:
            bad("doppelganger_fraction", "must be in [0, 1]")
        if not 0.0 <= self.doppelganger_distance <= 1.0:
            bad("doppelganger_distance", "must be in [0, 1]")
        if not isinstance(self.heldout_identities, int) or self.heldout_identities < 0:
            bad("heldout_identities", "must be a non-negative integer")
        if not self.nuisance >= 0:
            bad("nuisance", "must be >= 0")
        return self

    def synthetic_kwargs(self) -> dict:
        """Keyword arguments of ``SyntheticIdentities`` taken from this config."""
        return dict(
            num_identities=self.num_identities, image_size=self.image_size, seed=self.seed,
            count_median=self.count_median, count_sigma=self.count_sigma,
            min_images=self.min_images, max_images=self.max_images,
            doppelganger_fraction=self.doppelganger_fraction,
            doppelganger_distance=self.doppelganger_distance,
            heldout_identities=self.heldout_identities, nuisance=self.nuisance,
        )

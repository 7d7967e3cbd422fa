"""Verification sets (LFW, CFP-FP, AgeDB-30 ``.bin`` files or arrays) and their standard evaluation.

``evaluate_verification`` is what both ``python -m pm_dist.evaluate`` and the training loop call: embed
the set on all ranks (``eval/embed.py``), then compute the insightface protocol (``eval/protocol.py``)
and the ROC over all pairs (``eval/roc.py``) identically on every rank.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .binfile import read_bin
from .embed import extract_embeddings, slowest_rank_seconds
from .images import check_image_array, decode_all
from .protocol import insightface_line, verification_metrics
from .roc import roc_metrics


@dataclass
class VerificationSet:
    """A named list of image pairs: images 2i and 2i+1 form pair i, ``issame[i]`` says if they match.

    ``images`` is uint8 [2n, H, W, 3] RGB, or a list of encoded images (JPEG/PNG bytes), decoded here
    (resized to ``image_size`` × ``image_size`` when given).
    """

    name: str
    images: np.ndarray
    issame: np.ndarray
    image_size: int | None = field(default=None, repr=False)

    def __post_init__(self):
        if not (isinstance(self.images, np.ndarray) and self.images.ndim == 4):  # encoded images
            self.images = decode_all(list(self.images), self.image_size, self.name)
        self.images = check_image_array(self.images, self.name)
        self.issame = np.asarray(self.issame, dtype=bool).ravel()
        n_img = self.images.shape[0]
        if n_img % 2:
            raise ValueError(f"{self.name}: odd number of images ({n_img}); pairs are consecutive images")
        if n_img != 2 * self.issame.size:
            raise ValueError(f"{self.name}: {n_img} images make {n_img // 2} pairs, but {self.issame.size} flags")
        if self.image_size is not None and self.images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: images are {self.images.shape[2]}x{self.images.shape[1]}, "
                f"expected {self.image_size}x{self.image_size}"
            )

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    @classmethod
    def from_arrays(cls, name: str, images: np.ndarray, issame) -> "VerificationSet":
        """From decoded arrays, e.g. ``SyntheticIdentities.verification_pairs``."""
        return cls(name, np.asarray(images), np.asarray(issame))


def load_bin(path: str | os.PathLike, image_size: int = 112, name: str | None = None) -> VerificationSet:
    """Read an insightface ``.bin`` (``lfw.bin`` → set named ``lfw``), decoding every image.

    Errors name the problem: mismatched list lengths, an odd number of images, the index of an image
    that cannot be decoded. Decoded, a set takes 2n·S²·3 bytes (LFW at 112: 450 MB) on every rank.
    """
    path = os.fspath(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    bins, issame = read_bin(path)
    images = decode_all(bins, image_size, f"{path}:")
    return VerificationSet(name, images, issame, image_size)


def evaluate_verification(
    model, vset: VerificationSet, batch_size: int = 64, device="cpu", flip: bool = True,
    nfolds: int = 10, tar_method: str = "nearest",
) -> dict:
    """Standard protocol on one set; every rank must call it, every rank returns the same dict.

    Keys (besides the protocol's, see ``protocol.verification_metrics_from_distances``): ``name``,
    ``kind`` = "verification", ``xnorm``, ``insightface_line`` (the line insightface logs),
    ``tar_at_far`` over all pairs, ``auc``, ``curve`` (ROC for the plot), ``seconds``.
    """
    start = time.perf_counter()
    emb = extract_embeddings(model, vset.images, batch_size, device, flip)
    embeddings = emb.normalized()
    metrics = verification_metrics(embeddings, vset.issame, nfolds)
    if vset.issame.any() and not vset.issame.all():
        cosine = np.sum(embeddings[0::2] * embeddings[1::2], axis=1)
        roc = roc_metrics(vset.issame, cosine, method=tar_method)
    else:  # a ROC needs both kinds of pair
        roc = {"tar_at_far": {}, "tar_method": tar_method, "auc": None, "curve": None}
    return {
        "name": vset.name,
        "kind": "verification",
        "protocol": f"{nfolds}-fold, flip={'on' if flip else 'off'}, insightface thresholds",
        **metrics,
        "xnorm": emb.xnorm(),
        "insightface_line": insightface_line(vset.name, metrics),
        "tar_at_far": roc["tar_at_far"],
        "tar_method": roc["tar_method"],
        "auc": roc["auc"],
        "curve": roc["curve"],
        "seconds": slowest_rank_seconds(start),
    }


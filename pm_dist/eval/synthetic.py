"""Evaluation on the built-in synthetic held-out identities (``pm_dist.data.synthetic``).

Held-out identities are disjoint from every training identity by construction, so this works for any
model trained on the synthetic data without a download. Two results:

* ``synthetic-pairs``: LFW-style pairs (``verification_pairs``) under the standard 10-fold protocol,
  with TAR@FAR over all pairs.
* ``synthetic-1n``: open-set 1:N identification. The dataset's identification split gives one gallery
  image and ``probes_per_id`` probe images per identity; only the first ``enrolled_fraction`` of the
  identities are enrolled in the gallery, so the probes of the others are non-mated searches and
  TPIR@FPIR is measurable, as in IJB-C's mixed probe set.

The dataset object is passed in (duck-typed), so ``eval/`` does not import ``data/``.
"""

from __future__ import annotations

import numpy as np

from .identification import evaluate_identification
from .verification import VerificationSet, evaluate_verification


def evaluate_synthetic(
    model, dataset, num_pairs: int = 600, num_identities: int = 200, probes_per_id: int = 2,
    enrolled_fraction: float = 0.5, seed: int = 0, batch_size: int = 64, device="cpu",
    flip: bool = True, tar_method: str = "nearest",
) -> list[dict]:
    """Both synthetic evaluations (see the module docstring); every rank calls it, same results."""
    if not 0.0 < enrolled_fraction <= 1.0:
        raise ValueError(f"enrolled_fraction must be in (0, 1], got {enrolled_fraction}")
    images, issame = dataset.verification_pairs(num_pairs, seed=seed)
    vset = VerificationSet.from_arrays("synthetic-pairs", images, issame)
    results = [evaluate_verification(model, vset, batch_size, device, flip, tar_method=tar_method)]

    split = dataset.identification_split(num_identities, probes_per_id=probes_per_id, seed=seed)
    enrolled = max(1, int(round(enrolled_fraction * len(split.gallery_labels))))
    results.append(evaluate_identification(
        model, split.gallery[:enrolled], split.gallery_labels[:enrolled],
        split.probes, np.asarray(split.probe_labels), name="synthetic-1n",
        batch_size=batch_size, device=device, flip=flip,
    ))
    return results

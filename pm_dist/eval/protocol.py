"""The standard 10-fold verification protocol of LFW-style sets, exactly as insightface computes it.

Given one embedding per image (pairs consecutive), insightface's ``verification.evaluate`` reports:

* **accuracy**: squared L2 distance between the (already normalized) embeddings of each pair; the pairs
  split *in order* into 10 folds as sklearn's ``KFold(n_splits=10, shuffle=False)`` does (sizes differ
  by at most one, the first ``n % 10`` folds one larger); for each fold the threshold on the grid
  ``np.arange(0, 4, 0.01)`` with the best accuracy on the other 9 folds (the *first* best, ``argmax``)
  is applied to the held-out fold, a pair being called "same" when ``dist < threshold``. Reported as the
  mean ± population std (``np.std``) of the 10 fold accuracies, printed ``%1.5f+-%1.5f``.
* **VAL@FAR=1e-3**: per fold, the threshold reaching FAR = 1e-3 on the 9 training folds (grid
  ``np.arange(0, 4, 0.001)``, linear interpolation of threshold against FAR), then VAL and FAR on the
  held-out fold; mean and std over folds.

Every count below is computed by sorting instead of insightface's loop over thresholds, which gives the
same integers and therefore the same floating-point accuracies, bit for bit.

Where insightface breaks, we are robust and say what we do:

* VAL: insightface calls ``scipy.interpolate.interp1d(far_train, thresholds, kind='slinear')``; the
  training FARs on the grid repeat (they are a step function), which current SciPy rejects. We compute
  what ``interp1d(kind='linear')`` computes on the same data (it accepts the repeats; the tests
  compare with it): the linear interpolation between the *last* grid threshold whose FAR is below the
  target and the *first* whose FAR is above it; when the target equals a FAR on the grid exactly, the
  *last* threshold with that FAR (the widest threshold at that FAR, as ``np.interp``, which SciPy
  uses, takes it). When no grid threshold reaches the target FAR on the training folds, the
  threshold is 0 (insightface's rule), so that fold's VAL and FAR are 0.
* A fold without same (different) pairs has no VAL (FAR); insightface divides by zero. Such folds are
  left out of the VAL (FAR) mean and std; if none remain, the value is NaN.
"""

from __future__ import annotations

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface's grids, built the same way (same floats)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def kfold_splits(n: int, n_splits: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn ``KFold(n_splits, shuffle=False).split(range(n))``: contiguous test folds in order."""
    if n_splits < 2:
        raise ValueError("n_splits must be at least 2")
    if n < n_splits:
        raise ValueError(f"{n} pairs cannot be split into {n_splits} folds")
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    indices = np.arange(n)
    splits, start = [], 0
    for size in sizes:
        test = indices[start : start + size]
        train = np.concatenate([indices[:start], indices[start + size :]])
        splits.append((train, test))
        start += size
    return splits


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows to unit L2 norm in float64, as ``sklearn.preprocessing.normalize`` (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, np.newaxis]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of consecutive rows (pairs 2i, 2i+1), float64."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] % 2:
        raise ValueError(f"embeddings must be [2n, D], got {list(e.shape)}")
    diff = np.subtract(e[0::2], e[1::2])
    return np.sum(np.square(diff), 1)


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t, how many values are ``< t`` (what ``np.sum(values < t)`` counts)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _accuracies(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """insightface ``calculate_accuracy`` for every threshold: (tp + tn) / n."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    tp = _count_below(pos, thresholds)
    tn = neg.size - _count_below(neg, thresholds)
    return (tp + tn).astype(np.float64) / dist.size


def _tpr_fpr(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """insightface ``calculate_accuracy``'s tpr and fpr for every threshold (0 when undefined)."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    tp = _count_below(pos, thresholds).astype(np.float64)
    fp = _count_below(neg, thresholds).astype(np.float64)
    tpr = tp / pos.size if pos.size else np.zeros_like(tp)
    fpr = fp / neg.size if neg.size else np.zeros_like(fp)
    return tpr, fpr


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold at which the (non-decreasing) FAR curve reaches ``far_target``; 0 if it never does.

    ``interp1d(far, thresholds, kind='linear')(far_target)`` (``np.interp``'s arithmetic): with j the
    last index whose FAR ≤ target, ``thresholds[j]`` on an exact hit, else the linear interpolation
    between j and j + 1 (see the module docstring).
    """
    if not np.isfinite(far).any() or np.nanmax(far) < far_target:
        return 0.0
    j = int(np.searchsorted(far, far_target, side="right")) - 1
    if j < 0:  # the grid starts above the target (insightface's grid starts at FAR 0)
        return float(thresholds[0])
    if far[j] == far_target:
        return float(thresholds[j])
    slope = (thresholds[j + 1] - thresholds[j]) / (far[j + 1] - far[j])
    return float(slope * (far_target - far[j]) + thresholds[j])


def _val_far(dist: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    accept = dist < threshold
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    val = float(np.sum(accept & issame)) / n_same if n_same else float("nan")
    far = float(np.sum(accept & ~issame)) / n_diff if n_diff else float("nan")
    return val, far


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def verification_metrics_from_distances(
    dist: np.ndarray, issame, nfolds: int = 10, far_target: float = 1e-3
) -> dict:
    """The protocol on per-pair squared distances. Returns plain Python numbers and lists.

    Keys: ``accuracy``, ``accuracy_std``, ``fold_accuracy``, ``fold_threshold`` (the distance threshold
    chosen per fold), ``val``, ``val_std``, ``far`` (mean held-out FAR at the VAL threshold), ``tpr`` and
    ``fpr`` (insightface's ROC: per-threshold rates averaged over the held-out folds, on
    ``ACC_THRESHOLDS``), ``num_pairs``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if dist.shape != issame.shape or dist.ndim != 1:
        raise ValueError(f"{dist.shape[0]} distances but {issame.shape[0]} same/different flags")
    splits = kfold_splits(dist.size, nfolds)

    fold_acc = np.zeros(nfolds)
    fold_thr = np.zeros(nfolds)
    tprs = np.zeros((nfolds, ACC_THRESHOLDS.size))
    fprs = np.zeros((nfolds, ACC_THRESHOLDS.size))
    vals = np.zeros(nfolds)
    fars = np.zeros(nfolds)
    for k, (train, test) in enumerate(splits):
        best = int(np.argmax(_accuracies(dist[train], issame[train], ACC_THRESHOLDS)))
        fold_thr[k] = ACC_THRESHOLDS[best]
        fold_acc[k] = _accuracies(dist[test], issame[test], ACC_THRESHOLDS[best : best + 1])[0]
        tprs[k], fprs[k] = _tpr_fpr(dist[test], issame[test], ACC_THRESHOLDS)

        train_neg = np.sort(dist[train][~issame[train]])
        if train_neg.size:
            far_train = _count_below(train_neg, VAL_THRESHOLDS).astype(np.float64) / train_neg.size
        else:
            far_train = np.full(VAL_THRESHOLDS.size, np.nan)
        threshold = threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        vals[k], fars[k] = _val_far(dist[test], issame[test], threshold)

    val, val_std = _mean_std(vals)
    far, _ = _mean_std(fars)
    return {
        "num_pairs": int(dist.size),
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracy": fold_acc.tolist(),
        "fold_threshold": fold_thr.tolist(),
        "val": val,
        "val_std": val_std,
        "far": far,
        "far_target": far_target,
        "tpr": np.mean(tprs, 0).tolist(),
        "fpr": np.mean(fprs, 0).tolist(),
    }


def verification_metrics(embeddings: np.ndarray, issame, nfolds: int = 10, far_target: float = 1e-3) -> dict:
    """The protocol on normalized embeddings [2n, D] (pairs consecutive), as insightface's ``evaluate``."""
    return verification_metrics_from_distances(pair_distances(embeddings), issame, nfolds, far_target)


def insightface_line(name: str, metrics: dict) -> str:
    """The line insightface logs for a set, e.g. ``[lfw]Accuracy-Flip: 0.99817+-0.00229``."""
    return "[%s]Accuracy-Flip: %1.5f+-%1.5f" % (name, metrics["accuracy"], metrics["accuracy_std"])

"""ROC curves and TAR at fixed FAR for any list of scored pairs (IJB-B/C style 1:1 verification).

A score is a similarity (higher = more alike, here the cosine of normalized embeddings); a pair is
accepted when ``score >= threshold``. The ROC is built as ``sklearn.metrics.roc_curve`` builds it (one
point per distinct score, collinear points dropped, a (0, 0) point first), so that the insightface IJB
scripts, which run sklearn on the same scores, give the same curve.

TAR at a target FAR, two readings of the same step-shaped curve (no interpolation in either):

* ``"nearest"`` (default, the insightface IJB convention behind published IJB-B/C tables): the ROC
  point whose FAR is nearest the target, the highest TAR among equally near points. It may sit at a
  FAR slightly above the target.
* ``"floor"``: the highest TAR among operating points (every distinct score as threshold, none
  dropped) whose FAR does not exceed the target; a point one can actually set, never optimistic.

A FAR below 1 / (number of different pairs) cannot be measured on the list; such targets are reported
as ``None`` (insightface prints a number there, the TAR at FAR 0).
"""

from __future__ import annotations

import numpy as np

STANDARD_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TAR_METHODS = ("nearest", "floor")


def roc_curve(labels, scores, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with fpr, tpr non-decreasing, as ``sklearn.metrics.roc_curve``."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not labels.any() or labels.all():
        raise ValueError("a ROC needs both same and different pairs")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity (a diverged model?)")
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    distinct = np.where(np.diff(scores))[0]
    idx = np.r_[distinct, labels.size - 1]
    tps = np.cumsum(labels)[idx]
    fps = 1 + idx - tps
    thresholds = scores[idx]
    if drop_intermediate and fps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float, method: str = "nearest") -> float:
    """TAR of a ROC (from ``roc_curve``) at one target FAR, read as ``method`` says (module docstring)."""
    if method == "nearest":
        # insightface flips the curve and takes the first minimum: among equally near points, the one
        # with the largest FAR index, i.e. the highest TAR.
        f, t = fpr[::-1], tpr[::-1]
        return float(t[int(np.argmin(np.abs(f - far)))])
    if method == "floor":
        ok = fpr <= far
        return float(tpr[ok].max()) if ok.any() else 0.0
    raise ValueError(f"unknown TAR@FAR method {method!r}; choose from {TAR_METHODS}")


def sample_curve(fpr: np.ndarray, tpr: np.ndarray, lowest: float, points: int = 120) -> dict:
    """The ROC at log-spaced FARs from ``lowest`` to 1 ("floor" reading): a bounded curve to plot/store."""
    grid = np.logspace(np.log10(lowest), 0.0, points)
    return {"x": grid.tolist(), "y": [tar_at_far(fpr, tpr, f, "floor") for f in grid]}


def roc_metrics(labels, scores, fars=STANDARD_FARS, method: str = "nearest") -> dict:
    """TAR at each FAR in ``fars`` (``None`` where the FAR cannot be measured), AUC and a curve to plot."""
    if method not in TAR_METHODS:
        raise ValueError(f"unknown TAR@FAR method {method!r}; choose from {TAR_METHODS}")
    labels = np.asarray(labels, dtype=bool).ravel()
    # Every threshold is an operating point: "floor" and the plotted curve use them all. "nearest"
    # reads sklearn's default curve (collinear points dropped), as insightface's scripts do.
    fpr_all, tpr_all, _ = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, _ = roc_curve(labels, scores) if method == "nearest" else (fpr_all, tpr_all, None)
    n_neg = int((~labels).sum())
    n_pos = int(labels.sum())
    tar = {}
    for far in fars:
        tar[far_key(far)] = tar_at_far(fpr, tpr, far, method) if far * n_neg >= 1.0 - 1e-9 else None
    auc = float(np.sum(np.diff(fpr_all) * (tpr_all[1:] + tpr_all[:-1]) / 2.0))
    return {
        "num_pairs": n_pos + n_neg,
        "num_same": n_pos,
        "num_different": n_neg,
        "tar_at_far": tar,
        "tar_method": method,
        "auc": auc,
        "curve": dict(sample_curve(fpr_all, tpr_all, max(1.0 / n_neg, 1e-7)), xlabel="FAR", ylabel="TAR"),
    }


def far_key(far: float) -> str:
    """A stable text key for a FAR (``1e-06``, ``0.001`` ...), used in dicts, JSON and table headers."""
    short = f"{far:.0e}"
    return short if float(short) == far else f"{far:g}"

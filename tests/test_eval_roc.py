"""ROC and TAR@FAR: a small ROC worked out by hand, agreement with scikit-learn's ``roc_curve`` and
``roc_auc_score`` (a test-only dependency: those tests skip without it), and the ROC plot drawn with
matplotlib when installed, with Pillow otherwise."""

import sys

import numpy as np
import pytest
from PIL import Image

from pm_dist.eval.plot import plot_backend, plot_curves
from pm_dist.eval.roc import far_key, roc_curve, roc_metrics, tar_at_far

# 4 same (1) and 6 different (0) pairs, scores descending.
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1])
# Accepting score >= t, t walking down: (FP, TP) = (0,1) (0,2) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4) (5,4) (6,4).
# sklearn drops the collinear (2,3), (4,4), (5,4) and prepends (0,0):
HAND_FPR = np.array([0, 0, 0, 1, 1, 3, 3, 6]) / 6
HAND_TPR = np.array([0, 1, 2, 2, 3, 3, 4, 4]) / 4


def test_roc_curve_hand_checked():
    fpr, tpr, thr = roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(fpr, HAND_FPR)
    np.testing.assert_allclose(tpr, HAND_TPR)
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1])


@pytest.mark.parametrize("far,nearest,floor", [
    (0.2, 0.75, 0.75),   # nearest FAR 1/6; of its two points the higher TAR
    (0.1, 0.75, 0.5),    # nearest (1/6) lies above the target; floor stays at FAR 0
    (0.4, 1.0, 0.75),    # nearest is FAR 1/2 (0.1 away) rather than 1/6 (0.23 away)
    (1e-6, 0.5, 0.5),
])
def test_tar_at_far_hand_checked(far, nearest, floor):
    fpr, tpr, _ = roc_curve(LABELS, SCORES)
    assert tar_at_far(fpr, tpr, far, "nearest") == nearest
    assert tar_at_far(fpr, tpr, far, "floor") == floor


def test_roc_metrics_reports_unmeasurable_fars_as_none():
    m = roc_metrics(LABELS, SCORES, fars=(0.1, 0.2, 0.4), method="nearest")
    # 6 different pairs: the smallest measurable FAR is 1/6
    assert m["tar_at_far"] == {"1e-01": None, "2e-01": 0.75, "4e-01": 1.0}
    assert m["auc"] == pytest.approx(20 / 24)  # 20 of the 24 (same, different) pairs ordered right
    assert (m["num_same"], m["num_different"]) == (4, 6)
    assert m["curve"]["x"][0] == pytest.approx(1 / 6) and m["curve"]["y"][-1] == 1.0


def brute_force_roc(labels, scores):
    pts = {(0.0, 0.0)}
    for t in np.unique(scores):
        acc = scores >= t
        pts.add((np.mean(acc[~labels]), np.mean(acc[labels])))
    return sorted(pts)


@pytest.mark.parametrize("seed", range(4))
def test_full_roc_and_floor_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding makes many ties of both kinds
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    points = np.array(brute_force_roc(labels, scores))
    np.testing.assert_allclose(np.array(sorted(zip(fpr, tpr))), points)
    fars = [0.01, 0.05, 0.1, 0.3]
    floor = roc_metrics(labels, scores, fars=fars, method="floor")["tar_at_far"]
    for far in fars:
        assert floor[far_key(far)] == pytest.approx(points[points[:, 0] <= far, 1].max())


def test_bad_inputs():
    with pytest.raises(ValueError, match="both same and different"):
        roc_curve([True, True], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([True, False], [np.nan, 0.2])
    with pytest.raises(ValueError, match="unknown TAR@FAR method"):
        roc_metrics(LABELS, SCORES, method="linear")


def test_far_keys():
    assert [far_key(f) for f in (1e-6, 1e-3, 0.1, 2.5e-4)] == ["1e-06", "1e-03", "1e-01", "0.00025"]


# --- against scikit-learn -------------------------------------------------------------------------


def _scored_pairs(seed, n=400, decimals=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    scores = rng.normal(labels * 1.2, 1.0)
    if decimals is not None:  # ties within and across the two kinds of pair
        scores = np.round(scores, decimals)
    return labels, scores


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 0), (3, 2)])
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_equals_sklearn(seed, decimals, drop):
    metrics = pytest.importorskip("sklearn.metrics")
    labels, scores = _scored_pairs(seed, decimals=decimals)
    ours = roc_curve(labels, scores, drop_intermediate=drop)
    ref = metrics.roc_curve(labels, scores, drop_intermediate=drop)
    for name, a, b in zip(("fpr", "tpr", "thresholds"), ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=name)  # exact: the same counts and divisions


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (4, 0)])
def test_auc_and_nearest_tar_match_sklearn_and_insightface_reading(seed, decimals):
    metrics = pytest.importorskip("sklearn.metrics")
    labels, scores = _scored_pairs(seed, n=3000, decimals=decimals)
    m = roc_metrics(labels, scores, fars=(1e-3, 1e-2, 1e-1), method="nearest")
    assert m["auc"] == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    # insightface's ijb_11.py on sklearn's curve: flip, then the first index nearest the FAR
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far in (1e-2, 1e-1):
        expected = tpr[np.argmin(np.abs(fpr - far))]
        assert m["tar_at_far"][far_key(far)] == expected


# --- the plot ---------------------------------------------------------------------------------


def _series():
    labels, scores = _scored_pairs(0, n=2000)
    curve = roc_metrics(labels, scores)["curve"]
    return [{"x": curve["x"], "y": curve["y"], "label": "lfw"}]


def test_roc_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_backend() == "matplotlib"
    path = tmp_path / "roc.png"
    assert plot_curves(str(path), "lfw", _series(), "FAR", "TAR") == "matplotlib"
    with Image.open(path) as img:
        assert img.size == (720, 540) and "matplotlib" in img.info.get("Software", "").lower()
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert (np.abs(rgb - (31, 119, 180)).sum(axis=2) == 0).sum() > 200  # the curve is drawn


def test_roc_plot_falls_back_to_pillow_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert plot_backend() == "pillow"
    path = tmp_path / "roc.png"
    assert plot_curves(str(path), "lfw", _series(), "FAR", "TAR") == "pillow"
    with Image.open(path) as img:
        assert img.size == (720, 540) and "Software" not in img.info
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert (np.abs(rgb - (31, 119, 180)).sum(axis=2) == 0).sum() > 200
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_backend("matplotlib")


def test_pillow_drawing_is_forced_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PM_DIST_PLOT", "pillow")
    assert plot_curves(str(tmp_path / "roc.png"), "lfw", _series(), "FAR", "TAR") == "pillow"
    monkeypatch.setenv("PM_DIST_PLOT", "svg")
    with pytest.raises(ValueError, match="plot backend 'svg'"):
        plot_backend()

"""ROC and TAR@FAR against a small ROC worked out by hand."""

import numpy as np
import pytest

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

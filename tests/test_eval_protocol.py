"""The 10-fold verification protocol: a hand-computed case, and agreement to the bit with
insightface's ``calculate_roc`` / ``calculate_val`` (``reference_evaluate`` below), which splits with
scikit-learn's ``KFold`` and interpolates with SciPy's ``interp1d``. Those two are test-only
dependencies (``pip install -e .[test]``); the fold layout and interpolation tests skip without them,
and ``reference_evaluate`` then falls back to plain transcriptions of the two calls, which the
library tests check against the libraries where they are installed."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pm_dist.eval.protocol import (
    ACC_THRESHOLDS,
    VAL_THRESHOLDS,
    insightface_line,
    kfold_splits,
    l2_normalize,
    threshold_at_far,
    verification_metrics,
    verification_metrics_from_distances,
)

try:
    from sklearn.model_selection import KFold
except ImportError:
    KFold = None
try:
    from scipy.interpolate import interp1d
except ImportError:
    interp1d = None

# --- the reference: insightface's code, with the libraries it calls ---------------------------


def transcribed_folds(n, k=10):
    """KFold(k, shuffle=False) test folds as np.array_split builds them (first folds larger)."""
    return np.array_split(np.arange(n), k)


def reference_folds(n, k=10):
    """Test folds of ``KFold(n_splits=k, shuffle=False)``, as insightface splits the pairs."""
    if KFold is None:
        return transcribed_folds(n, k)
    return [test for _, test in KFold(n_splits=k, shuffle=False).split(np.arange(n))]


def transcribed_interp_linear(x, y, x_new):
    """scipy.interpolate.interp1d(x, y, kind='linear')(x_new) for one point inside the data, as
    SciPy computes it for 1-D data: np.interp on the x-sorted points."""
    order = np.argsort(x, kind="mergesort")
    return np.interp(x_new, x[order], y[order])


def reference_interp_linear(x, y, x_new):
    """insightface's ``interp1d(far_train, thresholds, kind='slinear')(far_target)``, with
    kind='linear', which SciPy still accepts on the repeated FARs (see the module docstring of
    pm_dist.eval.protocol)."""
    if interp1d is None:
        return transcribed_interp_linear(x, y, x_new)
    return interp1d(x, y, kind="linear")(x_new)


def reference_evaluate(dist, issame, nfolds=10, far_target=1e-3):
    """insightface's calculate_roc / calculate_val: every threshold compared against every pair
    (a broadcast instead of its Python loop, same counts)."""
    issame = np.asarray(issame, dtype=bool)
    n = dist.size
    folds = reference_folds(n, nfolds)
    acc, thr, val, far = [], [], [], []
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        pred = dist[train][None, :] < ACC_THRESHOLDS[:, None]  # [threshold, pair]
        tp = np.sum(pred & issame[train], axis=1)
        tn = np.sum(~pred & ~issame[train], axis=1)
        train_acc = [float(a + b) / train.size for a, b in zip(tp, tn)]
        best = ACC_THRESHOLDS[int(np.argmax(train_acc))]
        pred = dist[test] < best
        acc.append(float(np.sum(pred & issame[test]) + np.sum(~pred & ~issame[test])) / test.size)
        thr.append(best)

        grid = np.arange(0, 4, 0.001)  # insightface's VAL grid
        fa = np.sum((dist[train][None, :] < grid[:, None]) & ~issame[train], axis=1)
        far_train = np.array([float(x) / np.sum(~issame[train]) for x in fa])
        reached = far_train.max() >= far_target
        t_far = float(reference_interp_linear(far_train, grid, far_target)) if reached else 0.0
        pred = dist[test] < t_far
        val.append(float(np.sum(pred & issame[test])) / float(np.sum(issame[test])))
        far.append(float(np.sum(pred & ~issame[test])) / float(np.sum(~issame[test])))
    return {"accuracy": np.mean(acc), "accuracy_std": np.std(acc), "fold_accuracy": acc,
            "fold_threshold": thr, "val": np.mean(val), "val_std": np.std(val), "far": np.mean(far)}


def assert_same_as_reference(got, ref):
    for key in ("accuracy", "accuracy_std", "val", "val_std", "far"):
        assert got[key] == ref[key], key  # bit-identical, not approximately
    assert got["fold_accuracy"] == ref["fold_accuracy"]
    assert got["fold_threshold"] == ref["fold_threshold"]


# --- fold layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 21, 57, 6000])
def test_folds_match_sklearn_kfold_layout(n):
    splits = kfold_splits(n)
    expected = reference_folds(n)
    assert [len(t) for _, t in splits] == [len(t) for t in expected]
    for (train, test), ref in zip(splits, expected):
        assert np.array_equal(test, ref)
        assert np.array_equal(np.sort(np.r_[train, test]), np.arange(n))


@pytest.mark.parametrize("n", [10, 21, 57, 6000, 7001])
def test_folds_equal_sklearn_kfold(n):
    if KFold is None:
        pytest.skip("scikit-learn is not installed (a test-only dependency)")
    for (train, test), (ref_train, ref_test) in zip(
            kfold_splits(n), KFold(n_splits=10, shuffle=False).split(np.arange(n)), strict=True):
        np.testing.assert_array_equal(test, ref_test)
        np.testing.assert_array_equal(train, ref_train)
    assert [len(t) for t in transcribed_folds(n)] == [len(t) for _, t in kfold_splits(n)]


def _training_fars(seed, n_neg):
    """A training split's FAR on insightface's VAL grid: a step function full of repeats."""
    rng = np.random.default_rng(seed)
    neg = np.sort(rng.uniform(0.5, 3.5, n_neg))
    return np.searchsorted(neg, VAL_THRESHOLDS, side="left") / n_neg


@pytest.mark.parametrize("seed,n_neg,target", [(0, 2700, 1e-3), (1, 2700, 5e-3), (2, 300, 1e-3),
                                               (3, 5000, 1e-2), (4, 2700, 1 / 2700)])
def test_val_threshold_equals_scipy_interp1d(seed, n_neg, target):
    if interp1d is None:
        pytest.skip("SciPy is not installed (a test-only dependency)")
    far = _training_fars(seed, n_neg)
    expected = float(interp1d(far, VAL_THRESHOLDS, kind="linear")(target))
    assert threshold_at_far(far, VAL_THRESHOLDS, target) == expected  # the same arithmetic, bit for bit
    assert float(transcribed_interp_linear(far, VAL_THRESHOLDS, target)) == expected


def test_scipy_slinear_rejects_the_repeated_fars():
    """What docs/evaluation.md says: insightface's kind='slinear' fails on these FARs today."""
    if interp1d is None:
        pytest.skip("SciPy is not installed (a test-only dependency)")
    far = _training_fars(0, 2700)
    with pytest.raises(ValueError):
        interp1d(far, VAL_THRESHOLDS, kind="slinear")(1e-3)


def test_too_few_pairs_is_an_error():
    with pytest.raises(ValueError, match="9 pairs cannot be split into 10 folds"):
        kfold_splits(9)


# --- hand-computed case ----------------------------------------------------------------------


def hand_case():
    """21 pairs → folds of 3, 2, 2, ... . Same pairs at distance 0.5, different at 2.5, except
    pair 0: a 'same' pair at distance 3.0 that no useful threshold accepts."""
    issame = np.arange(21) % 2 == 0
    dist = np.where(issame, 0.5, 2.5)
    dist[0] = 3.0
    return dist, issame


def test_hand_computed_accuracy():
    dist, issame = hand_case()
    m = verification_metrics_from_distances(dist, issame)
    # Every training split is best at any t in (0.5, 2.5]; argmax takes the first: 0.51.
    assert m["fold_threshold"] == [ACC_THRESHOLDS[51]] * 10
    assert ACC_THRESHOLDS[51] == pytest.approx(0.51)
    # Fold 0 = pairs 0, 1, 2: the outlier is misjudged → 2/3; all other folds are right.
    assert m["fold_accuracy"] == pytest.approx([2 / 3] + [1.0] * 9, abs=1e-15)
    assert m["accuracy"] == pytest.approx(29 / 30)
    assert m["accuracy_std"] == pytest.approx(0.1)  # sqrt((9·(1/30)² + (9/30)²) / 10)
    assert insightface_line("hand", m) == "[hand]Accuracy-Flip: 0.96667+-0.10000"


def test_hand_computed_val_interpolates_between_bracketing_thresholds():
    dist, issame = hand_case()
    m = verification_metrics_from_distances(dist, issame)
    # Training FAR is 0 up to t = 2.5 and 1 from t = 2.501: FAR = 1e-3 is reached by interpolation at
    # t = 2.5 + 0.001·0.001 > 2.5, which accepts every pair at 2.5 (so held-out FAR is 1).
    # Held-out VAL: 1/2 in fold 0 (the outlier), 1 elsewhere.
    assert m["val"] == pytest.approx(0.95)
    assert m["val_std"] == pytest.approx(0.15)
    assert m["far"] == 1.0


def test_threshold_at_far_with_repeated_fars():
    thresholds = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    far = np.array([0.0, 0.0, 0.0, 0.5, 0.5])  # repeats: what made interp1d fail
    assert threshold_at_far(far, thresholds, 0.25) == pytest.approx(0.25)
    assert threshold_at_far(far, thresholds, 0.5) == pytest.approx(0.4)  # exact hit: the last at 0.5
    assert threshold_at_far(far, thresholds, 0.0) == pytest.approx(0.2)
    assert threshold_at_far(far, thresholds, 0.6) == 0.0  # never reached: insightface's 0


def test_unreachable_far_gives_zero_val():
    issame = np.arange(20) % 2 == 0
    dist = np.where(issame, 0.5, 3.9995)  # no grid threshold (max 3.999) accepts a different pair
    m = verification_metrics_from_distances(dist, issame)
    assert (m["val"], m["far"]) == (0.0, 0.0)
    assert m["accuracy"] == 1.0


def test_fold_without_same_pairs_is_left_out_of_val():
    issame = np.zeros(20, dtype=bool)
    issame[4:] = np.arange(16) % 2 == 0  # folds 0 and 1 (pairs 0-3) hold only different pairs
    dist = np.where(issame, 0.5, 2.5)
    m = verification_metrics_from_distances(dist, issame)
    assert np.isfinite(m["val"]) and m["val"] == 1.0


# --- agreement with the reference ------------------------------------------------------------


def synthetic_embeddings(seed, n, d=8, noise=0.8):
    rng = np.random.default_rng(seed)
    issame = np.arange(n) % 2 == 0  # every fold of 2+ pairs has both kinds (the reference needs it)
    a = rng.standard_normal((n, d))
    b = np.where(issame[:, None], a + noise * rng.standard_normal((n, d)), rng.standard_normal((n, d)))
    emb = np.empty((2 * n, d))
    emb[0::2], emb[1::2] = a, b
    return l2_normalize(emb), issame


@pytest.mark.parametrize("seed,n", [(0, 20), (1, 23), (2, 57), (3, 300)])
def test_matches_reference_on_embeddings(seed, n):
    emb, issame = synthetic_embeddings(seed, n)
    assert_same_as_reference(verification_metrics(emb, issame), reference_evaluate(
        np.sum((emb[0::2] - emb[1::2]) ** 2, 1), issame))


@settings(max_examples=12, deadline=None)
@given(st.integers(20, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 400), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n))))
def test_matches_reference_with_distances_on_the_grid(case):
    # distances that are multiples of 0.01 land exactly on thresholds: checks the strict "dist < t"
    steps, same = case
    dist = np.asarray(steps) * 0.01
    issame = np.asarray(same)
    for fold in reference_folds(dist.size):  # both kinds in every fold, else the reference divides by 0
        issame[fold[0]], issame[fold[1]] = True, False
    assert_same_as_reference(verification_metrics_from_distances(dist, issame), reference_evaluate(dist, issame))


def test_matches_reference_where_the_far_target_is_hit_exactly():
    """Fold 0 trains on exactly 2000 different pairs, so FAR 1e-3 = 2/2000 is a value the training
    FAR takes on a run of grid thresholds: the reading of that plateau matters (the last one)."""
    rng = np.random.default_rng(7)
    issame = np.ones(3000, dtype=bool)
    issame[rng.choice(300, 100, replace=False)] = False  # fold 0 (pairs 0-299): 100 different
    issame[300 + rng.choice(2700, 2000, replace=False)] = False  # 2000 in the other folds
    dist = np.where(issame, rng.uniform(0.2, 1.6, 3000), rng.uniform(1.5, 3.9, 3000))
    neg_later = 300 + np.flatnonzero(~issame[300:])
    dist[neg_later[:2]] = 1.0003, 1.0205  # FAR 2/2000 for every grid threshold in (1.0205, 1.5]
    train_neg = np.sort(dist[300:][~issame[300:]])
    far_train = np.searchsorted(train_neg, VAL_THRESHOLDS, side="left") / train_neg.size
    assert (far_train == 1e-3).sum() > 1  # a plateau at the target
    assert_same_as_reference(verification_metrics_from_distances(dist, issame), reference_evaluate(dist, issame))

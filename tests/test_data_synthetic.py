"""Synthetic identities: exact determinism, long tail, planted look-alikes, held-out evaluation sets."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from pm_dist.data.synthetic import HELDOUT_BASE, SyntheticIdentities

# sha256 over a fixed set of renders and counts (see fingerprint()): computed once on an x86-64
# Linux machine. The renderer uses only IEEE-exact arithmetic, so any machine must reproduce it;
# a change here means the generator's output changed (bump the version in docs/data.md).
GOLDEN = "e9aa3b8df8438a0bebcf76d7bcb2042d6cd2c50313f65eea5401bd6d117f5dce"

FINGERPRINT = """
import hashlib, numpy as np
from pm_dist.data.synthetic import SyntheticIdentities
def fingerprint():
    h = hashlib.sha256()
    for S in (32, 112):
        g = SyntheticIdentities(10**7, S, seed=7)
        for c, k in [(0, 0), (1, 5), (12345, 2), (9_999_999, 3)]:
            h.update(g.render(c, k).tobytes())
        h.update(g.render_heldout(3, 1).tobytes())
        h.update(g.counts(np.arange(1000)).tobytes())
    return h.hexdigest()
"""
exec(FINGERPRINT)


def test_same_bytes_in_every_process_and_on_record():
    here = fingerprint()  # noqa: F821 - defined by exec above, shared verbatim with the child
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", FINGERPRINT + "print(fingerprint())"],
                           capture_output=True, text=True, cwd=root, check=True,
                           env={**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "123"})
    assert child.stdout.strip() == here
    assert here == GOLDEN


def test_counts_are_long_tailed_and_vectorised():
    g = SyntheticIdentities(10**6, 16)
    counts = g.counts(np.arange(10**6))
    assert counts.dtype == np.int64 and counts.min() >= 2 and counts.max() <= 400
    assert 20 < counts.mean() < 28  # WebFace42M: ~21 images per identity
    median, p99 = np.percentile(counts, [50, 99])
    assert median == 16 and p99 > 6 * median  # a heavy tail
    np.testing.assert_array_equal(g.counts([5, 999_999, 5]), counts[[5, 999_999, 5]])
    flat = SyntheticIdentities(100, 16, count_sigma=0.0, count_median=7).counts(np.arange(100))
    assert (flat == 7).all()
    with pytest.raises(IndexError):
        g.counts([10**6])


def test_planted_doppelgangers_are_closer_than_random_pairs():
    g = SyntheticIdentities(4000, 32, doppelganger_fraction=0.1, doppelganger_distance=0.3)
    pairs = g.doppelganger_pairs()
    assert 150 < len(pairs) < 250 and (pairs[:, 1] == pairs[:, 0] + 1).all()
    planted = set(pairs[:, 0].tolist())
    np.testing.assert_array_equal(g.twin_key(pairs[:, 0]), pairs[:, 1])
    np.testing.assert_array_equal(g.twin_key(pairs[:, 1]), pairs[:, 0])
    assert all(g.twin_key(c) == -1 for c in range(0, 200, 2) if c not in planted)

    def dist(a, b):
        return np.abs(g.frontal(a).astype(np.float64) - g.frontal(b)).mean()

    twins = np.array([dist(a, b) for a, b in pairs[:60]])
    rng = np.random.default_rng(0)
    randoms = np.array([dist(*rng.choice(4000, 2, replace=False)) for _ in range(60)])
    assert twins.mean() < 0.5 * randoms.mean()
    assert (twins > 0).all()  # look-alikes, not copies


def test_heldout_identities_are_disjoint_and_independent_of_training_size():
    small, large = SyntheticIdentities(10, 24), SyntheticIdentities(50_000, 24)
    np.testing.assert_array_equal(small.render_heldout(4, 2), large.render_heldout(4, 2))
    assert not np.array_equal(small.render_heldout(4, 2), small.render(4, 2))
    assert not np.array_equal(small.frontal(HELDOUT_BASE + 4), small.frontal(4))
    with pytest.raises(IndexError):
        small.render_heldout(small.heldout_identities, 0)
    with pytest.raises(IndexError):
        small.render(10, 0)


def test_verification_pairs_are_laid_out_like_bin_sets():
    g = SyntheticIdentities(100, 24, nuisance=0.0, heldout_identities=50)
    images, issame = g.verification_pairs(40, seed=1)
    assert images.shape == (80, 24, 24, 3) and images.dtype == np.uint8
    assert issame.dtype == bool and issame.sum() == 20
    # nuisance 0: the head is frontal and evenly lit, so its centre is identical in two images of
    # one identity and (almost always) different between identities
    centre = images[:, 9:15, 9:15].reshape(40, 2, -1)
    same_centre = (centre[:, 0] == centre[:, 1]).all(axis=1)
    np.testing.assert_array_equal(same_centre[issame], True)
    assert (~same_centre[~issame]).mean() > 0.9
    again, _ = g.verification_pairs(40, seed=1)
    other, _ = g.verification_pairs(40, seed=2)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    hard = SyntheticIdentities(100, 24, heldout_identities=400, doppelganger_fraction=0.5)
    assert hard.verification_pairs(10, hard_fraction=1.0)[0].shape == (20, 24, 24, 3)


def test_identification_split():
    g = SyntheticIdentities(10, 16, nuisance=0.0, heldout_identities=30)
    split = g.identification_split(12, probes_per_id=2, seed=3)
    assert split.gallery.shape == (12, 16, 16, 3) and split.probes.shape == (24, 16, 16, 3)
    assert len(set(split.gallery_labels.tolist())) == 12 and split.gallery_labels.max() < 30
    np.testing.assert_array_equal(split.probe_labels, np.repeat(split.gallery_labels, 2))
    for i, label in enumerate(split.probe_labels):
        j = int(np.flatnonzero(split.gallery_labels == label)[0])
        np.testing.assert_array_equal(split.probes[i, 6:10, 6:10], split.gallery[j, 6:10, 6:10])
    with pytest.raises(ValueError, match="num_identities must be in"):
        g.identification_split(31)


def test_no_subnormal_floats_and_cache_is_not_pickled():
    # subnormals would make the output depend on a process's flush-to-zero mode
    g = SyntheticIdentities(1000, 32)
    for c in range(0, 1000, 37):
        layer = g.layer(c)
        tiny = (layer != 0) & (np.abs(layer) < np.finfo(np.float32).tiny)
        assert not tiny.any()
    assert len(g._cache) > 0
    clone = pickle.loads(pickle.dumps(g))
    assert len(clone._cache) == 0 and np.array_equal(clone.render(3, 3), g.render(3, 3))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="doppelganger_fraction"):
        SyntheticIdentities(10, doppelganger_fraction=1.5)
    with pytest.raises(ValueError, match="min_images"):
        SyntheticIdentities(10, min_images=5, max_images=3)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticIdentities(10, image_size=4)

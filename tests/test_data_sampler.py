"""The P×K sampler: rank slices, resumption, batch structure, reachability, weighting, proposer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pm_dist.data.datasets import SyntheticDataset
from pm_dist.data.index import ContiguousIndex
from pm_dist.data.sampler import PKSampler
from pm_dist.data.synthetic import SyntheticIdentities, lognormal_count_cdf


def long_tail_counts(n: int, seed: int = 0) -> np.ndarray:
    """WebFace-like counts: log-normal, 2..400 (the synthetic generator's default shape)."""
    cdf = lognormal_count_cdf(16.0, 0.9, 2, 400)
    return 2 + np.searchsorted(cdf, np.random.default_rng(seed).random(n), side="right")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_tile_the_global_batch(world_size):
    index = ContiguousIndex(long_tail_counts(300))
    P, K = 12, 4
    for step in (0, 1, 17, 1000):
        ref = PKSampler(index, P, K, seed=5).global_batch(step)
        parts = [PKSampler(index, P, K, world_size, r, seed=5).local_batch(step) for r in range(world_size)]
        assert all(len(p.indices) == P * K // world_size for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.indices for p in parts]), ref.indices)
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), ref.labels)


def test_resuming_at_step_s_replays_s_and_after():
    index = ContiguousIndex(long_tail_counts(500))
    straight = PKSampler(index, 16, 4, 2, 1, seed=9)
    history = [straight.local_batch(s) for s in range(12)]
    resumed = PKSampler(index, 16, 4, 2, 1, seed=9)  # a new process that starts at step 7
    for s in range(7, 12):
        b = resumed.local_batch(s)
        np.testing.assert_array_equal(b.indices, history[s].indices)
        np.testing.assert_array_equal(b.labels, history[s].labels)
    other_seed = PKSampler(index, 16, 4, 2, 1, seed=10).local_batch(7)
    assert not np.array_equal(other_seed.indices, history[7].indices)


def check_pk_structure(index: ContiguousIndex, sampler: PKSampler, step: int) -> None:
    b = sampler.global_batch(step)
    P, K = sampler.P, sampler.K
    labels = b.labels.reshape(P, K)
    assert (labels == labels[:, :1]).all()  # K consecutive samples per identity
    classes = labels[:, 0]
    assert len(np.unique(classes)) == P  # P distinct identities
    assert (index.counts(classes) >= 2).all()  # a prototype from two distinct images at least
    np.testing.assert_array_equal(index.class_of(b.indices), b.labels)  # each image is its identity's
    rows = b.indices.reshape(P, K)
    for c, r in zip(classes, rows):
        n = int(index.counts([c])[0])
        if n >= K:
            assert len(set(r)) == K  # distinct images when there are enough
        else:
            assert set(r) == set(range(index.starts()[c], index.starts()[c] + n))  # all n, then repeats


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=4, max_size=60),
    P=st.integers(1, 8), K=st.integers(2, 6), W=st.sampled_from([1, 2, 4]),
    weighting=st.sampled_from(["uniform", "count"]), step=st.integers(0, 10**6),
)
def test_pk_structure_holds(counts, P, K, W, weighting, step):
    counts = np.asarray(counts)
    counts[0] = max(counts[0], 1)
    index = ContiguousIndex(counts)
    eligible = int((counts >= 2).sum())
    if P > eligible or (P * K) % W:
        with pytest.raises(ValueError):
            PKSampler(index, P, K, W, 0, weighting=weighting)
        return
    check_pk_structure(index, PKSampler(index, P, K, W, W - 1, seed=step % 7, weighting=weighting), step)


def test_clear_errors_for_bad_shapes():
    index = ContiguousIndex(np.full(10, 5))
    with pytest.raises(ValueError, match=r"P\*K = 3\*3 = 9 does not split equally over 2 ranks"):
        PKSampler(index, 3, 3, world_size=2)
    with pytest.raises(ValueError, match="K .* must be an integer >= 2"):
        PKSampler(index, 4, 1)
    with pytest.raises(ValueError, match="only 10 identities with at least 2 images"):
        PKSampler(index, 11, 2)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(index, 4, 2, world_size=2, rank=2)


def test_long_tailed_identities_and_images_are_all_reachable():
    counts = long_tail_counts(400, seed=1)
    assert counts.max() > 10 * np.median(counts)  # really long-tailed
    index = ContiguousIndex(counts)
    sampler = PKSampler(index, 32, 4, 4, 2, seed=0)
    seen_classes, seen_rows = set(), set()
    for step in range(200):
        b = sampler.global_batch(step)
        seen_classes.update(b.labels.tolist())
        seen_rows.update(b.indices.tolist())
    assert seen_classes == set(range(400))
    rare = np.flatnonzero(counts <= 3)
    assert rare.size and all(index.starts()[c] in seen_rows for c in rare)
    # every image of a head identity is drawn eventually: ~200 draws × 4 images of 250 images
    head = PKSampler(ContiguousIndex(np.array([250, 2, 3])), 1, 4, seed=1)
    picks = np.concatenate([head.global_batch(step).indices for step in range(600)])
    assert len(set(picks[picks < 250].tolist())) > 0.9 * 250


def test_count_weighting_follows_image_counts():
    counts = np.array([2] * 50 + [40] * 50)
    index = ContiguousIndex(counts)
    hits = {"uniform": np.zeros(100), "count": np.zeros(100)}
    for w in hits:
        s = PKSampler(index, 4, 2, seed=3, weighting=w)
        for step in range(1500):
            np.add.at(hits[w], s.classes(step), 1)
    ratio_uniform = hits["uniform"][50:].sum() / hits["uniform"][:50].sum()
    ratio_count = hits["count"][50:].sum() / hits["count"][:50].sum()
    assert 0.85 < ratio_uniform < 1.15
    assert ratio_count > 8  # ~20× per draw, less after excluding repeats within a batch


def test_huge_synthetic_index_needs_no_tables():
    gen = SyntheticIdentities(10**8, image_size=16)
    ds = SyntheticDataset(gen)
    assert ds.count_array() is None
    for weighting in ("uniform", "count"):
        s = PKSampler(ds, 256, 4, 8, 5, seed=1, weighting=weighting)
        b = s.local_batch(123)
        c, k = np.divmod(b.indices, SyntheticDataset.STRIDE)
        np.testing.assert_array_equal(c, b.labels)
        assert (k < gen.counts(c)).all() and b.labels.max() < 10**8
    draws = np.concatenate([PKSampler(ds, 256, 2, seed=2, weighting="count").classes(s) for s in range(40)])
    uniform = np.concatenate([PKSampler(ds, 256, 2, seed=2).classes(s) for s in range(40)])
    assert gen.counts(draws).mean() > 1.5 * gen.counts(uniform).mean()  # rejection favours big identities


@pytest.mark.parametrize("weighting", ["uniform", "count"])
def test_identities_with_fewer_than_two_images_are_never_drawn(weighting):
    counts = np.array([0, 3, 0, 0, 5, 2, 0, 1, 1, 4])
    s = PKSampler(ContiguousIndex(counts), 3, 2, seed=0, weighting=weighting)
    assert s.num_ineligible == 6  # four empty, two with a single image
    drawn = np.concatenate([s.classes(step) for step in range(50)])
    assert set(drawn.tolist()) == {1, 4, 5, 9}
    with pytest.raises(ValueError, match="only 4 identities with at least 2 images"):
        PKSampler(ContiguousIndex(counts), 5, 2)


def test_single_image_identities_are_redrawn_without_a_count_table():
    gen = SyntheticIdentities(num_identities=2000, image_size=16, count_median=1.5,
                              min_images=1, max_images=3, seed=1)
    ds = SyntheticDataset(gen)
    assert (gen.counts(np.arange(2000)) == 1).sum() > 200  # plenty to draw by accident
    for weighting in ("uniform", "count"):
        s = PKSampler(ds, 64, 2, seed=3, weighting=weighting)
        drawn = np.concatenate([s.classes(step) for step in range(20)])
        assert (gen.counts(drawn) >= 2).all(), weighting


def test_proposals_of_single_image_identities_are_dropped():
    counts = np.full(100, 4)
    counts[1::2] = 1  # every odd identity has one image

    def partners(step, rng, num, drawn):
        return drawn ^ 1

    s = PKSampler(ContiguousIndex(counts), 10, 2, proposer=partners, proposal_fraction=0.5)
    for step in range(10):
        assert (counts[s.classes(step)] >= 2).all()


def test_proposer_chooses_part_of_the_identities():
    index = ContiguousIndex(np.full(1000, 6))
    calls = []

    def doppelgangers(step, rng, num, drawn):  # the partner of each drawn identity, plus junk
        calls.append((step, num, drawn.copy()))
        return np.concatenate([drawn ^ 1, drawn[:2]])  # duplicates of drawn ones are dropped

    s = PKSampler(index, 10, 2, proposer=doppelgangers, proposal_fraction=0.5, seed=4)
    classes = s.classes(3)
    step, num, drawn = calls[-1]
    assert (step, num) == (3, 5) and len(drawn) == 5
    np.testing.assert_array_equal(classes[:5], drawn)
    np.testing.assert_array_equal(classes[5:], drawn ^ 1)  # all five proposals kept, in order
    np.testing.assert_array_equal(s.classes(3), classes)  # deterministic

    def three_args(step, rng, num):  # the short signature works too; a shortfall is filled at random
        return [int(rng.integers(1000))]

    s.set_proposer(three_args, 0.3)
    c = s.classes(8)
    assert len(np.unique(c)) == 10
    s.set_proposer(lambda step, rng, num: [1000], 0.5)
    with pytest.raises(ValueError, match="proposer returned identity 1000, outside"):
        s.classes(0)

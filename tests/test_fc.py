"""Full FC and Partial FC against the single-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pm_dist.heads.fc import FullFC, PartialFC, class_range
from pm_dist.heads.margin import Margin
from reference import margin_cross_entropy

MARGIN = (64.0, 1.0, 0.5, 0.0)


def make_problem(seed, n, c, d):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(c, d, generator=g, dtype=torch.float64) * 0.01,
            torch.randint(0, c, (n,), generator=g))


def _rank_full_fc(seed, n, c, d, sample_rate):
    emb, weight, labels = make_problem(seed, n, c, d)
    kwargs = dict(sample_rate=sample_rate) if sample_rate is not None else {}
    head = (PartialFC if sample_rate is not None else FullFC)(d, c, Margin(*MARGIN), **kwargs)
    head.report_hardest = True
    with torch.no_grad():
        head.weight.copy_(weight[head.start:head.end])
    e = emb.float().requires_grad_(True)
    out = head(e, labels)
    out.loss.backward()
    return dict(loss=out.loss.item(), acc=out.accuracy.item(), hardest=out.hardest_class,
                grad_e=e.grad, grad_w=head.weight.grad, start=head.start, end=head.end)


def reference(seed, n, c, d):
    emb, weight, labels = make_problem(seed, n, c, d)
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, acc, hardest = margin_cross_entropy(F.normalize(e) @ F.normalize(w).t(), labels, *MARGIN)
    loss.backward()
    return dict(loss=loss.item(), acc=acc.item(), hardest=hardest, grad_e=e.grad, grad_w=w.grad)


def close(actual, expected, rtol=1e-5):
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_full_fc_matches_reference(dist_pool, world):
    results = dist_pool(world).run(_rank_full_fc, 0, 14, 10, 12, None)
    ref = reference(0, 14, 10, 12)
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["acc"] == pytest.approx(ref["acc"])
        assert torch.equal(r["hardest"], ref["hardest"])
        close(r["grad_w"], ref["grad_w"][r["start"]:r["end"]])
    close(sum(r["grad_e"] for r in results), ref["grad_e"])


@pytest.mark.parametrize("world", [1, 3])
def test_partial_fc_rate_one_equals_full_fc_exactly(dist_pool, world):
    full = dist_pool(world).run(_rank_full_fc, 1, 16, 11, 8, None)
    partial = dist_pool(world).run(_rank_full_fc, 1, 16, 11, 8, 1.0)
    for f, p in zip(full, partial):
        assert f["loss"] == p["loss"] and f["acc"] == p["acc"]
        assert torch.equal(f["grad_w"], p["grad_w"]) and torch.equal(f["grad_e"], p["grad_e"])


def _rank_partial_draw(seed, n, c, d, rate, steps):
    emb, weight, labels = make_problem(seed, n, c, d)
    head = PartialFC(d, c, Margin(*MARGIN), sample_rate=rate, seed=seed)
    draws = []
    for _ in range(steps):
        local_target = torch.where((labels >= head.start) & (labels < head.end),
                                   labels - head.start, torch.full_like(labels, -1))
        w, ids, remapped = head._columns(labels, local_target)
        owned = local_target >= 0
        # every positive kept, and each row still points at its own class
        assert torch.equal(ids[remapped[owned]], labels[owned])
        draws.append(ids.tolist())
    out = head(emb.float(), labels)  # and the full forward runs on the subset
    return dict(draws=draws, start=head.start, end=head.end, loss=out.loss.item(),
                positives=sorted(set(labels.tolist()) & set(range(head.start, head.end))))


@pytest.mark.parametrize("world", [2, 4])
def test_partial_fc_keeps_positives_and_samples_the_stated_count(dist_pool, world):
    c, rate = 400, 0.1
    results = dist_pool(world).run(_rank_partial_draw, 3, 24, c, 8, rate, 3)
    for r in results:
        local = r["end"] - r["start"]
        for ids in r["draws"]:
            assert len(ids) == max(int(rate * local), len(r["positives"]))
            assert len(set(ids)) == len(ids) and all(r["start"] <= i < r["end"] for i in ids)
            assert set(r["positives"]) <= set(ids)
        assert r["draws"][0] != r["draws"][1]  # a new draw each step
        assert torch.isfinite(torch.tensor(r["loss"]))
    # ranks draw different patterns (relative to their own range)
    patterns = [[i - r["start"] for i in r["draws"][0]] for r in results]
    assert len({tuple(p) for p in patterns}) == world


def test_partial_fc_all_positives_when_rate_too_small():
    emb, weight, labels = make_problem(4, 32, 40, 8)
    head = PartialFC(8, 40, Margin(*MARGIN), sample_rate=0.01)
    w, ids, _ = head._columns(labels, labels.clone())
    assert sorted(ids.tolist()) == sorted(set(labels.tolist()))


def test_partial_fc_resume_draws_the_same_columns():
    _, _, labels = make_problem(5, 8, 200, 4)
    a = PartialFC(4, 200, Margin(), sample_rate=0.2, seed=9)
    first = [a._columns(labels, labels.clone())[1] for _ in range(3)]
    b = PartialFC(4, 200, Margin(), sample_rate=0.2, seed=9)
    a2 = PartialFC(4, 200, Margin(), sample_rate=0.2, seed=9)
    a2._columns(labels, labels.clone())
    b.load_state_dict(a2.state_dict())  # resumed after step 0
    assert torch.equal(b._columns(labels, labels.clone())[1], first[1])


def test_label_out_of_range_is_named():
    head = FullFC(4, 10, Margin())
    with pytest.raises(ValueError, match=r"rows \[1\]: \[10\]"):
        head(torch.randn(3, 4), torch.tensor([0, 10, 3]))


def test_bad_sample_rate():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(4, 10, Margin(), sample_rate=0.0)


def test_class_range_uneven_covers_all():
    for n, w in [(10, 3), (7, 4), (3, 4), (100, 8)]:
        ranges = [class_range(n, w, r) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("reuse_grad", [False, True])
def test_normalize_rows_gradient_matches_autograd_normalize(reuse_grad):
    """The closed-form backward (g − ŵ⟨g, ŵ⟩)/‖w‖ against autograd through F.normalize, float64,
    with a row below eps (divided by eps, no projection) and an all-zero row."""
    from pm_dist.heads.fc import normalize_rows

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 9, generator=g, dtype=torch.float64)
    w[3] *= 1e-14
    w[4] = 0.0
    upstream = torch.randn(40, 9, generator=g, dtype=torch.float64)
    a = w.clone().requires_grad_(True)
    F.normalize(a).backward(upstream)
    b = w.clone().requires_grad_(True)
    out = normalize_rows(b, reuse_grad=reuse_grad)
    assert torch.equal(out, F.normalize(w))
    out.backward(upstream.clone())
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_normalize_rows_float32_reuses_its_buffer_between_steps():
    """Two steps in a row through the CPU workspace give the autograd gradients each time."""
    from pm_dist.heads.fc import normalize_rows

    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        w = torch.randn(64, 16, generator=g)
        upstream = torch.randn(64, 16, generator=g)
        a = w.clone().requires_grad_(True)
        F.normalize(a).backward(upstream)
        b = w.clone().requires_grad_(True)
        normalize_rows(b, reuse_grad=True).backward(upstream.clone())
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 64, 1000])
def test_row_dots_in_blocks_equal_the_plain_sum(rows_per_chunk):
    """The blocked row-wise dot product of the normalization's backward, with blocks that do not
    divide the rows, one row per block, and one block for all."""
    from pm_dist.heads.fc import _row_dots

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 50, 13, generator=g, dtype=torch.float64)
    out = _row_dots(a, b, rows_per_chunk=rows_per_chunk)
    assert out.shape == (50, 1)
    torch.testing.assert_close(out, (a * b).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)

"""Partial FC's sampled path (rate < 1) against a plain softmax over the columns it sampled.

``test_fc.py`` checks which columns are drawn (positives kept, the stated count, the same draw on
resume); here the loss and both gradients over those columns are checked against the
single-process reference, at several world sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pm_dist.heads.fc import PartialFC
from pm_dist.heads.margin import Margin
from reference import margin_cross_entropy
from test_fc import MARGIN, close, make_problem


def _rank_partial_fc(seed, n, c, d, rate, steps):
    emb, weight, labels = make_problem(seed, n, c, d)
    head = PartialFC(d, c, Margin(*MARGIN), sample_rate=rate, seed=seed)
    with torch.no_grad():
        head.weight.copy_(weight[head.start:head.end])
    drawn = []
    columns = head._columns

    def spy(labels, local_target):  # record the global ids of the columns this step used
        w, ids, remapped = columns(labels, local_target)
        drawn.append(ids.clone())
        return w, ids, remapped

    head._columns = spy
    results = []
    for _ in range(steps):  # several steps: several draws
        head.weight.grad = None
        e = emb.float().requires_grad_(True)
        out = head(e, labels)
        out.loss.backward()
        results.append(dict(loss=out.loss.item(), acc=out.accuracy.item(), grad_e=e.grad,
                            grad_w=head.weight.grad.clone(), ids=drawn[-1]))
    return dict(steps=results, start=head.start, end=head.end)


def _reference_over(seed, n, c, d, used: torch.Tensor):
    emb, weight, labels = make_problem(seed, n, c, d)
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    mask = torch.zeros(c, dtype=torch.bool)
    mask[used] = True
    loss, acc, _ = margin_cross_entropy(F.normalize(e) @ F.normalize(w).t(), labels, *MARGIN,
                                        mask=mask)
    loss.backward()
    return dict(loss=loss.item(), acc=acc.item(), grad_e=e.grad, grad_w=w.grad)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_partial_fc_sampled_loss_and_gradients_match_a_softmax_over_the_sampled_columns(
        dist_pool, world):
    n, c, d, rate = 12, 40, 8, 0.3
    ranks = dist_pool(world).run(_rank_partial_fc, 3, n, c, d, rate, 3)
    for step in range(3):
        used = torch.cat([r["steps"][step]["ids"] for r in ranks])
        assert len(used) < c  # the sampled path: some negatives left out this step
        ref = _reference_over(3, n, c, d, used)
        for r in ranks:
            got = r["steps"][step]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert got["acc"] == pytest.approx(ref["acc"])
            # rows left out of the draw get exactly zero gradient, as in the reference
            close(got["grad_w"], ref["grad_w"][r["start"]:r["end"]])
            unused = torch.ones(r["end"] - r["start"], dtype=torch.bool)
            unused[got["ids"] - r["start"]] = False
            assert torch.equal(got["grad_w"][unused], torch.zeros_like(got["grad_w"][unused]))
        close(sum(r["steps"][step]["grad_e"] for r in ranks), ref["grad_e"])
    draws = [torch.cat([r["steps"][s]["ids"] for r in ranks]) for s in range(3)]
    assert not all(torch.equal(draws[0], x) for x in draws[1:])  # a new draw every step

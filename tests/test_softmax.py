"""The distributed margin softmax against a single-process ``F.cross_entropy`` reference.

Each case builds the same full problem on every rank from a seed, shards the columns, and returns
what the rank computed; the test compares the ranks' results with the reference computed here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pm_dist.distributed import gather_embeddings, get_rank, get_world_size
from pm_dist.heads.fc import class_range
from pm_dist.heads.margin import Margin
from pm_dist.heads.softmax import sharded_margin_softmax
from reference import margin_cross_entropy

WORLD_SIZES = [1, 2, 3, 4]
MARGINS = {
    "cosface": (64.0, 1.0, 0.0, 0.35),
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "combined": (32.0, 1.0, 0.3, 0.2),
    "sphere": (16.0, 1.5, 0.0, 0.0),
}


def make_problem(seed, n, c, d, mask_frac=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    weight = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    mask = torch.rand(c, generator=g) >= mask_frac
    mask[labels] = True  # a target column is always valid
    return emb, weight, labels, mask


def splits_for(c, world, sizes=None):
    if sizes is None:
        return [class_range(c, world, r) for r in range(world)]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return list(zip(bounds[:-1], bounds[1:]))


def _rank_softmax(seed, n, c, d, margin_params, mask_frac, sizes, dtype):
    """Runs on every rank: this rank's shard, forward + backward."""
    rank, world = get_rank(), get_world_size()
    emb, weight, labels, mask = make_problem(seed, n, c, d, mask_frac, dtype)
    start, end = splits_for(c, world, sizes)[rank]
    e = emb.clone().requires_grad_(True)
    w = weight[start:end].clone().requires_grad_(True)
    local_target = torch.where((labels >= start) & (labels < end), labels - start,
                               torch.full_like(labels, -1))
    res = sharded_margin_softmax(e, w, local_target, Margin(*margin_params),
                                 column_mask=None if mask_frac == 0 else mask[start:end],
                                 column_ids=torch.arange(start, end), hardest_ids=True)
    res.loss.backward()
    return dict(loss=res.loss.item(), acc=res.accuracy.item(), hardest=res.hardest_id,
                grad_e=e.grad.float(), grad_w=w.grad.float(), start=start, end=end)


def reference(seed, n, c, d, margin_params, mask_frac, dtype=torch.float64):
    """float64 autograd reference on the inputs as rounded to ``dtype``."""
    emb, weight, labels, mask = make_problem(seed, n, c, d, mask_frac, dtype)
    emb, weight = emb.double(), weight.double()
    e = emb.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, acc, hardest = margin_cross_entropy(e @ w.t(), labels, *margin_params,
                                              mask=None if mask_frac == 0 else mask)
    loss.backward()
    return dict(loss=loss.item(), acc=acc.item(), hardest=hardest, grad_e=e.grad, grad_w=w.grad)


def close(actual, expected, rtol):
    """Relative to the tensor's scale: an element near zero is a cancellation, not an error."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def assert_matches(results, ref, rtol=1e-5):
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=rtol)
        assert r["acc"] == pytest.approx(ref["acc"], abs=1e-7)
        assert torch.equal(r["hardest"], ref["hardest"])
        if r["end"] > r["start"]:
            close(r["grad_w"], ref["grad_w"][r["start"]:r["end"]], rtol)
    # Each rank's d E is its columns' share; the all-gather backward sums them.
    close(sum(r["grad_e"] for r in results), ref["grad_e"], rtol)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("margin", sorted(MARGINS))
def test_matches_reference(dist_pool, world, margin):
    args = (1, 12, 10, 16, MARGINS[margin], 0.0, None, torch.float32)  # 10 classes: uneven shards
    results = dist_pool(world).run(_rank_softmax, *args)
    assert_matches(results, reference(*args[:6]))


@pytest.mark.parametrize("world,sizes", [(2, [0, 9]), (3, [4, 0, 5]), (4, [3, 0, 6, 0])])
def test_empty_shards(dist_pool, world, sizes):
    args = (2, 10, 9, 8, MARGINS["arcface"], 0.0, sizes, torch.float32)
    results = dist_pool(world).run(_rank_softmax, *args)
    assert_matches(results, reference(*args[:6]))


@pytest.mark.parametrize("world", [1, 3])
def test_masked_columns(dist_pool, world):
    args = (3, 16, 40, 8, MARGINS["cosface"], 0.4, None, torch.float32)
    results = dist_pool(world).run(_rank_softmax, *args)
    assert_matches(results, reference(*args[:6]))


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_within_stated_tolerance(dist_pool, world):
    """bf16 inputs and matmuls, fp32 softmax: against float64 on the same bf16-rounded inputs the
    loss is within 1e-3 relative and gradients within 2e-2 of their scale (bf16 keeps 8 bits)."""
    args = (4, 32, 50, 32, MARGINS["arcface"], 0.0, None, torch.bfloat16)
    results = dist_pool(world).run(_rank_softmax, *args)
    ref = reference(*args[:6], dtype=torch.bfloat16)
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-3)
        close(r["grad_w"], ref["grad_w"][r["start"]:r["end"]], 2e-2)
    close(sum(r["grad_e"] for r in results), ref["grad_e"], 2e-2)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), n=st.integers(1, 24), c=st.integers(1, 30),
       d=st.integers(2, 12), s=st.floats(1.0, 128.0), m1=st.sampled_from([1.0, 1.35]),
       m2=st.floats(0.0, 0.8), m3=st.floats(0.0, 0.5), mask_frac=st.sampled_from([0.0, 0.3]))
def test_property_random_shapes_and_margins(dist_pool, seed, n, c, d, s, m1, m2, m3, mask_frac):
    world = 3
    emb, weight, labels, _ = make_problem(seed, n, c, d)
    # d acos/d cos = −1/sin θ: at θ ≈ 0 or π an angular margin turns fp32 rounding of the cosine
    # into large gradient errors (conditioning, not a bug; test_arcface_extremes covers θ ≈ 0, π).
    assume(m1 == 1.0 and m2 == 0.0 or (emb * weight[labels]).sum(1).abs().max() < 0.999)
    args = (seed, n, c, d, (s, m1, m2, m3), mask_frac, None, torch.float32)
    results = dist_pool(world).run(_rank_softmax, *args)
    assert_matches(results, reference(*args[:6]))


def _rank_encoder_step(seed, batch_sizes, c, d_in, d):
    """A linear encoder on each rank's rows, gathered, sharded softmax, DeepSpeed-style averaging."""
    rank, world = get_rank(), get_world_size()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(batch_sizes), d_in, generator=g)
    labels = torch.randint(0, c, (sum(batch_sizes),), generator=g)
    weight = F.normalize(torch.randn(c, d, generator=g))
    encoder = torch.nn.Linear(d_in, d)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(d, d_in, generator=g))
        encoder.bias.copy_(torch.randn(d, generator=g))
    lo = sum(batch_sizes[:rank])
    local = encoder(x[lo: lo + batch_sizes[rank]])
    emb = F.normalize(gather_embeddings(local))  # backward: reduce-scatter × W
    start, end = class_range(c, world, rank)
    local_target = torch.where((labels >= start) & (labels < end), labels - start,
                               torch.full_like(labels, -1))
    res = sharded_margin_softmax(emb, weight[start:end], local_target, Margin(*MARGINS["arcface"]))
    res.loss.backward()
    grads = torch.cat([encoder.weight.grad.flatten(), encoder.bias.grad])
    if world > 1:  # what DeepSpeed does to encoder gradients: average over data-parallel ranks
        torch.distributed.all_reduce(grads)
        grads /= world
    return res.loss.item(), grads


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("uneven", [False, True])
def test_gather_backward_gives_global_mean_gradient_after_averaging(dist_pool, world, uneven):
    sizes = [5] * world if not uneven else [5 + (3 if r == world - 1 else 0) for r in range(world)]
    if uneven and world > 1:
        sizes[0] = 2  # the short last batch may land on any rank
    results = dist_pool(world).run(_rank_encoder_step, 7, sizes, 11, 6, 8)
    ref_loss, ref_grads = dist_pool(1).run(_rank_encoder_step, 7, [sum(sizes)], 11, 6, 8)[0]
    for loss, grads in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


def _rank_missing_target(_):
    emb, weight, labels, _m = make_problem(0, 4, 6, 4)
    rank, world = get_rank(), get_world_size()
    start, end = class_range(6, world, rank)
    local_target = torch.where((labels >= start) & (labels < end), labels - start,
                               torch.full_like(labels, -1))
    local_target[0] = -1  # row 0's class is on no rank
    try:
        sharded_margin_softmax(emb, weight[start:end], local_target, Margin())
    except ValueError as err:
        return str(err)
    return None


def test_row_without_target_raises_on_every_rank(dist_pool):
    messages = dist_pool(2).run(_rank_missing_target, None)
    assert all(m is not None and "rows [0]" in m for m in messages)


@pytest.mark.parametrize("cos_t", [-1.0, -0.999, -0.95, math.cos(math.pi - 0.5) - 1e-4,
                                   math.cos(math.pi - 0.5) + 1e-4, 0.0, 0.999, 1.0])
@pytest.mark.parametrize("s", [64.0, 1024.0])
def test_arcface_extremes_finite_and_exact(cos_t, s):
    """Near θ + m = π (both sides), at θ = 0 and θ = π, at large scale: finite and true gradients."""
    margin = Margin(s=s, m1=1.0, m2=0.5, m3=0.0)
    torch.manual_seed(0)
    n, c, d = 6, 5, 8
    weight = F.normalize(torch.randn(c, d, dtype=torch.float64))
    labels = torch.arange(n) % c
    # Rows whose target cosine is cos_t exactly: rotate the target column by the wanted angle.
    theta = math.acos(max(-1.0, min(1.0, cos_t)))
    ortho = F.normalize(torch.randn(n, d, dtype=torch.float64))
    tgt = weight[labels]
    ortho = F.normalize(ortho - (ortho * tgt).sum(1, keepdim=True) * tgt)
    emb = (math.cos(theta) * tgt + math.sin(theta) * ortho)
    e = emb.float().clone().requires_grad_(True)
    w = weight.float().clone().requires_grad_(True)
    res = sharded_margin_softmax(e, w, labels, margin)
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.isfinite(e.grad).all() and torch.isfinite(w.grad).all()
    e64, w64 = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss64, _, _ = margin_cross_entropy(e64 @ w64.t(), labels, margin.s, 1.0, 0.5, 0.0)
    loss64.backward()
    assert res.loss.item() == pytest.approx(loss64.item(), rel=1e-4, abs=1e-4)
    if abs(cos_t) < 0.9999:  # away from θ ∈ {0, π}, where d acos is infinite, the gradients agree
        torch.testing.assert_close(e.grad.double(), e64.grad, rtol=2e-3, atol=1e-3 * s / 64)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-3, atol=1e-3 * s / 64)


def test_extreme_logits_no_overflow():
    """Scale 10⁴ puts logits at ±10⁴: exp would overflow without the max shift."""
    emb, weight, labels, _ = make_problem(5, 8, 7, 6)
    res = sharded_margin_softmax(emb, weight, labels, Margin(s=1e4, m1=1, m2=0, m3=0.35))
    ref, _, _ = margin_cross_entropy(emb.double() @ weight.double().t(), labels, 1e4, 1, 0, 0.35)
    assert torch.isfinite(res.loss)
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_backward_twice_is_refused():
    emb, weight, labels, _ = make_problem(6, 4, 5, 4)
    e = emb.clone().requires_grad_(True)
    res = sharded_margin_softmax(e, weight, labels, Margin())
    res.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        res.loss.backward()


def _rank_target_vectors(seed, n, c, d):
    rank, world = get_rank(), get_world_size()
    emb, weight, labels, _ = make_problem(seed, n, c, d)
    targets = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)))
    start, end = class_range(c, world, rank)
    e = emb.clone().requires_grad_(True)
    w = weight[start:end].clone().requires_grad_(True)
    local_target = torch.where((labels >= start) & (labels < end), labels - start,
                               torch.full_like(labels, -1))
    res = sharded_margin_softmax(e, w, local_target, Margin(*MARGINS["arcface"]),
                                 column_ids=torch.arange(start, end), target_vectors=targets,
                                 hardest_ids=True)
    res.loss.backward()
    return dict(loss=res.loss.item(), acc=res.accuracy.item(), hardest=res.hardest_id,
                grad_e=e.grad, grad_w=w.grad, start=start, end=end)


@pytest.mark.parametrize("world", [1, 3])
def test_target_vectors_replace_the_target_column(dist_pool, world):
    """Leave-one-out style: row i's target is its own vector, its class column stays a negative
    for every other row (and takes no gradient from row i)."""
    seed, n, c, d = 8, 12, 7, 6
    results = dist_pool(world).run(_rank_target_vectors, seed, n, c, d)
    emb, weight, labels, _ = make_problem(seed, n, c, d, dtype=torch.float64)
    targets = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)))
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    cos = e @ w.t()
    onehot = F.one_hot(labels, c).bool()
    cos = torch.where(onehot, (e * targets.double()).sum(1, keepdim=True), cos)
    loss, acc, hardest = margin_cross_entropy(cos, labels, *MARGINS["arcface"])
    loss.backward()
    assert_matches(results, dict(loss=loss.item(), acc=acc.item(), hardest=hardest,
                                 grad_e=e.grad, grad_w=w.grad))


def test_confident_rows_keep_their_small_loss_and_gradient():
    """Target far ahead of every other column: loss ≈ Σ_j e^(z_j − z_t) ≈ 1e-6. Forming it as
    log Σ − z_t in fp32 would round it to 0 or lose most digits; the non-target mass keeps it."""
    d = 4
    weight = torch.eye(d, dtype=torch.float64)
    emb = F.normalize(torch.tensor([[1.0, 0.2, 0.1, 0.0]], dtype=torch.float64))
    labels = torch.tensor([0])
    margin = Margin(s=16.0, m1=1.0, m2=0.0, m3=0.0)
    e = emb.float().clone().requires_grad_(True)
    res = sharded_margin_softmax(e, weight.float(), labels, margin)
    res.loss.backward()
    z = 16.0 * (emb @ weight.t())[0]
    ref_loss = torch.log1p(torch.exp(z[1:] - z[0]).sum())  # float64, no cancellation
    assert 1e-7 < ref_loss.item() < 1e-3
    assert res.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    e64 = emb.clone().requires_grad_(True)
    zz = 16.0 * (e64 @ weight.t())[0]
    torch.log1p(torch.exp(zz[1:] - zz[0]).sum()).backward()
    close(e.grad, e64.grad, 1e-5)


# ------------------------------------------------------------------- collectives per step
def _rank_count_all_reduces(hardest_ids):
    """Every all-reduce one forward + backward issues, and what the softmax and the heads return."""
    import torch.distributed as dist

    from pm_dist.heads.fc import FullFC, PartialFC
    from pm_dist.heads.memory import MemoryConfig, PrototypeMemory

    rank, world = get_rank(), get_world_size()
    emb, weight, labels, _ = make_problem(5, 12, 10, 16)
    start, end = class_range(10, world, rank)
    local_target = torch.where((labels >= start) & (labels < end), labels - start,
                               torch.full_like(labels, -1))
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tuple(tensor.shape), tensor.dtype))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        e = emb.clone().requires_grad_(True)
        res = sharded_margin_softmax(e, weight[start:end], local_target, Margin(),
                                     column_ids=torch.arange(start, end), hardest_ids=hardest_ids)
        res.loss.backward()
        softmax_calls = list(calls)
        out = {}
        for name, head in (("full_fc", FullFC(16, 10, Margin())),
                           ("partial_fc", PartialFC(16, 10, Margin(), sample_rate=0.5)),
                           ("memory", PrototypeMemory(16, MemoryConfig(capacity=24, num_classes=10),
                                                      Margin()))):
            head.report_hardest = hardest_ids
            calls.clear()
            o = head(emb.clone().requires_grad_(True), labels)
            o.loss.backward()
            out[name] = dict(calls=list(calls), hardest=o.hardest_class, cos=o.hardest_cos)
    finally:
        dist.all_reduce = original
    return dict(softmax_calls=softmax_calls, hardest=res.hardest_id, hardest_cos=res.hardest_cos,
                heads=out)


@pytest.mark.parametrize("hardest_ids", [False, True])
def test_two_all_reduces_unless_hardest_ids_are_asked_for(dist_pool, hardest_ids):
    results = dist_pool(2).run(_rank_count_all_reduces, hardest_ids)
    emb, weight, labels, _ = make_problem(5, 12, 10, 16)
    cos = (emb @ weight.t()).double()
    best, hardest = cos.masked_fill(F.one_hot(labels, 10).bool(), float("-inf")).max(1)
    for r in results:
        assert len(r["softmax_calls"]) == (3 if hardest_ids else 2)
        if hardest_ids:
            assert r["softmax_calls"][2] == ((12,), torch.int64)
            assert torch.equal(r["hardest"], hardest)
        else:
            assert r["hardest"] is None
        # the hardest non-target cosine comes from the first all-reduce either way
        torch.testing.assert_close(r["hardest_cos"].double(), best, rtol=1e-6, atol=1e-6)
        assert sorted(r["heads"]) == ["full_fc", "memory", "partial_fc"]
        for name, head in r["heads"].items():
            assert len(head["calls"]) == (3 if hardest_ids else 2), name
            assert (head["hardest"] is None) == (not hardest_ids), name
            assert (head["cos"] is None) == (not hardest_ids), name
            if hardest_ids:
                assert head["cos"].shape == (12,) and head["hardest"].shape == (12,)


def test_reused_cpu_buffer_two_live_graphs():
    """The [N, C] buffer kept between steps: two graphs alive at once never share it, and
    backpropagating them in either order gives each its own gradients."""
    emb, weight, labels, _ = make_problem(9, 12, 10, 16)

    def run():
        e = emb.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        return e, w, sharded_margin_softmax(e, w, labels, Margin())

    e0, w0, r0 = run()
    r0.loss.backward()
    want = (e0.grad.clone(), w0.grad.clone())
    graphs = [run(), run()]
    for e, w, r in reversed(graphs):
        r.loss.backward()
    for e, w, _ in graphs:
        assert torch.equal(e.grad, want[0]) and torch.equal(w.grad, want[1])
    with torch.no_grad():
        assert sharded_margin_softmax(emb, weight, labels, Margin()).loss.item() \
            == pytest.approx(r0.loss.item(), rel=1e-7)

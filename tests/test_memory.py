"""The sharded Prototype Memory against a plain dict reference (tests/reference.py), driven with the
same random batches for hundreds of steps at W = 1..4, plus resharding, resume, errors and NaNs.

Each rank builds the same global batches from (seed, step) and returns what it computed; the test
runs ``ReferenceMemory`` (float64) on the same batches and compares content, statistics, loss and
gradients after every step.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from pm_dist.distributed import gather_embeddings, get_rank
from pm_dist.heads.base import ShardFiles
from pm_dist.heads.margin import Margin
from pm_dist.heads.memory import STATE_FORMAT, MemoryConfig, PrototypeMemory
from reference import ReferenceMemory

NUM_IDS, DIM = 60, 8
COSFACE = (64.0, 1.0, 0.0, 0.35)
ARCFACE = (64.0, 1.0, 0.5, 0.0)
ZERO_CLASS_STEP = 5  # every 17th step from here draws only classes ≡ 0 mod 12: ranks ≥ 1 own none


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only spins against the ranks on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(seed, step, num_ids=NUM_IDS, dim=DIM, max_classes=6, singles=True, noise=1.5):
    """A global batch of 3..max_classes classes with 1..3 exemplars each (mostly 2–3), around fixed
    class centres, rows shuffled (so a class's exemplars land on several ranks) and rescaled (so
    raw and normalized means differ)."""
    centres = torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    g = torch.Generator().manual_seed(seed * 100_003 + step + 1)
    pool = torch.arange(num_ids)
    if step % 17 == ZERO_CLASS_STEP:
        pool = pool[pool % 12 == 0]
    p = min(int(torch.randint(3, max_classes + 1, (1,), generator=g)), len(pool))
    classes = pool[torch.randperm(len(pool), generator=g)[:p]]
    odds = torch.tensor([0.1 if singles else 0.0, 0.5, 0.4])
    counts = torch.multinomial(odds, p, replacement=True, generator=g) + 1
    labels = classes.repeat_interleave(counts)
    emb = centres[labels] + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    emb = emb * (0.5 + 1.5 * torch.rand(len(labels), 1, generator=g, dtype=torch.float64))
    perm = torch.randperm(len(labels), generator=g)
    return emb[perm].float(), labels[perm]


def _rank_run(seed, steps, cfg, margin, singles=True):
    """Every rank: the sharded memory on the global batches; per step what it returned."""
    head = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin(*margin), classes_per_batch=6)
    head.report_hardest = True
    out = []
    for step in range(steps):
        emb, labels = make_batch(seed, step, singles=singles)
        e = emb.clone().requires_grad_(True)
        res = head(e, labels)
        res.loss.backward()
        out.append(dict(loss=res.loss.item(), acc=res.accuracy.item(), hardest=res.hardest_class,
                        grad=e.grad, stats=res.stats, entries=head.entries()))
    return pack(out)


def pack(obj) -> bytes:
    """One bytes object for the trip back from a rank: a thousand small tensors each passed
    through shared memory by the pool's queue cost seconds."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data))


def run_ranks(pool, fn, *args):
    return [unpack(r) for r in pool.run(fn, *args)]


def reference_run(seed, steps, cfg, margin, world, singles=True):
    ref = ReferenceMemory(world_size=world, **cfg)
    out = []
    for step in range(steps):
        emb, labels = make_batch(seed, step, singles=singles)
        e = emb.double().requires_grad_(True)
        loss, acc, hardest, stats = ref.forward(e, labels, *margin)
        loss.backward()
        out.append(dict(loss=loss.item(), acc=acc.item(), hardest=hardest, grad=e.grad,
                        stats=stats, entries=ref.entries()))
    return out


def close(actual, expected, rtol, floor=0.0):
    """Relative to the tensor's scale (an element near zero is a cancellation, not an error), the
    scale floored at ``floor``."""
    expected = expected.to(actual.dtype)
    scale = max(float(expected.abs().max()), floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def merged_entries(rank_entries, world):
    """The union of the shards' content as {class: (prototype, age)}, checking each class sits on
    its owner rank."""
    merged = {}
    for r, ent in enumerate(rank_entries):
        assert all(int(c) % world == r for c in ent["classes"])
        for c, p, a in zip(ent["classes"].tolist(), ent["protos"], ent["age"].tolist()):
            merged[c] = (p, a)
    return merged


def assert_same_content(actual, expected, rtol):
    assert sorted(actual) == sorted(expected)
    assert {c: a for c, (_, a) in actual.items()} == {c: a for c, (_, a) in expected.items()}
    if actual:
        close(torch.stack([actual[c][0] for c in sorted(actual)]),
              torch.stack([expected[c][0] for c in sorted(actual)]), rtol)


def compare_runs(results, ref, world, margin, rtol=1e-5, rtol_grad=1e-5, rtol_proto=1e-5,
                 ranking=True):
    """Content and statistics exactly (prototypes to ``rtol_proto``), loss and gradients relative to
    their scale, with the scale floored where fp32 cannot follow: at one nat for the loss and at
    s/(10·rows) for the embedding gradient (a row whose target probability is 0.9). A batch that
    the memory already separates perfectly has a loss of 1e-8 whose fp32 value is cancellation
    (the softmax forms p_t − 1); relative error there measures nothing."""
    totals = dict(evictions=0.0, forgotten=0.0, hits=0.0)
    for step, want in enumerate(ref):
        got = [r[step] for r in results]
        assert_same_content(merged_entries([g["entries"] for g in got], world), want["entries"],
                            rtol_proto)
        for g in got:  # every rank returns the same
            for key, value in want["stats"].items():
                assert g["stats"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (step, key)
            assert abs(g["loss"] - want["loss"]) <= rtol * max(abs(want["loss"]), 1.0), step
            if ranking:  # accuracy and the hardest negative: exact unless the values are rounded
                assert g["acc"] == pytest.approx(want["acc"], abs=1e-7), step
                assert torch.equal(g["hardest"], want["hardest"]), step
        rows = want["grad"].shape[0]
        close(sum(g["grad"] for g in got), want["grad"], rtol_grad, margin[0] / (10 * rows))
        totals["evictions"] += want["stats"]["evictions"]
        totals["forgotten"] += want["stats"]["forgotten"]
        totals["hits"] += want["stats"]["hit_rate"]
    return totals


FORGETTING = dict(capacity=26, num_classes=NUM_IDS, forget_after=6)  # uneven shards at W = 3, 4


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference_for_200_steps(dist_pool, world):
    """Defaults plus forgetting: evictions, refreshes and forgetting all happen, and every rank
    holds exactly the reference's (class, prototype, age) after every step."""
    steps = 200
    results = run_ranks(dist_pool(world), _rank_run, 0, steps, FORGETTING, COSFACE)
    totals = compare_runs(results, reference_run(0, steps, FORGETTING, COSFACE, world), world,
                          COSFACE)
    assert totals["evictions"] > 20 and totals["forgotten"] > 20 and totals["hits"] > 20


VARIANTS = {  # every option of MemoryConfig away from its default, at uneven shards (M = 25)
    "defaults": (2, dict(capacity=25, num_classes=NUM_IDS), COSFACE),  # leave-one-out positives
    "raw_loo_overwrite_fifo": (3, dict(capacity=25, num_classes=NUM_IDS, generation="raw_mean",
                                       positive="leave_one_out", refresh="overwrite",
                                       eviction="fifo", forget_after=5), ARCFACE),
    "ema_alpha": (2, dict(capacity=25, num_classes=NUM_IDS, ema_alpha=0.8), COSFACE),
    "fresh": (3, dict(capacity=25, num_classes=NUM_IDS, positive="fresh"), COSFACE),
    "prototype_grad_ema": (3, dict(capacity=25, num_classes=NUM_IDS, prototype_grad=True,
                                   positive="fresh", forget_after=4), ARCFACE),
    "prototype_grad_raw_overwrite_fifo": (2, dict(capacity=25, num_classes=NUM_IDS,
                                                  prototype_grad=True, positive="fresh",
                                                  generation="raw_mean",
                                                  refresh="overwrite", eviction="fifo"), COSFACE),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_options_match_reference(dist_pool, name):
    world, cfg, margin = VARIANTS[name]
    steps = 200
    # ArcFace is ill-conditioned in fp32 at θ ≈ 0 (d arccos = −1/sin θ), where a class's only
    # exemplar sits on its own fresh prototype: its batches have two or three exemplars per class
    singles = margin != ARCFACE
    results = run_ranks(dist_pool(world), _rank_run, 1, steps, cfg, margin, singles)
    totals = compare_runs(results, reference_run(1, steps, cfg, margin, world, singles), world,
                          margin)
    assert totals["evictions"] > 20 and totals["hits"] > 20
    if cfg.get("forget_after"):
        assert totals["forgotten"] > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_batches_exercise_the_edge_cases(seed):
    """The drawn batches contain the cases the comparisons rely on."""
    singles = zero_class_steps = 0
    for step in range(200):
        _, labels = make_batch(seed, step)
        singles += int((torch.bincount(labels) == 1).sum())
        zero_class_steps += bool((labels % 12 == 0).all())
    assert singles > 20  # leave-one-out's fallback for a class with one exemplar
    assert zero_class_steps >= 10  # ranks owning no class in the step


def test_bf16_storage_within_loose_tolerance(dist_pool):
    """bf16 prototypes and matmul, fp32 softmax: bookkeeping identical, values to bf16 precision."""
    cfg = dict(FORGETTING, dtype="bfloat16")
    margin = (16.0, 1.0, 0.0, 0.35)
    results = run_ranks(dist_pool(2), _rank_run, 2, 60, cfg, margin)
    compare_runs(results, reference_run(2, 60, cfg, margin, 2), 2, margin, rtol=2e-2,
                 rtol_grad=5e-2, rtol_proto=1.6e-2, ranking=False)


# ------------------------------------------------------------------- split class, gathered batch
def _rank_split_class(seed):
    """Rank r encodes its own rows; class 7's exemplars sit on both ranks."""
    rank = get_rank()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, DIM, generator=g)
    labels = torch.tensor([7, 3, 7, 4, 7, 3, 4, 7])  # rows 0–3 on rank 0, 4–7 on rank 1
    local = x[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
    head = PrototypeMemory(DIM, MemoryConfig(capacity=8, num_classes=10), Margin())
    res = head(gather_embeddings(local), labels)
    res.loss.backward()
    return head.entries(), res.stats


def test_class_split_across_ranks_gets_one_prototype(dist_pool):
    results = dist_pool(2).run(_rank_split_class, 3)
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([7, 3, 7, 4, 7, 3, 4, 7])
    entries = merged_entries([e for e, _ in results], 2)
    assert sorted(entries) == [3, 4, 7]
    for c in (3, 4, 7):  # normalized mean of *all* its normalized exemplars, from both ranks
        want = F.normalize(F.normalize(x[labels == c].double()).mean(0), dim=0)
        close(entries[c][0], want, 1e-6)
    assert results[0][1] == results[1][1] and results[0][1]["occupancy"] == 3 / 8


# ------------------------------------------------------------------------------ non-finite input
def _rank_nonfinite(seed, cfg):
    """Four classes × two exemplars, one on each rank, gathered. Steps: good; a NaN on rank 1;
    norms that overflow; finite rows whose raw sum overflows; good. Per step: (loss, stats,
    entries, head.step)."""
    rank = get_rank()
    head = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin(), classes_per_batch=4)
    out = []
    for step, poison in enumerate([None, "nan", "norm", "sum", None]):
        g = torch.Generator().manual_seed(seed + step)
        labels = torch.randperm(NUM_IDS, generator=g)[:4].repeat(2)
        local = torch.randn(8, DIM, generator=g)[4 * rank: 4 * rank + 4]
        if poison == "nan" and rank == 1:
            local[0, 3] = float("nan")
        if poison == "norm":
            local[:] = 1e30  # finite entries, a norm beyond float32
        if poison == "sum":
            local[:, 0] = 1.5e19  # row norms² ≈ 2.3e38 are finite; a class's two rows are not
        local.requires_grad_(True)
        res = head(gather_embeddings(local), labels)
        if math.isfinite(res.loss.item()):
            res.loss.backward()
        out.append((res.loss.item(), res.stats, head.entries(), head.step))
    return out


@pytest.mark.parametrize("generation", ["normalized_mean", "raw_mean"])
def test_nonfinite_step_is_skipped_on_every_rank(dist_pool, generation):
    cfg = dict(capacity=12, num_classes=NUM_IDS, generation=generation)
    results = dist_pool(2).run(_rank_nonfinite, 4, cfg)
    sum_skips = generation == "raw_mean"  # normalized exemplars never overflow
    for out in results:
        assert out[0][1]["skipped"] == 0 and math.isfinite(out[0][0]) and out[0][3] == 1
        for loss, stats, entries, step in out[1:3]:  # skipped: nothing written, step unchanged
            assert stats["skipped"] == 1 and not math.isfinite(loss) and step == 1
            assert all(torch.equal(entries[k], out[0][2][k]) for k in entries)
            assert stats["occupancy"] == out[0][1]["occupancy"] and stats["evictions"] == 0
        loss, stats, entries, step = out[3]
        assert stats["skipped"] == float(sum_skips) and math.isfinite(loss) != sum_skips
        assert step == (1 if sum_skips else 2)
        assert out[4][1]["skipped"] == 0 and math.isfinite(out[4][0])
        assert all(torch.isfinite(o[2]["protos"]).all() for o in out)
    assert [o[1] for o in results[0]] == [o[1] for o in results[1]]  # ranks agree on every step


# ------------------------------------------------------------------------ save, resume, reshard
def _rank_resume(seed, cfg, steps, cut):
    """Straight run vs run cut at ``cut``, saved, restored into a fresh head: bit-identical."""
    def step_fn(head, step):
        head.report_hardest = True
        emb, labels = make_batch(seed, step)
        e = emb.clone().requires_grad_(True)
        res = head(e, labels)
        res.loss.backward()
        return res.loss.item(), e.grad, res.hardest_class

    straight = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin())
    a = [step_fn(straight, s) for s in range(steps)]
    first = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin())
    for s in range(cut):
        step_fn(first, s)
    state = first.shard_state()
    resumed = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin())
    dropped = resumed.restore(state)
    b = [step_fn(resumed, s) for s in range(cut, steps)]
    same = all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
               for x, y in zip(a[cut:], b))
    return dropped, same, resumed.step, torch.equal(straight.protos, resumed.protos)


def test_resume_is_bit_exact(dist_pool):
    results = dist_pool(2).run(_rank_resume, 5, FORGETTING, 30, 13)
    assert all(r == (0, True, 30, True) for r in results)


def _rank_fill(seed, cfg, steps):
    head = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin())
    for step in range(steps):
        head(*make_batch(seed, step))
    return head.shard_state(), head.entries()


def _rank_load(cfg, shards, probe_seed, probe_step):
    """Load every saved shard at this world size, then run one step to see the table works."""
    head = PrototypeMemory(DIM, MemoryConfig(**cfg), Margin())
    dropped = head.restore(ShardFiles.of(shards))  # shards are read one at a time
    entries, step, state = head.entries(), head.step, head.shard_state()
    emb, labels = make_batch(probe_seed, probe_step)
    stats = head(emb, labels).stats
    return dropped, entries, step, state, stats


def test_reshard_round_trip_4_to_1_to_3(dist_pool):
    cfg = dict(capacity=120, num_classes=NUM_IDS)  # room for every class at any W: nothing dropped
    saved = dist_pool(4).run(_rank_fill, 6, cfg, 40)
    content = merged_entries([e for _, e in saved], 4)
    assert len(content) > 40  # well filled

    probe = make_batch(6, 40)[1]
    expected_hit_rate = len(set(probe.tolist()) & set(content)) / len(set(probe.tolist()))
    one = dist_pool(1).run(_rank_load, cfg, [s for s, _ in saved], 6, 40)
    dropped, entries, step, state_1, stats = one[0]
    assert dropped == 0 and step == 40
    assert_same_content(merged_entries([entries], 1), content, 0.0)
    assert stats["hit_rate"] == pytest.approx(expected_hit_rate)

    three = dist_pool(3).run(_rank_load, cfg, [state_1], 6, 40)
    assert [r[0] for r in three] == [0, 0, 0] and all(r[2] == 40 for r in three)
    assert_same_content(merged_entries([r[1] for r in three], 3), content, 0.0)
    assert all(r[4]["hit_rate"] == pytest.approx(expected_hit_rate) for r in three)


@pytest.mark.parametrize("eviction", ["oldest_refresh", "fifo"])
def test_reshard_into_smaller_memory_keeps_what_eviction_would_keep(dist_pool, eviction):
    cfg = dict(capacity=120, num_classes=NUM_IDS, eviction=eviction)
    saved = dist_pool(4).run(_rank_fill, 7, cfg, 40)
    states = [s for s, _ in saved]
    small = dict(cfg, capacity=16)  # 8 slots per rank at W = 2
    loaded = dist_pool(2).run(_rank_load, small, states, 7, 40)
    time = "refreshed" if eviction == "oldest_refresh" else "inserted"
    for r, (dropped, entries, _, _, _) in enumerate(loaded):
        candidates = sorted((int(s[time][i]), int(s["slot_class"][i]))
                            for s in states for i in range(len(s["slot_class"]))
                            if s["slot_class"][i] >= 0 and s["slot_class"][i] % 2 == r)
        assert dropped == len(candidates) - 8
        assert entries["classes"].tolist() == sorted(c for _, c in candidates[-8:])


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("option,value", [
    ("capacity", 0), ("capacity", 2.5), ("num_classes", -1), ("generation", "median"),
    ("positive", "self"), ("refresh", "replace"), ("ema_alpha", 1.0), ("ema_alpha", -0.1),
    ("ema_alpha", float("nan")), ("eviction", "lru"), ("forget_after", 0), ("forget_after", True),
    ("prototype_grad", "yes"), ("dtype", "float16"),
])
def test_config_errors_name_the_option(option, value):
    cfg = MemoryConfig(capacity=8, num_classes=10)
    setattr(cfg, option, value)
    with pytest.raises(ValueError, match=option):
        cfg.validate()
    with pytest.raises(ValueError, match=option):
        PrototypeMemory(4, cfg, Margin())


def test_prototype_grad_with_leave_one_out_is_refused():
    cfg = MemoryConfig(capacity=8, num_classes=10, prototype_grad=True, positive="leave_one_out")
    with pytest.raises(ValueError, match="prototype_grad.*leave_one_out"):
        cfg.validate()


def test_config_from_yaml_mapping_validates():
    from pm_dist.config_io import ConfigError, from_dict
    cfg = from_dict(MemoryConfig, {"capacity": 64, "num_classes": 100, "refresh": "overwrite"})
    assert cfg.refresh == "overwrite" and cfg.ema_alpha == 0.5
    with pytest.raises(ConfigError, match="eviction"):
        from_dict(MemoryConfig, {"capacity": 64, "num_classes": 100, "eviction": "lifo"})


def _rank_construct(kwargs, classes_per_batch):
    try:
        PrototypeMemory(4, MemoryConfig(**kwargs), Margin(), classes_per_batch=classes_per_batch)
    except ValueError as err:
        return str(err)
    return None


def test_capacity_errors_say_the_minimum(dist_pool):
    # M < W: a rank without a slot
    msgs = dist_pool(3).run(_rank_construct, dict(capacity=2, num_classes=10), None)
    assert all("capacity=2" in m and "capacity ≥ 3" in m for m in msgs)
    # 6 classes per batch may all live on one rank: floor(M / W) ≥ 6 → M ≥ 18 at W = 3
    msgs = dist_pool(3).run(_rank_construct, dict(capacity=17, num_classes=100), 6)
    assert all("capacity=17" in m and "minimum is capacity" in m and "= 18" in m for m in msgs)
    assert dist_pool(3).run(_rank_construct, dict(capacity=18, num_classes=100), 6) == [None] * 3


def test_batch_overflowing_a_shard_is_refused_with_the_minimum():
    head = PrototypeMemory(4, MemoryConfig(capacity=5, num_classes=100), Margin())
    with pytest.raises(ValueError, match=r"6 distinct classes.*capacity=5.*= 6"):
        head(torch.randn(12, 4), torch.arange(6).repeat(2))
    assert head.step == 0 and head.occupancy == 0


def test_bad_labels_and_shapes():
    head = PrototypeMemory(4, MemoryConfig(capacity=8, num_classes=10), Margin())
    with pytest.raises(ValueError, match="out of range"):
        head(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        head(torch.randn(2, 5), torch.tensor([1, 2]))


def test_load_errors():
    cfg = MemoryConfig(capacity=8, num_classes=10)
    head = PrototypeMemory(4, cfg, Margin())
    head(torch.randn(4, 4), torch.tensor([1, 1, 2, 2]))
    state = head.shard_state()
    with pytest.raises(ValueError, match="dimension 4.*embedding_size 6"):
        PrototypeMemory(6, cfg, Margin()).restore(state)
    with pytest.raises(ValueError, match="not a prototype memory shard"):
        head.restore({"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="not a prototype memory shard"):
        head.restore(dict(state, format="pm_dist.prototype_memory/0"))
    with pytest.raises(ValueError, match="num_classes=2"):
        PrototypeMemory(4, MemoryConfig(capacity=8, num_classes=2), Margin()).restore(state)
    rank1_of_2 = dict(state, world_size=2, rank=1)
    with pytest.raises(ValueError, match=r"needs all its shards.*got ranks \[1\]"):
        head.restore(rank1_of_2)
    assert state["format"] == STATE_FORMAT and state["step"] == 1


# ------------------------------------------------------------------------------- cost vs N
def test_step_cost_does_not_grow_with_num_classes():
    """The class → slot table is the only per-identity structure and a step touches O(batch) of it:
    10⁷ identities cost what 10³ do (best of several repeats, loose bound for a shared machine)."""
    import time

    def best_step_time(num_classes):
        head = PrototypeMemory(DIM, MemoryConfig(capacity=64, num_classes=num_classes), Margin())
        assert head.table.numel() == num_classes and head.table.dtype == torch.int32
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(16, DIM, generator=g),
                    torch.randint(0, num_classes, (8,), generator=g).repeat(2))
                   for _ in range(40)]
        best = float("inf")
        for emb, labels in batches:
            start = time.perf_counter()
            head(emb.requires_grad_(True), labels).loss.backward()
            best = min(best, time.perf_counter() - start)
        return best

    small, large = best_step_time(1_000), best_step_time(10_000_000)
    assert large < 2.5 * small + 1e-4, (small, large)


def test_second_forward_before_backward_is_refused_not_silently_wrong():
    """The memory is updated in place and the softmax keeps the shard itself for backward: a
    backward after the next forward must fail loudly, not use the updated memory."""
    head = PrototypeMemory(4, MemoryConfig(capacity=8, num_classes=10), Margin())
    first = head(torch.randn(4, 4, requires_grad=True), torch.tensor([1, 1, 2, 2]))
    head(torch.randn(4, 4, requires_grad=True), torch.tensor([3, 3, 2, 2]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.loss.backward()

"""Doppelganger mining: the table's update rule, the sampler's share and determinism, the look-ahead
rule with DataLoader workers, training with every head, recovery of planted look-alikes, harder
batches, exact resume, W = 1 → 2, and nothing changed when it is off."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pm_dist.config import load_config
from pm_dist.config_io import ConfigError
from pm_dist.data.config import DataConfig
from pm_dist.data.loader import build_train_loader
from pm_dist.mining import (BYTES_PER_IDENTITY, DoppelgangerMiner, DoppelgangerTable, MiningConfig,
                            encoder_recovery, hardest_per_class, planted_recovery)


# ------------------------------------------------------------------------------ the table
def test_hardest_per_class_takes_the_max_over_rows_and_ignores_invalid_rows():
    labels = [5, 5, 3, 3, 7, 7]
    hardest = [1, 2, 9, 8, -1, 7]  # class 7: no valid row (−1, and its own class)
    cos = [0.2, 0.6, 0.5, 0.5, 0.9, 0.99]
    classes, cand, c = hardest_per_class(labels, hardest, cos)
    assert classes.tolist() == [3, 5]
    assert cand.tolist() == [8, 2]  # class 3: a tie, the smaller id
    assert c.dtype == np.float16 and c.tolist() == pytest.approx([0.5, 0.6], abs=1e-3)


def _step(table, step, pairs):
    """One observation: class → (hardest, cos), one row each."""
    labels = [c for c in pairs]
    return table.update(step, labels, [pairs[c][0] for c in labels], [pairs[c][1] for c in labels])


def test_update_rule_set_confirm_harder_and_patience():
    t = DoppelgangerTable(10, patience=2)
    assert t.nbytes == 10 * BYTES_PER_IDENTITY
    _step(t, 0, {0: (4, 0.5)})  # no entry: set
    assert (t.partners([0]).tolist(), t.age[0], t.entries) == ([4], 0, 1)
    _step(t, 1, {0: (5, 0.4)})  # softer, age 0 < patience: kept, age 1
    assert (t.partners([0]).tolist(), t.age[0]) == ([4], 1)
    c = _step(t, 2, {0: (4, 0.3)})  # the partner again: confirmed (cos refreshed), age 0
    assert (t.partners([0]).tolist(), t.age[0], c["confirmed"]) == ([4], 0, 1)
    assert float(t.cos[0]) == pytest.approx(0.3, abs=1e-3)
    c = _step(t, 3, {0: (6, 0.35)})  # harder than the stored 0.3: replaced
    assert (t.partners([0]).tolist(), c["replaced"]) == ([6], 1)
    for s in (4, 5):  # softer twice: age 1, 2
        _step(t, s, {0: (7, 0.1)})
    assert (t.partners([0]).tolist(), t.age[0]) == ([6], 2)
    _step(t, 6, {0: (7, 0.1)})  # aged past patience: the softer candidate replaces it
    assert (t.partners([0]).tolist(), t.age[0], t.entries) == ([7], 0, 1)
    t.update(7)  # a skipped step: nothing changes, the step counts
    assert t.steps == 8 and t.partners([0]).tolist() == [7]
    with pytest.raises(RuntimeError, match="expected 8"):
        t.update(9)


def test_age_saturates_and_patience_zero_always_takes_the_latest():
    t = DoppelgangerTable(4, patience=255)
    _step(t, 0, {1: (2, 0.9)})
    for s in range(1, 256):
        _step(t, s, {1: (3, 0.1)})
    assert t.age[1] == 255 and t.partners([1]).tolist() == [2]  # 8 bits: the age stops at 255
    _step(t, 256, {1: (3, 0.1)})
    assert t.age[1] == 0 and t.partners([1]).tolist() == [3]  # age 255 ≥ patience: replaced
    t = DoppelgangerTable(4, patience=0)
    _step(t, 0, {1: (2, 0.9)})
    _step(t, 1, {1: (3, 0.1)})
    assert t.partners([1]).tolist() == [3]


def test_a_partner_mined_into_the_batch_does_not_confirm_itself():
    t = DoppelgangerTable(10, patience=1)
    _step(t, 0, {0: (4, 0.5)})
    t.update(1, [0], [4], [0.6], mined_for=[0])  # 4 was mined for 0: no confirmation, age 1
    assert (t.partners([0]).tolist(), t.age[0]) == ([4], 1)
    c = t.update(2, [0], [4], [0.6], mined_for=[0])  # aged past patience, still only self-confirmed
    assert (t.partners([0]).tolist(), c["cleared"], t.entries) == ([-1], 1, 0)
    t.update(3, [0], [5], [0.2])  # drawn at random next time: measured afresh
    assert t.partners([0]).tolist() == [5]
    t.update(4, [0], [6], [0.3], mined_for=[0])  # a different, harder candidate still replaces
    assert t.partners([0]).tolist() == [6]


def test_partners_as_of_an_earlier_step():
    t = DoppelgangerTable(10, patience=0, history=3)
    states = [t.partner.copy()]
    for s in range(6):
        _step(t, s, {s % 4: ((s + 5) % 10, 0.5), 9: (s, 0.5)})
        states.append(t.partner.copy())
    everyone = np.arange(10)
    for as_of in range(3, 7):  # the last three steps are kept
        np.testing.assert_array_equal(t.partners(everyone, as_of), states[as_of])
    with pytest.raises(RuntimeError, match="history"):
        t.partners(everyone, 2)
    with pytest.raises(RuntimeError, match="plans further ahead"):
        t.partners(everyone, 7)
    # saved and loaded: the same answers, now and as of older steps
    u = DoppelgangerTable(10, patience=0, history=3)
    u.load_state_dict(t.state_dict())
    for as_of in range(3, 7):
        np.testing.assert_array_equal(u.partners(everyone, as_of), states[as_of])
    with pytest.raises(ValueError, match="saved for 10 identities"):
        DoppelgangerTable(11).load_state_dict(t.state_dict())


# ------------------------------------------------------------------------------ config
def test_config_section_validation_and_removed_key():
    cfg = load_config(None, ["mining.enabled=true", "mining.fraction=0.25"])
    assert cfg.mining.enabled and cfg.mining.fraction == 0.25
    assert not load_config(None, []).mining.enabled
    with pytest.raises(ConfigError, match="did you mean 'patience'"):
        load_config(None, ["mining.patiense=3"])
    with pytest.raises(ConfigError, match="fraction must be in"):
        load_config(None, ["mining.fraction=1.5"])
    with pytest.raises(ConfigError, match="patience must be in"):
        load_config(None, ["mining.patience=300"])
    with pytest.raises(ConfigError, match="min_images must be ≥ 2 .an identity with fewer"):
        load_config(None, ["mining.min_images=1"])
    with pytest.raises(ConfigError, match="mining.delay=2 is smaller than the loader's look-ahead"):
        load_config(None, ["mining.enabled=true", "mining.delay=2"])  # 2 workers × prefetch 2
    load_config(None, ["mining.enabled=true", "mining.delay=0", "data.num_workers=0"])
    load_config(None, ["mining.delay=0"])  # off: not checked
    with pytest.raises(ConfigError, match="unknown config key 'data.proposal_fraction'"):
        load_config(None, ["data.proposal_fraction=0.5"])


def test_removed_proposal_fraction_in_a_file_names_its_replacement(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  proposal_fraction: 0.5\n")
    with pytest.raises(ConfigError, match="mining.fraction"):
        load_config(str(path))


# ------------------------------------------------------------------------------ sampler
def _data(**kw):
    base = dict(num_workers=0, image_size=16, num_identities=200, heldout_identities=0,
                count_median=4, count_sigma=0.5, min_images=1)
    return DataConfig(**{**base, **kw}).validate()


def _fake_observe(miner, step, labels):
    """A deterministic stand-in for the head: row i's hardest is a function of (label, step)."""
    labels = torch.as_tensor(labels)
    hardest = (labels * 7 + step) % miner.table.num_classes
    cos = torch.sin(labels.double() * 1.3 + step).float()
    miner.observe(torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(step)),
                  labels, SimpleNamespace(hardest_class=hardest, hardest_cos=cos))
    return miner.end_step(step, {"skipped": 0.0})


def _mined_run(cfg: DataConfig, mining: MiningConfig, steps: int, start=0, state=None, W=1, rank=0):
    """Batches (global labels) of steps start … start+steps−1 from the loader, the table updated
    from a fake head after each: the loop of the trainer, without a model."""
    P, K = 16, 2
    loaders = [build_train_loader(cfg, P, K, r, W, start_step=start, sync_errors=False)
               for r in range(W)]
    dataset = loaders[0].dataset
    miner = DoppelgangerMiner(mining, dataset.num_classes, counts=dataset.counts)
    for ld in loaders:
        mining.check_lookahead(ld.lookahead)
        ld.sampler.set_proposer(miner.propose, mining.fraction)
    if state is not None:
        miner.load_state_dict(state)
    batches, metrics = [], []
    try:
        for step in range(start, start + steps):
            labels = torch.cat([next(ld)[1] for ld in loaders])
            batches.append(labels.clone())
            metrics.append(_fake_observe(miner, step, labels))
    finally:
        for ld in loaders:
            ld.close()
    return batches, metrics, miner


def test_share_f_dedup_and_skip_identities_without_partner():
    mining = MiningConfig(enabled=True, fraction=0.5, delay=0)
    batches, metrics, miner = _mined_run(_data(), mining, 30)
    for b in batches:
        classes = b.view(-1, 2)[:, 0]
        assert len(torch.unique(classes)) == 16  # P distinct identities, mined ones included
    shares = [m["mining/share_mined"] for m in metrics]
    assert shares[0] == 0.0  # empty table: every identity drawn at random
    assert max(shares) <= 0.5 and np.mean(shares[-10:]) > 0.3
    assert miner.table.steps == 30


def test_identities_with_too_few_images_are_not_proposed():
    mining = MiningConfig(enabled=True, fraction=0.5, delay=0, min_images=10 ** 6)
    _, metrics, _ = _mined_run(_data(), mining, 10)
    assert all(m["mining/share_mined"] == 0.0 for m in metrics)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_do_not_depend_on_loader_timing(workers):
    """delay = 4 ≥ look-ahead: with 2 workers × prefetch 2 the batches equal those made without
    workers (plan t made exactly when batch t is due), and the same on every rank (W = 2)."""
    mining = MiningConfig(enabled=True, fraction=0.5, delay=4)
    ref, _, ref_miner = _mined_run(_data(), mining, 14)
    got, _, miner = _mined_run(_data(num_workers=workers, prefetch_factor=2), mining, 14, W=2)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(ref_miner.table.partner, miner.table.partner)


def test_delay_below_the_lookahead_is_refused_even_unchecked():
    mining = MiningConfig(enabled=True, fraction=0.5, delay=3)
    with pytest.raises(ValueError, match="look-ahead of 4"):
        mining.check_lookahead(4)
    cfg = _data(num_workers=2, prefetch_factor=2)
    loader = build_train_loader(cfg, 16, 2, 0, 1, sync_errors=False)
    miner = DoppelgangerMiner(mining, 200)
    loader.sampler.set_proposer(miner.propose, 0.5)
    with pytest.raises(RuntimeError, match="plans further ahead"):
        for step in range(10):
            _fake_observe(miner, step, next(loader)[1])
    loader.close()


def test_resume_replays_the_same_batches_and_table():
    mining = MiningConfig(enabled=True, fraction=0.5, delay=4)
    full, _, full_miner = _mined_run(_data(), mining, 20)
    _, _, half = _mined_run(_data(), mining, 9)
    state = half.state_dict()
    rest, _, resumed = _mined_run(_data(num_workers=2), mining, 11, start=9, state=state)
    for a, b in zip(full[9:], rest):
        assert torch.equal(a, b)
    for k in ("partner", "cos", "age"):
        np.testing.assert_array_equal(getattr(full_miner.table, k), getattr(resumed.table, k))


# ------------------------------------------------------------------------------ metrics
def test_metrics_of_a_step():
    miner = DoppelgangerMiner(MiningConfig(enabled=True, delay=0), 10)
    # table: 0 ↔ 1 mutual, 2 → 3 (3 has none)
    miner.table.update(0, [0, 1, 2], [1, 0, 3], [0.9, 0.9, 0.8])
    out = miner.propose(1, None, 2, np.array([0, 2]))
    assert out.tolist() == [1, 3]
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # classes 0,1 | 2,3
    e = torch.cat([emb[:2], emb[2:]])
    labels = torch.tensor([0, 1, 2, 3])
    miner.observe(e, labels, SimpleNamespace(hardest_class=torch.tensor([1, 0, 3, 2]),
                                            hardest_cos=torch.ones(4)))
    m = miner.end_step(1, {"skipped": 0.0})
    assert m["mining/share_mined"] == 0.5
    assert m["mining/mutual"] == 0.5  # 0 ↔ 1 mutual; 3 had no partner
    assert m["mining/cos_mined"] == pytest.approx(1.0)
    assert m["mining/cos_random"] == pytest.approx(0.0)  # the random ones: 0 and 2, orthogonal
    assert m["mining/entries"] == pytest.approx(0.4)


def test_a_head_that_does_not_report_is_named():
    miner = DoppelgangerMiner(MiningConfig(enabled=True, delay=0), 10)
    with pytest.raises(RuntimeError, match="hardest_class = None"):
        miner.observe(torch.zeros(2, 2), torch.tensor([0, 1]),
                      SimpleNamespace(hardest_class=None, hardest_cos=None))


def test_planted_recovery_counts_twins():
    t = DoppelgangerTable(6)
    t.update(0, [0, 1, 2], [1, 4, 3], [0.5, 0.5, 0.5])
    r = planted_recovery(t, np.array([[0, 1], [2, 3]]))
    assert r["recovered"] == 0.5 and r["filled"] == 0.75 and r["chance"] == pytest.approx(0.2)


def test_encoder_recovery_finds_twins_by_nearest_class_mean():
    """Four identities whose images differ in one colour channel: 0 and 1 share a bright red, 2 and
    3 a bright green; the encoder is the identity on the pixels (mode restored afterwards). Twins
    planted as (0, 1), (2, 3) are all found; planted as (0, 2), (1, 3), none."""
    colour = {0: (255, 127, 127), 1: (255, 170, 127), 2: (127, 255, 127), 3: (127, 255, 170)}

    class Generator:
        num_classes = 4

        def counts(self, classes):
            return np.array([3 for _ in classes])

        def render(self, c, k):  # k adds a little noise that must not matter
            img = np.empty((4, 4, 3), np.uint8)
            img[:] = colour[c]
            img[0, 0, 2] = 127 + k
            return img

    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 48, bias=False))
    with torch.no_grad():
        encoder[1].weight.copy_(torch.eye(48))
    encoder.train()
    found = encoder_recovery(encoder, Generator(), np.array([[0, 1], [2, 3]]), batch_size=5)
    assert found == {"recovered": 1.0, "chance": pytest.approx(1 / 3), "pairs": 2}
    assert encoder.training
    assert encoder_recovery(encoder, Generator(), np.array([[0, 2], [1, 3]]))["recovered"] == 0.0


# ------------------------------------------------------------------------------ training
BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=120",
    "data.heldout_identities=100", "data.count_median=6", "data.nuisance=0.5",
    "model.embedding_size=32", "batch.classes_per_batch=16", "batch.images_per_class=2",
    "head.memory.capacity=64", "run.progress=false", "run.log_every=0", "run.checkpoint_every=0",
    "optim.warmup_steps=5", "eval.synthetic_pairs=0", "mining.delay=0",
]


def _train(out_dir, overrides, resume="none", encoder_reference=False):
    """A run; with ``encoder_reference``, also the twins its final encoder finds by class mean."""
    from pm_dist.distributed import init_distributed
    from pm_dist.train import Trainer

    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    trainer = Trainer(cfg, init_distributed(), resume=resume, record_history=True)
    batches = []
    observer = trainer.train_step.head_observer
    if observer is not None:
        def record(e, labels, out):
            batches.append(labels.clone())
            observer(e, labels, out)
        trainer.train_step.head_observer = record
    at_start = None if trainer.miner is None else trainer.miner.table.state_dict()
    trainer.fit()
    miner = trainer.miner
    result = dict(history=trainer.history, batches=batches, at_start=at_start,
                  report_hardest=trainer.head.report_hardest,
                  proposer=trainer.loader.sampler._proposer is not None,
                  observer=trainer.train_step.head_observer is not None)
    if miner is not None:
        result["table"] = miner.table.state_dict()
        gen = trainer.loader.dataset.generator
        pairs = gen.doppelganger_pairs()
        result["recovery"] = planted_recovery(miner.table, pairs)
        if encoder_reference:
            result["encoder"] = encoder_recovery(trainer.engine.module, gen, pairs)
    return result


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs)


@pytest.mark.parametrize("head", ["prototype_memory", "full_fc", "partial_fc"])
def test_mining_runs_with_every_head_at_world_size_2(dist_pool, tmp_path, head):
    r0, r1 = dist_pool(2).run(_train, str(tmp_path), [f"head.name={head}", "run.steps=16",
                                                      "mining.enabled=true"])
    assert r0["report_hardest"] and r0["proposer"] and r0["observer"]
    for k in ("partner", "cos", "age"):  # replicated: the same on both ranks, no collective
        assert torch.equal(r0["table"][k], r1["table"][k])
    assert r0["table"]["partner"].ge(0).sum() > 0
    assert r0["history"][-1]["mining/entries"] > 0
    assert max(h["mining/share_mined"] for h in r0["history"]) > 0
    for a, b in zip(r0["batches"], r1["batches"]):
        assert torch.equal(a, b)


def test_off_changes_nothing(dist_pool, tmp_path):
    [r] = dist_pool(1).run(_train, str(tmp_path), ["run.steps=2"])
    assert r["report_hardest"] is False and not r["proposer"] and not r["observer"]
    assert not any(k.startswith("mining/") for k in r["history"][0])


def _score(trainer, images, labels) -> tuple[float, float]:
    """Two losses of (images, labels) with the current encoder, changing nothing in the run:

    * ``run``: the run's head (its memory holds every identity here), its buffers (Prototype
      Memory's forward writes its memory) and step put back afterwards;
    * ``batch``: a Prototype Memory of the run's options whose memory holds only this batch, so
      the negatives are the batch's own identities: how hard the batch is in itself.

    The encoder is a copy (train mode: batch statistics, as in training) and the global RNG state
    is put back, so the run trains exactly as it would unscored."""
    from pm_dist.heads.memory import PrototypeMemory

    head = trainer.head
    saved = {name: buf.clone() for name, buf in head.named_buffers()}
    step, rng = head.step, torch.get_rng_state()
    encoder = copy.deepcopy(trainer.engine.module).train()
    P = len(torch.unique(labels))
    alone = PrototypeMemory(head.dim, dataclasses.replace(head.config, capacity=P), head.margin,
                            classes_per_batch=P, group=head.group)
    try:
        with torch.no_grad():
            e = encoder(images).float()
            return head(e, labels).loss.item(), alone(e, labels).loss.item()
    finally:
        for name, value in saved.items():
            head.get_buffer(name).copy_(value)
        head.step = step
        torch.set_rng_state(rng)


def _train_scored(out_dir, overrides, first, every):
    """A mining run that, at steps first, first + every, … and before training on the step's mined
    batch, scores it and the batch the sampler draws at that step without mining (the same
    (seed, step): its first (1 − f)·P identities are the mined batch's randomly drawn ones), with
    the same weights and memory (``_score``). Returns history, recovery and scores: per scored step
    (step, (run, alone) of the mined batch, (run, alone) of the random one)."""
    from pm_dist.distributed import init_distributed
    from pm_dist.train import Trainer

    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    loader = trainer.loader
    plans = copy.copy(loader._plans)  # the loader's planner, with a sampler that does not mine
    plans.sampler = copy.copy(loader.sampler)
    plans.sampler.set_proposer(None)
    fetch = loader._loader.dataset
    train_step, scores = trainer.train_step, []
    run = train_step._run

    def scored_run(images, labels):
        step = train_step.step
        if step >= first and (step - first) % every == 0:
            _, rnd_images, rnd_labels, _, _ = fetch[plans.plan(step)]
            scores.append((step, _score(trainer, images, labels),
                           _score(trainer, rnd_images, rnd_labels)))
        return run(images, labels)

    train_step._run = scored_run
    trainer.fit()
    gen = trainer.loader.dataset.generator
    return dict(history=trainer.history, scores=scores,
                recovery=planted_recovery(trainer.miner.table, gen.doppelganger_pairs()),
                encoder=encoder_recovery(trainer.engine.module, gen, gen.doppelganger_pairs()))


def test_planted_pairs_recovered_and_mined_batches_harder(dist_pool, tmp_path):
    """Look-alike pairs planted in half the identities (twins at 0.1 of their independent distance),
    nuisance 0.25, memory for every identity, 100 steps of 16 × 2 at W = 1, mining on (f = 0.5).

    Harder, at equal steps with equal weights: at every step from 40 on (60 steps), before training
    on it, the step's mined batch and the batch drawn at that step without mining (the same first
    (1 − f)·P identities, the rest at random) are scored by the same copy of the current encoder
    (``_score``, which leaves the run unchanged). Asserted on the loss with a memory of the batch
    alone (negatives: the batch's own identities). Measured, mean over the 60 steps, mined vs
    random (mined higher at how many steps; the gap's standard error):

        run seed 0, 1 thread   21.29 vs 20.00  (47/60, 0.28)    recovery 0.172
        run seed 1, 1 thread   21.30 vs 20.46  (39/60, 0.24)    recovery 0.138
        run seed 2, 1 thread   20.72 vs 20.23  (37/60, 0.25)    recovery 0.121
        run seed 0, 2 threads  21.56 vs 20.64  (44/60, 0.25)    recovery 0.172
        run seed 1, 2 threads  22.11 vs 20.92  (40/60, 0.26)    recovery 0.155

    (seed 0 is this test; the gap is 2.0–4.6 standard errors). With the run's own memory, which
    holds every identity and hence every look-alike whatever the batch, the mined batch is *not*
    measurably harder: 22.91 vs 22.87, 22.66 vs 22.52, 22.29 vs 22.34, 22.98 vs 22.75, 23.32 vs
    22.95 (gaps −0.05 … +0.37, standard error 0.19–0.28): mining makes a batch harder through the
    negatives the batch itself brings (docs/mining.md). That is printed, not asserted.

    Also: planted twins recovered ≥ 10 × chance (0.12–0.17 above vs chance 0.0084), and mined
    pairs' class means closer than random pairs'."""
    extra = ["run.steps=100", "data.doppelganger_fraction=0.5", "data.doppelganger_distance=0.1",
             "data.nuisance=0.25", "head.memory.capacity=128", "mining.enabled=true",
             "mining.fraction=0.5"]
    [on] = dist_pool(1).run(_train_scored, str(tmp_path), extra, 40, 1)
    rec = on["recovery"]
    print("recovery:", rec, "encoder's own nearest class mean:", on["encoder"])
    assert rec["filled"] == 1.0
    assert rec["recovered"] >= 10 * rec["chance"], rec  # measured: 0.12–0.17 vs chance 0.0084

    steps = [s for s, _, _ in on["scores"]]
    assert steps == list(range(40, 100))
    (run_mined, alone_mined), (run_random, alone_random) = (
        np.array([x[i] for x in on["scores"]]).T for i in (1, 2))
    gap = alone_mined - alone_random
    stderr = gap.std(ddof=1) / math.sqrt(len(gap))
    print(f"batch alone: mined {alone_mined.mean():.3f} random {alone_random.mean():.3f} (gap "
          f"{gap.mean():.2f} ± {stderr:.2f}), mined higher at {(gap > 0).sum()} of {len(gap)} "
          f"steps; run's memory: mined {run_mined.mean():.3f} random {run_random.mean():.3f}")
    # measured: 1.29 ± 0.28, higher at 0.78 of the steps (other seeds: 0.49 … 1.19, 0.62 … 0.73)
    assert gap.mean() > 2 * stderr, (gap.mean(), stderr)
    assert (gap > 0).mean() > 0.6, gap

    late = slice(50, 100)
    cos_mined = _mean([h["mining/cos_mined"] for h in on["history"][late]])
    cos_random = _mean([h["mining/cos_random"] for h in on["history"][late]])
    print(f"class-mean cosine of mined pairs {cos_mined:.3f}, of random pairs {cos_random:.3f}")
    assert cos_mined > cos_random + 0.2, (cos_mined, cos_random)  # measured: 0.79 vs 0.23
    assert _mean([h["mining/share_mined"] for h in on["history"][late]]) > 0.3


def test_planted_pairs_largely_recovered_with_a_fresher_memory(dist_pool, tmp_path):
    """The recovery benchmark's setting with 32 identities per batch (each prototype refreshed
    every ≈ 3.75 steps instead of 7.5) and twins at 0.05 of their independent distance, mining on
    (f = 0.5), 300 steps: the table names the twin of 0.466 of the planted identities, 55 × chance
    and 0.56 of what the final encoder knows by nearest class mean (0.828). Other seeds (docs/
    mining.md, benchmarks/mining_recovery.py): 0.17–0.52 at 300 steps, 0.31–0.72 at 1000."""
    extra = ["data.nuisance=0.25", "data.doppelganger_fraction=0.5",
             "data.doppelganger_distance=0.05", "head.memory.capacity=128",
             "batch.classes_per_batch=32", "run.steps=300", "mining.enabled=true",
             "mining.fraction=0.5"]
    [r] = dist_pool(1).run(_train, str(tmp_path), extra, encoder_reference=True)
    rec, enc = r["recovery"], r["encoder"]
    print("recovery:", rec, "encoder's own nearest class mean:", enc)
    assert rec["recovered"] >= 0.4, rec  # measured: 0.466; chance 0.0084
    assert rec["recovered"] >= 0.4 * enc["recovered"], (rec, enc)  # measured 0.56 of it


def test_resume_exact_and_world_size_1_to_2(dist_pool, tmp_path):
    extra = ["run.steps=16", "run.checkpoint_every=8", "mining.enabled=true", "mining.delay=3"]
    [full] = dist_pool(1).run(_train, str(tmp_path / "a"), extra)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000008")
    [same] = dist_pool(1).run(_train, str(tmp_path / "b"), extra, ckpt)
    for a, b in zip(full["batches"][8:], same["batches"]):
        assert torch.equal(a, b)
    for k in ("partner", "cos", "age"):
        assert torch.equal(full["table"][k], same["table"][k])
    assert [h["loss"] for h in full["history"][8:]] == [h["loss"] for h in same["history"]]
    # W = 1 → 2: the table loads unchanged on both ranks; the batches planned from the saved
    # history (the first `delay` after the resume) equal the uninterrupted run's
    two = dist_pool(2).run(_train, str(tmp_path / "c"), extra, ckpt)
    saved = torch.load(tmp_path / "a" / "checkpoints" / "step_00000008" / "state_rank0.pt",
                       weights_only=False)["mining"]["table"]
    for r in two:
        for k in ("partner", "cos", "age"):
            assert torch.equal(r["at_start"][k], saved[k])
        assert r["at_start"]["steps"] == 8
        for a, b in zip(full["batches"][8:11], r["batches"][:3]):
            assert torch.equal(a, b)
    for k in ("partner", "cos", "age"):
        assert torch.equal(two[0]["table"][k], two[1]["table"][k])

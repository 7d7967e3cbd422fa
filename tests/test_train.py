"""End-to-end training on CPU/gloo: every head learns, exact resume, resharded resume, ZeRO/bf16
against a plain PyTorch reference, non-finite steps skipped on every rank.

The trainer runs inside the shared gloo ranks of ``dist_pool`` (DataLoader workers off: the ranks
are daemon processes), on tiny synthetic identities.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from pm_dist.config import load_config
from pm_dist.distributed import get_rank, get_world_size, init_distributed
from pm_dist.train import Trainer

BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=120",
    "data.heldout_identities=100", "data.count_median=6", "data.nuisance=0.5",
    "model.embedding_size=32",
    "batch.classes_per_batch=16", "batch.images_per_class=2", "head.memory.capacity=64",
    "run.progress=false", "run.log_every=0", "run.checkpoint_every=0", "optim.warmup_steps=5",
    "eval.synthetic_pairs=600", "eval.batch_size=128",
]


def _train(out_dir, overrides, resume="none"):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    trainer = Trainer(cfg, init_distributed(), resume=resume, record_history=True)
    result = trainer.fit()
    head = trainer.head
    return dict(
        losses=[h["loss"] for h in trainer.history], history=trainer.history,
        eval={r["name"]: r for r in result["eval"]},
        weights={k: v.clone() for k, v in trainer.engine.module.state_dict().items()},
        params={k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()},
        head_state=head.shard_state(), skipped=trainer.skipped_steps, step=trainer.step,
    )


def _tensors(state):
    """Every tensor in a nested state (a head's shard state)."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return []


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("head", ["prototype_memory", "full_fc", "partial_fc"])
def test_each_head_learns_at_world_size_2(dist_pool, tmp_path, head):
    # Learned weights start random and need more steps than prototypes, which are embeddings
    # from the first step (at 60 steps FC reached 0.56–0.69 over seeds, at 120 0.65–0.76).
    steps = 60 if head == "prototype_memory" else 120
    extra = [f"head.name={head}", f"run.steps={steps}", "optim.lr=0.2", "head.partial_fc.sample_rate=0.3",
             f"run.export_onnx={head == 'prototype_memory'}"]
    results = dist_pool(2).run(_train, str(tmp_path), extra)
    r0 = results[0]
    assert r0["losses"] == results[1]["losses"]  # the head's outputs are global
    # Prototype Memory's loss first *rises* while the memory fills with negatives (capacity 64
    # = 4 batches); compare after it is full.
    early, late = _mean(r0["losses"][5:15]), _mean(r0["losses"][-10:])
    assert late < early, (head, early, late)
    acc = r0["eval"]["synthetic-pairs"]["accuracy"]
    assert acc > 0.6, (head, acc)  # chance: 0.5 ± 0.02 on 600 pairs
    for k, v in r0["params"].items():  # data parallel: one encoder (BatchNorm statistics are
        assert torch.equal(v, results[1]["params"][k]), k  # per rank, as without SyncBN)
    assert os.path.exists(tmp_path / "encoder.pt")
    assert os.path.exists(tmp_path / "metrics.jsonl")
    assert os.path.exists(tmp_path / "encoder.onnx") == (head == "prototype_memory")


def test_exact_resume_same_world_size(dist_pool, tmp_path):
    extra = ["run.steps=16", "run.checkpoint_every=8", "eval.synthetic_pairs=0",
             "model.dropout=0.1", "data.augment=true"]
    full = dist_pool(2).run(_train, str(tmp_path / "a"), extra)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000008")
    resumed = dist_pool(2).run(_train, str(tmp_path / "b"), extra, ckpt)
    for f, r in zip(full, resumed):
        assert r["losses"] == f["losses"][8:]  # bit for bit
        for k, v in f["weights"].items():
            assert torch.equal(v, r["weights"][k]), k
        assert torch.equal(f["head_state"]["protos"], r["head_state"]["protos"])


def test_resume_auto_picks_newest_valid_and_reshards_to_one_rank(dist_pool, tmp_path):
    extra = ["run.steps=12", "run.checkpoint_every=6", "eval.synthetic_pairs=0",
             "run.keep_checkpoints=3"]
    dist_pool(2).run(_train, str(tmp_path), extra)
    # damage the newest checkpoint: auto must pass over it
    newest = tmp_path / "checkpoints" / "step_00000012" / "head_rank1.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    [one] = dist_pool(1).run(_train, str(tmp_path), ["run.steps=16", "eval.synthetic_pairs=0",
                                                     "run.keep_checkpoints=3"], "auto")
    assert one["step"] == 16 and len(one["losses"]) == 10  # resumed at step 6 (12 was damaged)
    assert all(math.isfinite(x) for x in one["losses"])
    assert one["head_state"]["slot_class"].ge(0).sum() > 0


def test_explicit_damaged_checkpoint_names_the_file(dist_pool, tmp_path):
    extra = ["run.steps=4", "eval.synthetic_pairs=0"]
    dist_pool(1).run(_train, str(tmp_path), extra)
    bad = tmp_path / "checkpoints" / "step_00000004" / "head_rank0.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(Exception, match="head_rank0.pt is damaged"):
        dist_pool(1).run(_train, str(tmp_path), ["run.steps=6"],
                         str(tmp_path / "checkpoints" / "step_00000004"))


def _first_step_loss(out_dir, overrides):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "run.steps=3",
                                    "eval.synthetic_pairs=0"] + overrides)
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    trainer.fit()
    head = trainer.head
    return dict(loss=trainer.history[0]["loss"], slot_class=head.slot_class.clone(),
                protos=head.protos.float().clone())


def _reference_first_step_loss(world):
    """Plain PyTorch, one process: the same encoder init, each rank's slice through its own
    BatchNorm statistics (data parallel without SyncBN), one Prototype Memory step."""
    from pm_dist.data.loader import build_train_loader
    from pm_dist.heads import HeadContext, build_head
    from pm_dist.models import build_model
    from pm_dist.training.rng import seed_everything

    cfg = load_config(None, BASE)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.embedding_size, cfg.data.image_size).train()
    context = HeadContext(cfg.model.embedding_size, cfg.data.num_identities,
                          cfg.batch.classes_per_batch, 1, cfg.head.margin.build())
    head = build_head(cfg.head.name, cfg.head.options, context)
    parts = []
    for rank in range(world):
        loader = build_train_loader(cfg.data, cfg.batch.classes_per_batch,
                                    cfg.batch.images_per_class, rank, world, sync_errors=False)
        images, labels = next(iter(loader))
        loader.close()
        parts.append((model(images), labels))
    emb = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return head(emb, labels).loss.item()


@pytest.mark.parametrize("stage,precision,tol", [(0, "fp32", 1e-5), (1, "fp32", 1e-5),
                                                 (2, "fp32", 1e-5), (0, "bf16", 3e-2),
                                                 (2, "bf16", 3e-2)])
def test_zero_stages_and_bf16_first_step_match_plain_pytorch(dist_pool, tmp_path, stage, precision,
                                                             tol):
    results = dist_pool(2).run(_first_step_loss, str(tmp_path),
                               [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"])
    [ref] = dist_pool(1).run(_reference_first_step_loss, 2)
    for r in results:
        assert r["loss"] == pytest.approx(ref, rel=tol)
    # the memory is sharded: disjoint classes per rank, each by its owner rule
    a, b = (set(r["slot_class"][r["slot_class"] >= 0].tolist()) for r in results)
    assert a and b and not a & b
    assert all(c % 2 == 0 for c in a) and all(c % 2 == 1 for c in b)


def _train_with_injected_nan(out_dir, overrides, where):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "eval.synthetic_pairs=0"] + overrides)
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    module = trainer.engine.module
    poison_step, rank = 3, get_rank()

    def forward_hook(_mod, _inp, out):
        if trainer.step == poison_step and rank == 0:
            return out * float("nan")
        return out

    def grad_hook(grad):
        if trainer.step == poison_step and rank == get_world_size() - 1:
            return grad * float("nan")
        return grad

    if where == "embedding":
        module.register_forward_hook(forward_hook)
    else:
        next(p for p in module.parameters() if p.requires_grad).register_hook(grad_hook)
    trainer.fit()
    head = trainer.head
    finite_head = all(bool(torch.isfinite(t.float()).all()) for t in _tensors(head.shard_state())
                      if t.is_floating_point())
    return dict(skipped=[h["skipped"] for h in trainer.history], finite_head=finite_head,
                weights={k: v.detach().clone() for k, v in module.named_parameters()})


@pytest.mark.parametrize("where", ["embedding", "gradient"])
@pytest.mark.parametrize("head", ["prototype_memory", "full_fc"])
def test_non_finite_step_on_one_rank_is_skipped_on_all(dist_pool, tmp_path, where, head):
    results = dist_pool(2).run(_train_with_injected_nan, str(tmp_path),
                               ["run.steps=6", f"head.name={head}"], where)
    for r in results:
        assert r["skipped"] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        assert r["finite_head"]
        assert all(bool(torch.isfinite(v.float()).all()) for v in r["weights"].values())
    for k, v in results[0]["weights"].items():
        assert torch.equal(v, results[1]["weights"][k]), k


def test_full_fc_reshards_weights_and_momentum_from_two_ranks_to_one(dist_pool, tmp_path):
    extra = ["head.name=full_fc", "run.steps=6", "eval.synthetic_pairs=0"]
    two = dist_pool(2).run(_train_with_head_optimizer, str(tmp_path), extra)
    [one] = dist_pool(1).run(_train_with_head_optimizer, str(tmp_path), extra, "auto")
    assert one["step"] == 6  # resumed at the end: nothing trained, the state is as loaded
    torch.testing.assert_close(one["weight"], torch.cat([r["weight"] for r in two]), rtol=0, atol=0)
    torch.testing.assert_close(one["momentum"], torch.cat([r["momentum"] for r in two]), rtol=0,
                               atol=0)


def _train_with_head_optimizer(out_dir, overrides, resume="none"):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    trainer = Trainer(cfg, init_distributed(), resume=resume)
    trainer.fit()
    [state] = trainer.head_optimizer.state.values()
    return dict(step=trainer.step, weight=trainer.head.weight.detach().clone(),
                momentum=state["momentum_buffer"].clone())


def _accumulating_run(out_dir, overrides):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "eval.synthetic_pairs=0"] + overrides)
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    trainer.fit()
    [state] = trainer.head_optimizer.state.values()
    return dict(head_steps=int(state["step"]), engine_steps=trainer.engine.global_steps,
                losses=[h["loss"] for h in trainer.history], lrs=[h["lr"] for h in trainer.history])


def test_gradient_accumulation_steps_head_and_engine_together_with_adamw(dist_pool, tmp_path):
    """6 micro-batches, accumulated by 2: three optimizer steps for the encoder and the head."""
    results = dist_pool(2).run(_accumulating_run, str(tmp_path),
                               ["head.name=full_fc", "run.steps=6", "batch.grad_accum=2",
                                "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=0"])
    for r in results:
        assert r["head_steps"] == 3 and r["engine_steps"] == 3
        assert len(r["losses"]) == 6 and all(math.isfinite(x) for x in r["losses"])
        lrs = r["lrs"]  # the schedule moves per optimizer step, not per micro-batch
        assert lrs[0] == lrs[1] > lrs[2] == lrs[3] > lrs[4] == lrs[5] > 0


def _train_with_a_starved_rank(out_dir, overrides):
    """Rank 1's batch keeps 5 images at step 1 (uneven: trains) and one at step 2 (skipped)."""
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "eval.synthetic_pairs=0"] + overrides)
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    real, rank = trainer.loader, get_rank()

    class Starving:
        def __iter__(self):
            for images, labels in real:
                keep = {1: 5, 2: 1}.get(trainer.step) if rank == 1 else None
                if keep:
                    images, labels = images[:keep], labels[:keep]
                yield images, labels

        def close(self):
            real.close()

    trainer.loader = Starving()
    trainer.fit()
    return [h["skipped"] for h in trainer.history]


def test_a_rank_left_with_one_image_skips_the_step_on_every_rank(dist_pool, tmp_path):
    results = dist_pool(2).run(_train_with_a_starved_rank, str(tmp_path), ["run.steps=4"])
    assert results == [[0.0, 0.0, 1.0, 0.0]] * 2


def _startup_output(out_dir, overrides):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        Trainer(load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides), init_distributed())
    return buf.getvalue()


def test_the_memory_with_arcface_warns_at_start_and_a_learned_head_does_not(dist_pool, tmp_path):
    """The accuracy benchmark saw the memory collapse under ArcFace: a run that asks for it is
    told so once, on rank 0; Full FC with ArcFace (arcface_torch's choice) is not."""
    pool = dist_pool(1)
    memory = pool.run(_startup_output, tmp_path / "pm", ["head.margin.kind=arcface"])[0]
    assert memory.count("warning: head.margin.kind=arcface") == 1
    assert "prototype_memory.md" in memory
    cosface = pool.run(_startup_output, tmp_path / "pm_cos", [])[0]
    full_fc = pool.run(_startup_output, tmp_path / "fc", ["head.name=full_fc",
                                                         "head.margin.kind=arcface"])[0]
    assert "warning" not in cosface and "warning" not in full_fc

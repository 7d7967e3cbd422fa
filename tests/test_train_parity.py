"""The trainer against plain PyTorch after several optimizer steps: ZeRO stages and bf16, gradient
accumulation, and the learned heads' exact and resharded resume.

The reference is one process with no DeepSpeed and no process group: the same encoder, each rank's
slice of the global batch through it (data parallel without SyncBN: BatchNorm sees one rank's
slice), the head at world size 1 on the concatenated embeddings, ``loss / grad_accum`` backward
per micro-batch, the encoder's gradient norm clipped as DeepSpeed clips it, then both optimizers
and schedules step.
"""

from __future__ import annotations

import pytest
import torch

from pm_dist.config import load_config
from pm_dist.distributed import init_distributed
from pm_dist.train import Trainer
from test_train import BASE


def _trained(out_dir, overrides, resume="none", steps_before=None):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "eval.synthetic_pairs=0"]
                      + overrides)
    trainer = Trainer(cfg, init_distributed(), resume=resume, record_history=True)
    head = trainer.head
    start = _copy(head.state_dict())
    trainer.fit()
    state = {"losses": [h["loss"] for h in trainer.history],
             "lrs": [h["lr"] for h in trainer.history], "step": trainer.step,
             "params": {k: v.detach().float().clone()
                        for k, v in trainer.engine.module.named_parameters()},
             "head_start": start, "head": _copy(head.state_dict())}
    if hasattr(head, "entries"):  # the memory: its prototypes by class
        state["entries"] = head.entries()
    if trainer.head_optimizer is not None:
        [opt] = trainer.head_optimizer.state.values()
        state["momentum"] = opt["momentum_buffer"].clone()
        state["head_lr"] = trainer.head_optimizer.param_groups[0]["lr"]
    return state


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def plain_reference(overrides, world: int, head_weight: torch.Tensor | None = None):
    """Plain PyTorch, one process: what the trainer at ``world`` ranks must compute."""
    from pm_dist.data.loader import build_train_loader
    from pm_dist.heads import HeadContext, build_head
    from pm_dist.models import build_model
    from pm_dist.training.optim import build_optimizer, build_scheduler
    from pm_dist.training.rng import seed_everything

    cfg = load_config(None, BASE + overrides)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.embedding_size, cfg.data.image_size).train()
    context = HeadContext(cfg.model.embedding_size, cfg.data.num_identities,
                          cfg.batch.classes_per_batch, 1, cfg.head.margin.build(),
                          seed=cfg.run.seed)
    head = build_head(cfg.head.name, cfg.head.options, context)
    if head_weight is not None:  # the learned heads' W shards start from per-rank draws
        with torch.no_grad():
            head.weight.copy_(head_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, head_opt = build_optimizer(params, cfg), None
    sched = build_scheduler(opt, cfg)
    if head_weight is not None:
        head_opt = build_optimizer(head.parameters(), cfg, cfg.head.lr_scale)
        head_sched = build_scheduler(head_opt, cfg)
    loaders = [build_train_loader(cfg.data, cfg.batch.classes_per_batch,
                                  cfg.batch.images_per_class, r, world, sync_errors=False)
               for r in range(world)]
    batches = zip(*loaders)
    accum, losses = cfg.batch.grad_accum, []
    for _ in range(cfg.run.steps // accum):
        for _ in range(accum):
            slices = next(batches)
            embeddings = torch.cat([model(images) for images, _ in slices])
            out = head(embeddings, torch.cat([labels for _, labels in slices]))
            (out.loss / accum).backward()
            losses.append(out.loss.item())
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        if head_opt is not None:
            head_opt.step()
            head_sched.step()
            head_opt.zero_grad()
    for loader in loaders:
        loader.close()
    return {"losses": losses,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "head": _copy(head.state_dict()),
            "entries": head.entries() if hasattr(head, "entries") else None}


def _assert_params_close(actual: dict, expected: dict, rtol: float):
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=rtol, atol=1e-6 + rtol * float(v.abs().max()),
                                   msg=k)


def _assert_update_matches(start: dict, actual: dict, expected: dict, min_cosine: float):
    """bf16: the update the run made, against the reference's, as one direction and one size."""
    got = torch.cat([(actual[k] - start[k]).reshape(-1) for k in expected])
    want = torch.cat([(expected[k] - start[k]).reshape(-1) for k in expected])
    assert want.norm() > 0
    cosine = float(got @ want / (got.norm() * want.norm()))
    assert cosine > min_cosine, cosine
    assert float(got.norm() / want.norm()) == pytest.approx(1.0, abs=0.1)


def _assert_same_memory(shards: list[dict], reference: dict, rtol: float):
    """The sharded memory holds the reference's prototypes, each class on one rank."""
    want = dict(zip(reference["classes"].tolist(), reference["protos"]))
    got = {}
    for shard in shards:
        for c, proto in zip(shard["entries"]["classes"].tolist(), shard["entries"]["protos"]):
            assert c not in got
            got[c] = proto
    assert got.keys() == want.keys()
    for c, proto in want.items():
        torch.testing.assert_close(got[c].float(), proto.float(), rtol=rtol, atol=rtol)


def _initial_params(overrides):
    from pm_dist.models import build_model
    from pm_dist.training.rng import seed_everything

    cfg = load_config(None, BASE + overrides)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.embedding_size, cfg.data.image_size)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"),
                                             (0, "bf16"), (2, "bf16")])
def test_zero_stages_and_bf16_match_plain_pytorch_after_several_steps(dist_pool, tmp_path, stage,
                                                                       precision):
    steps = ["run.steps=4", "optim.warmup_steps=0"]  # 4 optimizer updates
    runs = dist_pool(2).run(_trained, str(tmp_path), steps + [f"deepspeed.zero_stage={stage}",
                                                              f"deepspeed.precision={precision}"])
    ref = plain_reference(steps, world=2)
    for run in runs:
        for k in run["params"]:
            assert torch.equal(run["params"][k], runs[0]["params"][k]), k  # one encoder
    if precision == "fp32":
        _assert_params_close(runs[0]["params"], ref["params"], rtol=1e-4)
        assert runs[0]["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        _assert_same_memory(runs, ref["entries"], rtol=1e-4)
    else:
        _assert_update_matches(_initial_params(steps), runs[0]["params"], ref["params"], 0.95)
        assert runs[0]["losses"] == pytest.approx(ref["losses"], rel=3e-2)


@pytest.mark.parametrize("head", ["prototype_memory", "full_fc"])
def test_accumulated_micro_batches_make_the_update_of_their_sum(dist_pool, tmp_path, head):
    """grad_accum = 2: each optimizer step is the mean of two micro-batches' losses, as in the
    reference (the memory sees each micro-batch in turn, as it would in one process). Four
    micro-batches of 16 classes fill the 64 slots without evicting: eviction is per shard, so past
    capacity a sharded memory keeps other classes than a single one."""
    extra = [f"head.name={head}", "run.steps=4", "batch.grad_accum=2", "optim.warmup_steps=0"]
    runs = dist_pool(2).run(_trained, str(tmp_path), extra)
    head_weight = (torch.cat([r["head_start"]["weight"] for r in runs])
                   if head == "full_fc" else None)
    ref = plain_reference(extra, world=2, head_weight=head_weight)
    _assert_params_close(runs[0]["params"], ref["params"], rtol=1e-4)
    assert runs[0]["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    if head == "full_fc":
        got = torch.cat([r["head"]["weight"] for r in runs])
        torch.testing.assert_close(got, ref["head"]["weight"], rtol=1e-4, atol=1e-6)
    else:
        _assert_same_memory(runs, ref["entries"], rtol=1e-4)


@pytest.mark.parametrize("head", ["full_fc", "partial_fc"])
def test_learned_heads_resume_exactly_with_optimizer_and_schedule(dist_pool, tmp_path, head):
    extra = [f"head.name={head}", "head.partial_fc.sample_rate=0.5", "run.steps=8",
             "run.checkpoint_every=4", "optim.warmup_steps=2"]
    full = dist_pool(2).run(_trained, str(tmp_path / "a"), extra)
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000004")
    resumed = dist_pool(2).run(_trained, str(tmp_path / "b"), extra, ckpt)
    for f, r in zip(full, resumed):
        assert r["losses"] == f["losses"][4:] and r["lrs"] == f["lrs"][4:]  # bit for bit
        for k in f["params"]:
            assert torch.equal(f["params"][k], r["params"][k]), k
        assert f["head"].keys() == r["head"].keys()
        for k in f["head"]:
            same = (torch.equal(f["head"][k], r["head"][k]) if torch.is_tensor(f["head"][k])
                    else f["head"][k] == r["head"][k])
            assert same, k
        assert torch.equal(f["momentum"], r["momentum"]) and f["head_lr"] == r["head_lr"]


@pytest.mark.parametrize("head", ["full_fc", "partial_fc"])
@pytest.mark.parametrize("before,after", [(1, 2), (2, 3)])
def test_learned_heads_reshard_to_more_ranks_and_train_on(dist_pool, tmp_path, head, before,
                                                          after):
    extra = [f"head.name={head}", "head.partial_fc.sample_rate=0.5", "optim.warmup_steps=0",
             "run.checkpoint_every=4", "batch.classes_per_batch=12"]  # 24 images split 1, 2, 3 ways
    saved = dist_pool(before).run(_trained, str(tmp_path), extra + ["run.steps=4"])
    # resumed at its last step: nothing trains, the state is as loaded, on more ranks
    loaded = dist_pool(after).run(_trained, str(tmp_path), extra + ["run.steps=4"], "auto")
    assert all(r["step"] == 4 and not r["losses"] for r in loaded)
    for key in ("head", "momentum"):
        def rows(runs):
            return torch.cat([r[key]["weight"] if key == "head" else r[key] for r in runs])
        assert torch.equal(rows(loaded), rows(saved)), key
    assert len({r["head_lr"] for r in loaded + saved}) == 1
    if head == "partial_fc":  # the draw counter continues, so the next steps draw new columns
        assert {int(r["head"]["_extra_state"]["step"]) for r in loaded} == {4}
    # and it trains on from there
    on = dist_pool(after).run(_trained, str(tmp_path), extra + ["run.steps=6"], "auto")
    assert all(r["step"] == 6 and len(r["losses"]) == 2 for r in on)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in on)
    assert not torch.equal(torch.cat([r["head"]["weight"] for r in on]),
                           torch.cat([r["head"]["weight"] for r in saved]))

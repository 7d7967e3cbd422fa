"""The real-data recipes against arcface_torch: the schedule it uses now (linear warm-up, then
polynomial decay of power 1), its margins, and the step counts its epochs give, which
``run.epochs`` / ``optim.warmup_epochs`` reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pm_dist.config import load_config
from pm_dist.training.optim import lr_factor, resolve_epochs

ROOT = Path(__file__).resolve().parents[1]
# images in the dataset, epochs, warm-up epochs, margin (kind, m) of arcface_torch's config
RECIPES = {
    # the memory recipe departs on purpose: ArcFace lets a memory of generated prototypes collapse
    "ms1mv3_r50_pm": (5_179_510, 20, 0, ("cosface", 0.4)),
    "ms1mv3_r50_partial_fc": (5_179_510, 20, 0, ("arcface", 0.5)),
    "ms1mv3_r50_full_fc": (5_179_510, 20, 0, ("arcface", 0.5)),
    "webface42m_r100_pm": (42_474_557, 20, 4, ("cosface", 0.4)),
    "webface42m_r100_partial_fc": (42_474_557, 20, 4, ("cosface", 0.4)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_arcface_torch_schedule(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    images, epochs, warmup, (kind, m) = RECIPES[name]
    path = str(ROOT / "configs" / f"{name}.yaml")
    cfg = load_config(path)
    assert cfg.optim.schedule == "poly" and cfg.optim.power == 1.0 and cfg.optim.min_lr == 0.0
    assert (cfg.head.margin.kind, cfg.head.margin.m) == (kind, m)
    text = Path(path).read_text()
    assert "Differences from current arcface_torch" in text and "P×K" in text
    # the same steps written in epochs
    by_epochs = load_config(path, ["run.steps=null", f"run.epochs={epochs}",
                                   "optim.warmup_steps=null", f"optim.warmup_epochs={warmup}"])
    resolve_epochs(by_epochs, images)
    assert (by_epochs.run.steps, by_epochs.optim.warmup_steps) == (cfg.run.steps,
                                                                   cfg.optim.warmup_steps)
    # power 1: after the warm-up the lr falls linearly to 0 (arcface_torch's PolynomialLRWarmup)
    w, total = cfg.optim.warmup_steps, cfg.run.steps
    mid = w + (total - w) // 2
    assert lr_factor(cfg, mid) == pytest.approx(1 - (mid - w) / (total - w))


# --- run.epochs through the trainer: the same at any GPU count, and with grad_accum ---------------
BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=40",
    "data.heldout_identities=40", "data.count_median=6", "model.embedding_size=32",
    "batch.images_per_class=2", "head.memory.capacity=32", "run.progress=false",
    "run.log_every=0", "eval.synthetic_pairs=0", "run.steps=null", "optim.warmup_steps=null",
]


def _resolve(out_dir, overrides, resume="none", fit=False):
    """Build a Trainer on this rank (and train when ``fit``): what run.epochs resolved to."""
    import contextlib
    import io

    from pm_dist.distributed import init_distributed
    from pm_dist.train import Trainer

    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer = Trainer(cfg, init_distributed(), resume=resume)
        if fit:
            result = trainer.fit()
        else:
            trainer.loader.close()
            trainer.metrics.close()
            result = None
    return {"steps": cfg.run.steps, "warmup": cfg.optim.warmup_steps, "schedule": trainer.schedule,
            "stdout": out.getvalue(), "final_step": result and result["step"]}


def test_epochs_resolve_alike_at_any_world_size(dist_pool, tmp_path):
    args = ["run.epochs=3", "optim.warmup_epochs=1", "batch.classes_per_batch=8"]
    [one] = dist_pool(1).run(_resolve, str(tmp_path / "w1"), args)
    two = dist_pool(2).run(_resolve, str(tmp_path / "w2"), args)
    per_epoch = one["schedule"]["dataset_images"] // 16
    assert (one["steps"], one["warmup"]) == (3 * per_epoch, per_epoch)
    for r in two:  # every rank resolves the same, and the same as one process
        assert (r["steps"], r["warmup"], r["schedule"]) == (one["steps"], one["warmup"], one["schedule"])
    line = f"run.epochs=3 → run.steps={one['steps']}"
    assert line in one["stdout"] and line in two[0]["stdout"] and line not in two[1]["stdout"]
    saved = yaml.safe_load((tmp_path / "w2" / "config.yaml").read_text())
    assert (saved["run"]["steps"], saved["run"]["epochs"]) == (one["steps"], None)


def test_epochs_with_grad_accum_keep_images_and_optimizer_steps(dist_pool, tmp_path):
    """Half the identities per micro-batch and twice the accumulation: the same batch per optimizer
    step, so the same optimizer steps and images over the same epochs (up to one window)."""
    [plain] = dist_pool(1).run(_resolve, str(tmp_path / "a"), [
        "run.epochs=3", "optim.warmup_epochs=1", "batch.classes_per_batch=8"])
    [accum] = dist_pool(1).run(_resolve, str(tmp_path / "b"), [
        "run.epochs=3", "optim.warmup_epochs=1", "batch.classes_per_batch=4", "batch.grad_accum=2",
        "run.checkpoint_every=0"])
    images = plain["schedule"]["dataset_images"]
    assert accum["steps"] % 2 == 0  # micro-batches: whole accumulation windows
    assert abs(accum["steps"] * 8 - plain["steps"] * 16) <= 16  # images seen: 3 epochs both
    assert abs(accum["steps"] * 8 - 3 * images) < 2 * 16
    assert abs(accum["steps"] // 2 - plain["steps"]) <= 1  # optimizer steps
    assert abs(accum["warmup"] - plain["warmup"]) <= 1  # warm-up counts optimizer steps
    assert "(a multiple of grad_accum=2)" in accum["stdout"]


def test_epochs_resume_on_another_world_size(dist_pool, tmp_path):
    run = tmp_path / "run"
    args = ["run.epochs=0.5", "optim.warmup_epochs=0.25", "batch.classes_per_batch=8",
            "run.checkpoint_every=4", "run.keep_checkpoints=10"]
    two = dist_pool(2).run(_resolve, str(run), args, fit=True)
    total = two[0]["steps"]
    assert two[0]["final_step"] == total > 4
    [one] = dist_pool(1).run(_resolve, str(run), args, str(run / "checkpoints" / "step_00000004"),
                             fit=True)
    assert (one["steps"], one["warmup"]) == (total, two[0]["warmup"]) and one["final_step"] == total
    assert f"run.epochs=0.5 → run.steps={total}" in one["stdout"]
    assert "resumed from" in one["stdout"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_comment_says_how_to_count_in_epochs(name, monkeypatch):
    """The overrides the recipe's comment gives resolve to the recipe's own steps."""
    import re

    monkeypatch.chdir(ROOT)
    images, epochs, warmup, _ = RECIPES[name]
    path = ROOT / "configs" / f"{name}.yaml"
    [line] = re.findall(r"^#   (run\.steps=null run\.epochs=.*)$", path.read_text(), flags=re.M)
    cfg, by_epochs = load_config(str(path)), load_config(str(path), line.split())
    assert (by_epochs.run.epochs, by_epochs.optim.warmup_epochs) == (epochs, warmup)
    resolve_epochs(by_epochs, images)
    assert (by_epochs.run.steps, by_epochs.optim.warmup_steps) == (cfg.run.steps, cfg.optim.warmup_steps)

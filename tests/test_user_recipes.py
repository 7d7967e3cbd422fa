"""The real-data recipes against arcface_torch: the schedule it uses now (linear warm-up, then
polynomial decay of power 1), its margins, and the step counts its epochs give, which
``run.epochs`` / ``optim.warmup_epochs`` reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest

from pm_dist.config import load_config
from pm_dist.training.optim import lr_factor, resolve_epochs

ROOT = Path(__file__).resolve().parents[1]
# images in the dataset, epochs, warm-up epochs, margin (kind, m) of arcface_torch's config
RECIPES = {
    "ms1mv3_r50_pm": (5_179_510, 20, 0, ("arcface", 0.5)),
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

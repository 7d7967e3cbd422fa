"""What a run shows and keeps for its user: training.log (every console line, with epoch and ETA on
plain lines), the optional Weights & Biases logger, run.epochs / optim.warmup_epochs resolved to
steps, and the best encoder by a chosen evaluation number."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import os
import types
from pathlib import Path

import pytest
import yaml

from pm_dist.config import load_config
from pm_dist.config_io import ConfigError
from pm_dist.distributed import init_distributed
from pm_dist.metrics import MetricsLogger, TrainingLog, format_duration
from pm_dist.models import load_encoder
from pm_dist.train import Trainer
from pm_dist.training.optim import resolve_epochs

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=30",
    "data.heldout_identities=40", "data.count_median=4", "model.embedding_size=32",
    "batch.classes_per_batch=8", "batch.images_per_class=2", "head.memory.capacity=32",
    "run.checkpoint_every=0", "eval.synthetic_pairs=40", "eval.identification_identities=20",
]


def _fake_wandb(calls: list):
    """A stand-in ``wandb`` module recording what pm_dist asks of it."""
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    mod.init = init
    return mod


def _run_with_fake_wandb(out_dir, overrides):
    calls: list = []
    os.environ["WANDB_MODE"] = "offline"  # this rank's process: honoured by pm_dist's logger
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = _fake_wandb(calls)
    try:
        cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            trainer = Trainer(cfg, init_distributed())
            result = trainer.fit()
    finally:
        if saved is None:
            del sys.modules["wandb"]
        else:
            sys.modules["wandb"] = saved
    evals = [r["headline"] for r in result["eval"]]
    return {"stdout": out.getvalue(), "calls": calls, "dataset_images": trainer.dataset_images,
            "steps": cfg.run.steps, "warmup": cfg.optim.warmup_steps, "last_eval": evals}


def test_epochs_log_wandb_and_best_model(dist_pool, tmp_path, monkeypatch):
    run = tmp_path / "run"
    [r] = dist_pool(1).run(_run_with_fake_wandb, str(run), [
        "run.steps=null", "run.epochs=0.5", "optim.warmup_steps=null", "optim.warmup_epochs=0.25",
        "run.progress=false", "run.log_every=2", "run.eval_every=2", "run.wandb=true",
        "eval.best_metric=synthetic-pairs/accuracy"])
    per_epoch = r["dataset_images"] // 16
    assert r["steps"] == int(0.5 * per_epoch) and r["warmup"] == int(0.25 * per_epoch)
    # the resolved steps: printed, in config.yaml (loadable again) and environment.json
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["steps"] == r["steps"] and saved["run"]["epochs"] is None
    assert saved["optim"]["warmup_steps"] == r["warmup"]
    assert load_config(str(run / "config.yaml")).run.steps == r["steps"]
    schedule = json.loads((run / "environment.json").read_text())["schedule"]
    assert schedule["steps_per_epoch"] == per_epoch and schedule["epochs"] == 0.5
    # training.log: every console line, plain lines with epoch and ETA
    log = (run / "training.log").read_text()
    assert f"run.epochs=0.5 → run.steps={r['steps']}" in log
    assert f"step 2/{r['steps']}  epoch {2 * 16 / r['dataset_images']:.2f}  loss" in log
    assert "eta 00:00:" in log and "checkpoint:" in log and "encoder:" in log
    assert "synthetic-pairs" in log and "\x1b[" not in log
    for line in r["stdout"].splitlines():
        assert line.rstrip() in log
    # W&B: offline mode honoured, every step and the evaluations logged, finished
    init = [c for c in r["calls"] if c[0] == "init"][0][1]
    assert init["mode"] == "offline" and init["config"]["run"]["steps"] == r["steps"]
    logged = [c for c in r["calls"] if c[0] == "log"]
    assert {c[2] for c in logged if "train/loss" in c[1]} == set(range(1, r["steps"] + 1))
    assert any("eval/synthetic-pairs/accuracy" in c[1] for c in logged)
    assert r["calls"][-1] == ("finish",)
    # the best encoder: the highest evaluated accuracy, its step and value in the file and best.json
    accs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accs = {a["step"]: a["eval/synthetic-pairs/accuracy"] for a in accs
            if "eval/synthetic-pairs/accuracy" in a}
    best_step = max(accs, key=lambda s: (accs[s], -s))
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == best_step and best["value"] == pytest.approx(accs[best_step])
    _, meta = load_encoder(run / "best_encoder.pt")
    assert (meta["step"], meta["metric"]) == (best_step, "synthetic-pairs/accuracy")
    assert meta["value"] == pytest.approx(best["value"])
    # docs/training.md's run directory table names everything the run left, and the step keys
    _run_directory_as_documented(run)


def _run_directory_as_documented(run: Path):
    import re

    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("## The run directory"):text.index("### Export and evaluation afterwards")]
    documented = {p.rstrip("/") for row in re.findall(r"^\| (.*?) \|", table, flags=re.M)
                  for p in re.findall(r"`([^`]+)`", row)}
    assert {p.name for p in run.iterdir()} <= documented
    row = next(r for r in table.splitlines() if r.startswith("| `metrics.jsonl`"))
    keys = set(re.findall(r"`(\w+)`", row))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {k for k in first if "/" not in k} == keys and any(k.startswith("head/") for k in first)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_epochs_resolution_rules():
    cfg = load_config(None, ["run.epochs=3", "batch.grad_accum=4", "optim.warmup_steps=null",
                             "optim.warmup_epochs=1", "batch.classes_per_batch=64"])
    info = resolve_epochs(cfg, 10_000)  # global batch 128: 78 steps per epoch
    assert info["steps_per_epoch"] == 78 and cfg.run.steps == 232  # 234 → a multiple of 4
    assert cfg.optim.warmup_steps == 19  # optimizer steps: 78 micro-batches // 4
    for world in (1, 2, 4):  # the global batch is P·K whatever the world size
        cfg.preflight(world)
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config(str(ROOT / "configs" / "cpu_demo.yaml"), ["run.epochs=2"])
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config(None, ["optim.warmup_steps=5", "optim.warmup_epochs=1"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        resolve_epochs(load_config(None, ["run.steps=null", "run.epochs=1"]), 100)


def test_wandb_missing_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'pm_dist\[wandb\]'"):
        load_config(None, ["run.wandb=true"]).preflight(1)


def test_wandb_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    for _ in range(2):
        MetricsLogger(tmp_path, True, False, 10, wandb=True).close()
    ids = [c[1]["id"] for c in calls if c[0] == "init"]
    assert len(ids) == 2 and ids[0] == ids[1] and calls[0][1]["mode"] == "offline"


@pytest.mark.parametrize("env,expected", [(None, None), ("", None), ("offline", "offline"),
                                          ("disabled", "disabled")])
def test_wandb_mode_comes_from_wandb_mode_or_from_wandb_itself(env, expected, tmp_path, monkeypatch):
    """WANDB_MODE set: passed on as ``mode``; unset (or empty): no ``mode`` at all, so the setting
    made with ``wandb offline`` (wandb's own settings file) decides. No network: a stand-in module."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    MetricsLogger(tmp_path, True, False, 10, wandb=True).close()
    [(_, kwargs)] = [c for c in calls if c[0] == "init"]
    if expected is None:
        assert "mode" not in kwargs, kwargs
    else:
        assert kwargs["mode"] == expected
    assert kwargs["resume"] == "allow" and kwargs["dir"] == str(tmp_path)
    assert calls[-1] == ("finish",)


def test_training_log_tees_and_strips_colour(tmp_path, capsys):
    log = TrainingLog(tmp_path, enabled=True)
    print("plain line")
    print("\x1b[1mbold\x1b[0m", file=sys.stderr)
    log.close()
    print("after close")
    text = (tmp_path / "training.log").read_text()
    assert "plain line\n" in text and "bold\n" in text and "after close" not in text
    assert format_duration(90061) == "1d 01:01:01"


def test_wandb_missing_stops_the_command_line_before_training(tmp_path, monkeypatch, capsys):
    """``python -m pm_dist.train run.wandb=true`` without wandb: exit 2 and the advice, before any
    process group or run directory exists."""
    from pm_dist.metrics import WANDB_MISSING
    from pm_dist.train import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    assert main([f"run.out_dir={tmp_path / 'run'}", "run.wandb=true"]) == 2
    assert capsys.readouterr().err == f"config error: {WANDB_MISSING}\n"
    assert not (tmp_path / "run").exists()


def _train_without_wandb(out_dir):
    sys.modules["wandb"] = None  # this rank cannot import wandb at all
    try:
        cfg = load_config(None, BASE + [f"run.out_dir={out_dir}", "run.steps=2",
                                        "eval.synthetic_pairs=0"])
        with contextlib.redirect_stdout(io.StringIO()):
            result = Trainer(cfg, init_distributed()).fit()
    finally:
        del sys.modules["wandb"]
    return result["step"]


def test_wandb_is_never_needed_when_off(dist_pool, tmp_path):
    assert dist_pool(1).run(_train_without_wandb, str(tmp_path / "run")) == [2]
    assert not (tmp_path / "run" / "wandb_id.txt").exists()

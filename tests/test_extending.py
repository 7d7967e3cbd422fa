"""A head and an evaluation suite registered from outside pm_dist (tests/plugins/toy_plugin.py),
trained and evaluated through the normal entry points: torchrun -m pm_dist.train and
python -m pm_dist.evaluate. Also: offline evaluation with --config reproduces training's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pm_dist.config import load_config
from pm_dist.config_io import ConfigError

PLUGINS = Path(__file__).parent / "plugins"
TINY = ["model.name=tiny", "model.embedding_size=32", "data.image_size=32",
        "data.num_identities=200", "data.heldout_identities=100", "batch.classes_per_batch=16",
        "run.steps=12", "run.log_every=0", "run.checkpoint_every=0", "run.progress=false",
        "optim.warmup_steps=2", "eval.synthetic_pairs=100", "eval.identification_identities=40",
        "eval.batch_size=32", "data.num_workers=0"]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


def _run(args, **kw):
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    _run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pm_dist.train",
          "--plugin", "toy_plugin", *TINY, f"run.out_dir={out}", "head.name=centers",
          "head.centers.init_scale=0.02", "eval.suites=[{name: mean_norm, images: 24}]"])
    return out


def test_a_plugin_head_trains_at_world_size_2_and_a_plugin_suite_is_logged(toy_run):
    rows = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 12 and all(r["skipped"] == 0.0 for r in steps)
    for rank in (0, 1):  # the trainer gave the learned head an optimizer: its centres moved
        saved = torch.load(toy_run / "checkpoints" / "step_00000012" / f"head_rank{rank}.pt",
                           weights_only=False)["head"]
        start = torch.randn(100, 32, generator=torch.Generator().manual_seed(1000 + rank)) * 0.02
        assert saved["centers"].shape == start.shape and not torch.allclose(saved["centers"], start)
        assert "momentum_buffer" in str(saved["optimizer"])
    assert steps[0]["head/centers"] == 100.0  # 200 classes over 2 ranks
    assert any("eval/toy-norms/mean_norm" in r for r in rows)  # the suite's own headline
    assert any("eval/synthetic-pairs/accuracy" in r for r in rows)
    config = (toy_run / "config.yaml").read_text()
    assert "centers:" in config and "init_scale: 0.02" in config


def test_offline_evaluation_with_the_run_config_reproduces_training(toy_run, tmp_path):
    """Both sides build the suites with suites_from_config: same synthetic held-out images, same
    toy suite. Evaluated by the exported encoder in one process."""
    [trained] = sorted((toy_run / "eval").glob("eval*.json"))[-1:]
    during = {r["name"]: r for r in json.loads(trained.read_text())["results"]}
    _run([sys.executable, "-m", "pm_dist.evaluate", "--plugin", "toy_plugin",
          "--model", str(toy_run / "encoder.pt"), "--config", str(toy_run / "config.yaml"),
          "--out", str(tmp_path)])
    after = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    assert set(after) == set(during) == {"synthetic-pairs", "synthetic-1n", "toy-norms"}
    assert after["toy-norms"]["mean_norm"] == pytest.approx(during["toy-norms"]["mean_norm"],
                                                            rel=1e-4)
    assert after["synthetic-pairs"]["accuracy"] == pytest.approx(
        during["synthetic-pairs"]["accuracy"], abs=0.02)


def test_a_plugin_suite_runs_alone_from_the_command_line(toy_run, tmp_path):
    _run([sys.executable, "-m", "pm_dist.evaluate", "--plugin", "toy_plugin",
          "--model", str(toy_run / "encoder.pt"), "--suite", "mean_norm", "images=8", "seed=3",
          "--out", str(tmp_path)])
    [result] = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert result["name"] == "toy-norms" and result["images"] == 8 and result["mean_norm"] > 0


def test_unknown_plugin_head_and_suite_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="head.name: 'centres' is not one of"):
        load_config(None, ["head.name=centres"])
    with pytest.raises(ConfigError, match=r"eval.suites\[0\].name: unknown evaluation suite 'nope'"):
        load_config(None, ["eval.suites=[{name: nope}]"])
    proc = subprocess.run([sys.executable, "-m", "pm_dist.train", "--plugin", "no_such_plugin"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "plugin 'no_such_plugin' cannot be imported" in proc.stderr

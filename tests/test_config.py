"""Run configuration: the shipped recipes and DeepSpeed JSONs, overrides, and the errors users see.

Nothing here trains or starts a process group: ``pm_dist.train.main`` returns before
``init_distributed`` on a config error, which is what the CLI tests rely on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pm_dist.config import RunConfig, load_config
from pm_dist.config_io import ConfigError, to_dict
from pm_dist.engine import deepspeed_config
from pm_dist.models import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").glob("*.yaml"))
JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))

# What each recipe's comments promise: the world size it is laid out for and, for real data, the
# dataset and schedule its step count comes from (steps = images // global batch × epochs).
MS1MV3 = dict(world=8, identities=93_431, images=5_179_510, epochs=20)
WEBFACE42M = dict(world=64, identities=2_059_906, images=42_474_557, epochs=20)
RECIPES = {
    "cpu_demo": dict(world=2),
    "ms1mv3_r50_pm": MS1MV3,
    "ms1mv3_r50_partial_fc": MS1MV3,
    "ms1mv3_r50_full_fc": MS1MV3,
    "webface42m_r100_pm": WEBFACE42M,
    "webface42m_r100_partial_fc": WEBFACE42M,
}
BASELINES = {  # baseline → the Prototype Memory recipe it must match outside the head section
    "ms1mv3_r50_partial_fc": "ms1mv3_r50_pm",
    "ms1mv3_r50_full_fc": "ms1mv3_r50_pm",
    "webface42m_r100_partial_fc": "webface42m_r100_pm",
}
# Keys pm_dist sets or removes whatever a DeepSpeed JSON says (engine.deepspeed_config).
DS_OWNED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping", "optimizer", "scheduler", "zero_allow_untested_optimizer"}


def _recipe(name: str) -> RunConfig:
    return load_config(str(ROOT / "configs" / f"{name}.yaml"))


def _config_error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ------------------------------------------------------------------------------------ recipes
def test_the_recipe_table_covers_every_recipe():
    assert {p.stem for p in YAMLS} == set(RECIPES)
    assert len(JSONS) >= 4


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_recipe_loads_and_is_consistent(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed.config paths are relative to the repository root
    cfg = load_config(str(path))
    assert cfg.model.name in MODEL_NAMES
    assert cfg.data.image_size % 16 == 0  # every encoder needs a multiple of 16
    assert cfg.batch.images_per_class >= 2
    if cfg.head.name == "prototype_memory":
        memory = cfg.head.sections["memory"]
        dataclasses.replace(memory, num_classes=RECIPES[path.stem].get("identities", 1000)).validate()
    if cfg.deepspeed.config is not None:
        # pm_dist's deepspeed.zero_stage / precision override the JSON: a recipe must not name a
        # JSON that says something else.
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
        assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
        assert ds.get("bf16", {}).get("enabled", False) == (cfg.deepspeed.precision == "bf16")
        assert ds.get("fp16", {}).get("enabled", False) == (cfg.deepspeed.precision == "fp16")
    if cfg.data.source == "arrow":
        assert cfg.data.path and cfg.data.sampling == "count"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_arithmetic(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, spec = _recipe(name), RECIPES[name]
    world = spec["world"]
    ds = deepspeed_config(cfg, world)  # the global batch splits over the recipe's world size
    assert ds["train_micro_batch_size_per_gpu"] * world == cfg.batch.global_batch
    if cfg.head.name == "prototype_memory":
        capacity = cfg.head.sections["memory"].capacity
        # every shard must hold a whole batch's classes (PrototypeMemory refuses less)
        assert capacity >= cfg.batch.classes_per_batch * world
        if "identities" in spec:  # ~10 % of the identities, a multiple of 8
            assert capacity % 8 == 0
            assert abs(capacity - 0.1 * spec["identities"]) < 8
    if "images" in spec:
        steps_per_epoch = spec["images"] // cfg.batch.global_batch
        assert cfg.run.steps == steps_per_epoch * spec["epochs"]
        assert cfg.optim.warmup_steps % steps_per_epoch == 0  # whole warm-up epochs
        assert cfg.data.image_size == 112 and cfg.model.embedding_size == 512
        assert cfg.deepspeed.precision == "bf16" and cfg.optim.grad_clip > 0
        assert cfg.eval.bin_files


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_baseline_differs_from_its_prototype_memory_recipe_only_in_the_head(baseline):
    base, pm = to_dict(_recipe(baseline)), to_dict(_recipe(BASELINES[baseline]))
    assert base["head"]["name"] in ("full_fc", "partial_fc") and pm["head"]["name"] == "prototype_memory"
    if base["head"]["margin"] != pm["head"]["margin"]:
        # each head at its best: arcface_torch's ArcFace for the learned heads, CosFace for the
        # memory, which ArcFace lets collapse; the recipe must say so
        assert pm["head"]["margin"]["kind"] == "cosface"
        assert "collapsing" in (ROOT / "configs" / f"{BASELINES[baseline]}.yaml").read_text()
    for d in (base, pm):
        del d["head"], d["run"]["out_dir"]
    assert base == pm


def test_cpu_demo_is_the_embedded_default():
    demo, default = _recipe("cpu_demo"), load_config(None)
    assert to_dict(demo) == to_dict(default)


def test_cpu_demo_lists_every_key():
    """The demo file doubles as the reference of the config tree: no key may be missing."""
    written = yaml.safe_load((ROOT / "configs" / "cpu_demo.yaml").read_text())
    full = to_dict(RunConfig())
    del full["head"]["memory"]["num_classes"]  # from the dataset, never written

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k}
        return out

    assert keys(written) == keys(full)


# ------------------------------------------------------------------------------------ DeepSpeed JSON
@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.stem)
def test_deepspeed_json_is_accepted(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = json.loads(path.read_text())
    assert not DS_OWNED & set(raw), "the JSON should hold only what pm_dist does not set"
    stage = raw["zero_optimization"]["stage"]
    precision = "bf16" if raw.get("bf16", {}).get("enabled") else "fp32"
    cfg = load_config(None, [f"deepspeed.config={path.relative_to(ROOT)}",
                             f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                             "optim.grad_clip=3.0", "batch.grad_accum=2"])
    ds = deepspeed_config(cfg, 2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.batch.global_batch // 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 3.0  # never DeepSpeed's silent default of 1.0
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and not ds["fp16"]["enabled"]
    assert ds["zero_allow_untested_optimizer"] is True

    deepspeed_runtime_config = pytest.importorskip("deepspeed.runtime.config")
    parsed = deepspeed_runtime_config.DeepSpeedConfig(ds)  # DeepSpeed's own validation
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 3.0
    assert parsed.bfloat16_config.enabled == (precision == "bf16")


def test_deepspeed_config_overrides_and_removes_what_pm_dist_owns(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_batch_size": 7, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5,
        "optimizer": {"type": "Adam", "params": {"lr": 1}}, "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 2, "overlap_comm": False}, "bf16": {"enabled": True},
        "fp16": {"initial_scale_power": 8}, "steps_per_print": 5,
    }))
    cfg = load_config(None, [f"deepspeed.config={path}", "deepspeed.zero_stage=1",
                             "deepspeed.precision=fp16", "optim.grad_clip=0",
                             "batch.classes_per_batch=8", "batch.images_per_class=4"])
    ds = deepspeed_config(cfg, 4)
    assert "train_batch_size" not in ds and "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0  # grad_clip 0 turns clipping off, explicitly
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False}  # the run's stage wins
    assert ds["bf16"]["enabled"] is False
    assert ds["fp16"] == {"initial_scale_power": 8, "enabled": True}  # the JSON's other keys stay
    assert ds["steps_per_print"] == 5


def test_deepspeed_config_errors_name_the_problem(tmp_path):
    cfg = load_config(None, ["batch.classes_per_batch=5", "batch.images_per_class=3"])
    with pytest.raises(ValueError, match="global batch of 15 images.*does not split over 2 ranks"):
        deepspeed_config(cfg, 2)
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        deepspeed_config(load_config(None, [f"deepspeed.config={missing}"]), 1)
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match="broken.json"):
        deepspeed_config(load_config(None, [f"deepspeed.config={broken}"]), 1)


# ------------------------------------------------------------------------------------ overrides
def test_overrides_of_nested_keys_apply_with_their_types():
    cfg = load_config(None, ["head.memory.capacity=64", "optim.lr=0.01", "data.image_size=64",
                             "optim.weight_decay=1", "run.export_onnx=true", "head.margin.m=0.4",
                             "eval.bin_files=[a.bin, b.bin]", "deepspeed.config=null",
                             "optim.betas=[0.8, 0.99]", "head.memory.forget_after=100"])
    memory = cfg.head.sections["memory"]
    assert memory.capacity == 64 and type(memory.capacity) is int
    assert memory.forget_after == 100
    assert cfg.optim.lr == 0.01 and type(cfg.optim.lr) is float
    assert cfg.data.image_size == 64 and type(cfg.data.image_size) is int
    assert cfg.optim.weight_decay == 1.0 and type(cfg.optim.weight_decay) is float  # int → float
    assert cfg.run.export_onnx is True
    assert cfg.head.margin.m == 0.4
    assert cfg.eval.bin_files == ["a.bin", "b.bin"]
    assert cfg.deepspeed.config is None
    assert cfg.optim.betas == [0.8, 0.99]
    assert load_config(None, ["run.steps=100.0"]).run.steps == 100  # a whole float is an int


def test_overrides_win_over_the_file_and_keep_its_other_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run: {steps: 30, seed: 7}\nhead:\n  memory: {capacity: 128, refresh: overwrite}\n")
    cfg = load_config(str(path), ["run.steps=50", "head.memory.capacity=256"])
    assert cfg.run.steps == 50 and cfg.run.seed == 7
    assert (cfg.head.options.capacity, cfg.head.options.refresh) == (256, "overwrite")
    assert cfg.run.log_every == RunConfig().run.log_every  # untouched keys keep the defaults


def test_overrides_on_recipes(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/ms1mv3_r50_pm.yaml",
                      ["data.path=/elsewhere", "run.steps=10", "deepspeed.zero_stage=1"])
    assert cfg.data.path == "/elsewhere" and cfg.run.steps == 10 and cfg.deepspeed.zero_stage == 1
    assert cfg.head.options.capacity == 9344  # the rest of the file stays


def test_exponent_without_a_dot_is_a_number(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    path = tmp_path / "run.yaml"
    path.write_text("optim: {weight_decay: 5e-4}\n")
    assert load_config(str(path)).optim.weight_decay == 5e-4


def test_memory_override_without_a_file_keeps_or_names_the_capacity():
    try:
        cfg = load_config(None, ["head.memory.refresh=overwrite"])
    except ConfigError as err:
        assert "head.memory.capacity" in str(err)
    else:
        assert cfg.head.options.capacity == RunConfig().head.options.capacity


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("override, key, suggestion", [
    ("runn.steps=10", "runn", "run"),  # top level
    ("run.stepz=10", "run.stepz", "steps"),  # nested
    ("optim.learning_rat=0.1", "optim.learning_rat", None),
    ("data.imagesize=64", "data.imagesize", "image_size"),  # DataConfig's fields
    ("head.margin.kindd=arcface", "head.margin.kindd", "kind"),  # two levels down
    ("head.memory.capcity=64", "head.memory.capcity", "capacity"),  # inside the memory options
    ("head.memory.refresh_alpha=0.3", "head.memory.refresh_alpha", None),
])
def test_unknown_override_key_names_the_dotted_key_and_suggests(override, key, suggestion):
    message = _config_error([override])
    assert f"unknown config key '{key}'" in message
    if suggestion is not None:
        assert f"did you mean '{suggestion}'?" in message
    else:
        assert "did you mean" in message or "valid:" in message


@pytest.mark.parametrize("text, key, suggestion", [
    ("runn: {steps: 10}\n", "runn", "run"),
    ("optim: {lrr: 0.1}\n", "optim.lrr", "lr"),
    ("head:\n  memory: {capacity: 64, evicton: fifo}\n", "head.memory.evicton", "eviction"),
    ("data: {num_worker: 2}\n", "data.num_worker", "num_workers"),
])
def test_unknown_key_in_a_file_names_the_dotted_key_and_suggests(tmp_path, text, key, suggestion):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    message = _config_error(path=str(path))
    assert f"unknown config key '{key}'" in message and f"did you mean '{suggestion}'?" in message


def test_unrelated_unknown_key_lists_the_valid_ones():
    message = _config_error(["zzz=1"])
    assert "unknown config key 'zzz'" in message and "valid:" in message and "optim" in message


@pytest.mark.parametrize("override, key, what", [
    ("run.steps=abc", "run.steps", "expected an integer"),
    ("run.steps=1.5", "run.steps", "expected an integer"),
    ("run.steps=0", "run.steps", "≥ 1"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("run.export_onnx=maybe", "run.export_onnx", "true/false"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage", "must be 0, 1 or 2"),
    ("deepspeed.precision=fp8", "deepspeed.precision", "not one of"),
    ("batch.images_per_class=1", "batch.images_per_class", "≥ 2"),
    ("batch.classes_per_batch=0", "batch.classes_per_batch", "≥ 1"),
    ("head.name=arcface", "head.name", "not one of"),
    ("head.margin.kind=arc", "head.margin.kind", "not one of"),
    ("head.memory.capacity=abc", "head.memory.capacity", "expected an integer"),
    ("head.memory.refresh=sometimes", "head.memory.refresh", "not one of"),
    ("head.memory.capacity=0", "capacity", "≥ 1"),
    ("head.memory.ema_alpha=1.0", "ema_alpha", "[0, 1)"),
    ("head.memory.num_classes=5", "head.memory.num_classes", "comes from the dataset"),
    ("data.image_size=abc", "data.image_size", "expected an integer"),
    ("data.source=lmdb", "source", "synthetic"),
    ("eval.bin_files=lfw.bin", "eval.bin_files", "expected a list"),
    ("run=3", "run", "expected a mapping"),
    ("run.steps.x=1", "run.steps", ""),
])
def test_bad_value_names_the_key(override, key, what):
    # (head.memory.* overrides keep the other memory options)
    message = _config_error((["head.memory.capacity=512"] if "memory" in override else []) + [override])
    assert key in message and what in message, message


@pytest.mark.parametrize("override", ["run.steps", "=3", ""])
def test_malformed_override(override):
    assert "override" in _config_error([override])


def test_file_errors(tmp_path):
    assert "does not exist" in _config_error(path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    assert "not valid YAML" in _config_error(path=str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- run\n- data\n")
    assert "top level must be a mapping" in _config_error(path=str(listed))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_config(str(empty)) == RunConfig()  # an empty file is the embedded default


# ------------------------------------------------------------------------------------ the CLI
def _main(argv):
    import torch.distributed as dist

    from pm_dist.train import main

    code = main(argv)
    assert not (dist.is_available() and dist.is_initialized())  # stopped before any process group
    return code


def test_cli_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nonexistent.yaml"
    assert _main(["--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and str(missing) in err and "does not exist" in err


def test_cli_unknown_override(capsys):
    assert _main(["--config", str(ROOT / "configs" / "cpu_demo.yaml"), "run.stepz=5"]) == 2
    err = capsys.readouterr().err
    assert "config error: unknown config key 'run.stepz' (did you mean 'steps'?)" in err


def test_cli_bad_value_in_recipe_override(capsys):
    assert _main(["--config", str(ROOT / "configs" / "ms1mv3_r50_pm.yaml"),
                  "deepspeed.zero_stage=5"]) == 2
    assert "deepspeed.zero_stage must be 0, 1 or 2, got 5" in capsys.readouterr().err


def test_cli_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        _main(["--confg", "x.yaml"])
    assert info.value.code == 2
    assert "unrecognized arguments: --confg" in capsys.readouterr().err


def test_deepspeed_json_alone_sets_stage_and_precision(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(None, ["deepspeed.config=configs/deepspeed/zero1_bf16.json"])
    assert cfg.deepspeed.effective_zero_stage == 1 and cfg.deepspeed.effective_precision == "bf16"
    cfg = load_config(None, ["deepspeed.config=configs/deepspeed/zero1_bf16.json",
                             "deepspeed.zero_stage=2"])
    assert cfg.deepspeed.effective_zero_stage == 2  # set in the YAML, it wins


def test_world_size_preflight_names_the_minimum_capacity():
    cfg = load_config(None, ["batch.classes_per_batch=64", "head.memory.capacity=256"])
    cfg.preflight(4)
    with pytest.raises(ConfigError, match=r"head.memory.capacity ≥ 512"):
        cfg.preflight(8)
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        cfg.preflight(3)

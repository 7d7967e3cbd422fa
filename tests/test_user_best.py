"""``eval.best_metric`` across sessions: a resumed run carries the best so far over (best.json) and
never replaces best_encoder.pt with a worse encoder; a record that is not this run's line (a fresh
start in a used directory, a best later than the resumed step, another metric) is set aside, never
deleted; a NaN is never a best."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path


from pm_dist.config import load_config
from pm_dist.distributed import init_distributed
from pm_dist.models import build_model, load_encoder
from pm_dist.train import Trainer
from pm_dist.training.outputs import BestModel

BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=30",
    "data.heldout_identities=40", "data.count_median=4", "model.embedding_size=32",
    "batch.classes_per_batch=8", "batch.images_per_class=2", "head.memory.capacity=32",
    "run.progress=false", "run.log_every=0", "eval.synthetic_pairs=40",
    "eval.identification_identities=20", "eval.best_metric=synthetic-pairs/accuracy",
]


def _fit(out_dir, overrides, resume="none"):
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        Trainer(cfg, init_distributed(), resume=resume).fit()
    return out.getvalue()


def _evals(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["eval/synthetic-pairs/accuracy"] for d in lines
            if "eval/synthetic-pairs/accuracy" in d}


def _best(run: Path) -> dict:
    return json.loads((run / "best.json").read_text())


def test_resume_carries_the_best_over_and_keeps_a_better_encoder(dist_pool, tmp_path):
    run = tmp_path / "run"
    first = ["run.steps=4", "run.eval_every=2", "run.checkpoint_every=2"]
    dist_pool(1).run(_fit, str(run), first)
    best = _best(run)
    assert best["step"] in (2, 4) and best["value"] == max(_evals(run).values())
    # Make the best so far unbeatable (accuracy 1.0, step 4): a resumed run that forgot it would
    # replace best_encoder.pt at its first evaluation.
    best.update(value=1.0, step=4)
    (run / "best.json").write_text(json.dumps(best))
    before = (run / "best_encoder.pt").read_bytes()
    [out] = dist_pool(1).run(_fit, str(run), ["run.steps=8", "run.eval_every=2",
                                              "run.checkpoint_every=2"], "auto")
    assert "best synthetic-pairs/accuracy so far: 1.00000 at step 4" in out
    assert set(_evals(run)) >= {6, 8}  # evaluated after the resume ...
    assert _best(run) == best  # ... and none beat the carried-over best
    assert (run / "best_encoder.pt").read_bytes() == before
    assert "best synthetic-pairs/accuracy" in (run / "training.log").read_text()

    # A carried-over best that is beatable is beaten by the next evaluation that is better.
    best.update(value=0.0, step=8)
    (run / "best.json").write_text(json.dumps(best))
    dist_pool(1).run(_fit, str(run), ["run.steps=10", "run.eval_every=2",
                                      "run.checkpoint_every=2"], "auto")
    assert _best(run)["step"] == 10 and _best(run)["value"] == _evals(run)[10]
    _, meta = load_encoder(run / "best_encoder.pt")
    assert (meta["step"], meta["value"]) == (10, _evals(run)[10])


def test_records_not_of_this_line_are_set_aside(dist_pool, tmp_path):
    run = tmp_path / "run"
    steps = ["run.steps=4", "run.eval_every=2", "run.checkpoint_every=2"]
    dist_pool(1).run(_fit, str(run), steps)
    # a best later than the resumed checkpoint (step 2): the run redoes steps 3-4
    best = _best(run) | {"step": 3, "value": 1.0}
    (run / "best.json").write_text(json.dumps(best))
    [out] = dist_pool(1).run(_fit, str(run), steps, str(run / "checkpoints" / "step_00000002"))
    assert "its step 3 is later than this run's start, step 2" in out
    assert json.loads((run / "best.step00000003.json").read_text())["value"] == 1.0
    assert (run / "best_encoder.step00000003.pt").exists()  # set aside, not deleted
    assert _best(run)["step"] == 4 and _best(run)["value"] == _evals(run)[4]  # this line's best
    # a fresh start in the used directory: the old run's best is set aside too
    [out] = dist_pool(1).run(_fit, str(run), steps)
    assert "it is of an earlier run (step 4); this run starts afresh" in out
    assert (run / "best.step00000004.json").exists() and (run / "best_encoder.step00000004.pt").exists()
    assert _best(run)["step"] in (2, 4)
    # another metric (or mode): not comparable, set aside at the start
    [out] = dist_pool(1).run(_fit, str(run), steps + ["eval.best_mode=lower"], "auto")
    assert "this run synthetic-pairs/accuracy (lower)" in out


def _results(value):
    return [{"name": "lfw", "kind": "verification", "headline": {"accuracy": 0.9}, "val": value}]


def test_nan_and_null_are_never_a_best(tmp_path):
    cfg = load_config(None, ["eval.best_metric=lfw/val"])
    notes: list[str] = []
    best = BestModel(tmp_path, cfg, notes.append)
    model = build_model("tiny", cfg.model.embedding_size, cfg.data.image_size)
    assert not best.update(2, _results(float("nan")), model)
    assert not best.update(3, _results(None), model)  # null: not measurable on this set
    assert not (tmp_path / "best.json").exists() and "not a number to compare" in notes[-1]
    assert best.update(4, _results(0.5), model)
    assert not best.update(6, _results(float("nan")), model)
    assert best.update(8, _results(0.7), model) and _best(tmp_path)["step"] == 8
    # a best.json holding NaN (a file from before this rule) is not carried over
    (tmp_path / "best.json").write_text(json.dumps(_best(tmp_path) | {"value": math.nan}))
    resumed = BestModel(tmp_path, cfg, notes.append, start_step=10)
    assert resumed.best is None and "not a finite number" in notes[-1]


def test_tracking_off_leaves_best_files_alone(tmp_path):
    (tmp_path / "best.json").write_text('{"metric": "lfw/accuracy", "value": 0.9, "step": 5}')
    BestModel(tmp_path, load_config(None), print, start_step=0)
    assert (tmp_path / "best.json").exists()

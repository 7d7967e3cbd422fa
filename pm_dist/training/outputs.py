"""What a run leaves besides checkpoints: its configuration and environment at the start, the
best encoder so far (``eval.best_metric``), the exported encoder (and optionally ONNX) at the end.
Rank 0 writes them."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import yaml

from pm_dist import __version__
from pm_dist.config_io import to_dict


def write_run_info(run_dir: Path, cfg, env, num_classes: int, schedule: dict | None = None) -> None:
    """``config.yaml`` (the resolved config, loadable with ``--config``) and ``environment.json``
    (with ``schedule``: how run.epochs / optim.warmup_epochs became steps)."""
    from pm_dist.engine import import_deepspeed

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    info = {"pm_dist": __version__, "torch": torch.__version__, "python": sys.version,
            "platform": platform.platform(), "world_size": env.world_size,
            "backend": env.backend, "device": str(env.device), "cuda": torch.version.cuda,
            "num_classes": num_classes, "argv": sys.argv,
            "deepspeed": import_deepspeed().__version__}
    if schedule is not None:
        info["schedule"] = schedule
    with open(run_dir / "environment.json", "w") as f:
        json.dump(info, f, indent=1)


def dataset_images(dataset, needed: bool = False) -> int | None:
    """Images in the training set (an epoch's worth): the Arrow dataset's row count; for synthetic
    identities the sum of their counts, computed when ``needed`` or cheap (≤ 10⁷ identities)."""
    n = getattr(dataset, "num_images", None)
    if n is not None:
        return int(n)
    if hasattr(dataset, "counts") and (needed or dataset.num_classes <= 10**7):
        import numpy as np

        total, chunk = 0, 1 << 22
        for lo in range(0, dataset.num_classes, chunk):
            total += int(dataset.counts(np.arange(lo, min(lo + chunk, dataset.num_classes))).sum())
        return total
    return None


def export_encoder(module: torch.nn.Module, run_dir: Path, cfg, note) -> Path:
    """``encoder.pt`` in fp32 (whatever precision trained it), plus ``encoder.onnx`` if asked."""
    from pm_dist.models import save_encoder

    path = save_encoder(run_dir / "encoder.pt", copy.deepcopy(module).float(), cfg.model.name,
                        cfg.model.embedding_size, cfg.data.image_size)
    note(f"encoder: {path}")
    if cfg.run.export_onnx:
        from pm_dist.export import check_onnx, export_onnx

        onnx_path = export_onnx(module, run_dir / "encoder.onnx", cfg.data.image_size)
        diff = check_onnx(module, onnx_path, cfg.data.image_size)
        note(f"onnx: {onnx_path} (max |ONNX − PyTorch| = {diff:.2e})")
    return path


class BestModel:
    """``eval.best_metric``: after each evaluation, keep the encoder whose ``<result>/<key>``
    number is the best so far as ``best_encoder.pt`` (its metadata: ``step``, ``metric``,
    ``value``), with ``best.json`` beside it.

    A resumed run continues from ``best.json`` (a later evaluation replaces the encoder only when it
    is strictly better) when that record belongs to the run's line: the same metric and mode, a
    finite value, and a step no later than the one the run starts from. Any other record (a fresh
    start in a used directory, a resume from an older checkpoint, another metric) is set aside as
    ``best.step<N>.json`` / ``best_encoder.step<N>.pt``, never deleted, as the checkpoints newer
    than the start are. A NaN or infinite value is never a best."""

    def __init__(self, run_dir: Path, cfg, note, enabled: bool = True, start_step: int = 0):
        self.run_dir, self.cfg, self.note = Path(run_dir), cfg, note
        self.metric, self.mode = cfg.eval.best_metric, cfg.eval.best_mode
        self.enabled = enabled and self.metric is not None
        self.best: dict | None = None
        path = self.run_dir / "best.json"
        if not (self.enabled and path.exists()):  # tracking off: best files are left as they are
            return
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        why = self._not_carried(record, start_step)
        if why is None:
            self.best = record
            note(f"best {self.metric} so far: {record['value']:.5f} at step {record['step']} "
                 f"(best.json)")
            return
        self._set_aside(record, why)

    def _not_carried(self, record: dict, start_step: int) -> str | None:
        """Why ``record`` (best.json) does not continue into this run; None when it does."""
        value, step = record.get("value"), record.get("step")
        if record.get("metric") != self.metric or record.get("mode", "higher") != self.mode:
            return (f"it tracks {record.get('metric')} ({record.get('mode', 'higher')}), this run "
                    f"{self.metric} ({self.mode})")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not isinstance(step, int):
            return f"its value {value!r} is not a finite number"
        if step > start_step:
            if start_step == 0:
                return f"it is of an earlier run (step {step}); this run starts afresh"
            return f"its step {step} is later than this run's start, step {start_step}"
        return None

    def _set_aside(self, record: dict, why: str) -> None:
        step = record.get("step")
        tag = f"step{step:08d}" if isinstance(step, int) else "old"
        moved = []
        for name, suffix in (("best.json", ".json"), ("best_encoder.pt", ".pt")):
            src = self.run_dir / name
            if src.exists():
                dst = self.run_dir / f"{src.stem}.{tag}{suffix}"
                n = 1
                while dst.exists():
                    dst = self.run_dir / f"{src.stem}.{tag}.{n}{suffix}"
                    n += 1
                os.replace(src, dst)
                moved.append(dst.name)
        self.note(f"best.json not carried over ({why}): set aside as {', '.join(moved)}")

    def value(self, results: list[dict]) -> float:
        """The chosen number in ``results``: a headline (what metrics.jsonl logs) or a top-level
        number of the result named before the last ``/`` (NaN where it is null: not measurable)."""
        name, key = self.metric.rsplit("/", 1)
        for r in results:
            if r.get("name") == name:
                headline = r.get("headline", {})
                value = headline.get(key, r.get(key))
                if value is None and (key in headline or key in r):  # not measurable this time
                    return float("nan")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
                found = sorted(set(r.get("headline", {})) | {k for k, v in r.items()
                                                              if isinstance(v, (int, float))})
                raise ValueError(f"eval.best_metric={self.metric!r}: result {name!r} has no number "
                                 f"{key!r}; it has {', '.join(found)}")
        names = [str(r.get("name")) for r in results]
        raise ValueError(f"eval.best_metric={self.metric!r}: no evaluation result named {name!r}; "
                         f"this run's results: {', '.join(names) or 'none'}")

    def update(self, step: int, results: list[dict], module: torch.nn.Module) -> bool:
        """Save ``module`` when ``results`` beat the best so far; returns whether it did."""
        if not self.enabled or not results:
            return False
        from pm_dist.files import atomic_write_text
        from pm_dist.models import save_encoder

        value = self.value(results)
        if not math.isfinite(value):
            self.note(f"best {self.metric} = {value} at step {step}: not a number to compare, "
                      "not kept")
            return False
        if self.best is not None:
            old = self.best["value"]
            if not (value > old if self.mode == "higher" else value < old):
                return False
        m = self.cfg.model
        path = save_encoder(self.run_dir / "best_encoder.pt", copy.deepcopy(module).float(), m.name,
                            m.embedding_size, self.cfg.data.image_size,
                            extra={"step": step, "metric": self.metric, "value": value})
        self.best = {"metric": self.metric, "mode": self.mode, "value": value, "step": step,
                     "path": path.name}
        atomic_write_text(self.run_dir / "best.json", json.dumps(self.best, indent=1) + "\n")
        self.note(f"best {self.metric} = {value:.5f} at step {step}: {path}")
        return True

"""What a run leaves besides checkpoints: its configuration and environment at the start, the
best encoder so far (``eval.best_metric``), the exported encoder (and optionally ONNX) at the end.
Rank 0 writes them."""

from __future__ import annotations

import copy
import json
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
    ``value``), with ``best.json`` beside it. A resumed run continues from ``best.json``."""

    def __init__(self, run_dir: Path, cfg, note, enabled: bool = True):
        self.run_dir, self.cfg, self.note = Path(run_dir), cfg, note
        self.metric, self.mode = cfg.eval.best_metric, cfg.eval.best_mode
        self.enabled = enabled and self.metric is not None
        self.best: dict | None = None
        path = self.run_dir / "best.json"
        if self.enabled and path.exists():
            record = json.loads(path.read_text())
            if record.get("metric") == self.metric:
                self.best = record

    def value(self, results: list[dict]) -> float | None:
        """The chosen number in ``results``: a headline (what metrics.jsonl logs) or a top-level
        number of the result named before the last ``/``."""
        name, key = self.metric.rsplit("/", 1)
        for r in results:
            if r.get("name") == name:
                value = r.get("headline", {}).get(key, r.get(key))
                if isinstance(value, (int, float)):
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

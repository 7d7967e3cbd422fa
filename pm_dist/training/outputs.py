"""What a run leaves besides checkpoints: its configuration and environment at the start, the
exported encoder (and optionally ONNX) at the end. Rank 0 writes them."""

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


def write_run_info(run_dir: Path, cfg, env, num_classes: int) -> None:
    """``config.yaml`` (the resolved config, loadable with ``--config``) and ``environment.json``."""
    from pm_dist.engine import import_deepspeed

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    info = {"pm_dist": __version__, "torch": torch.__version__, "python": sys.version,
            "platform": platform.platform(), "world_size": env.world_size,
            "backend": env.backend, "device": str(env.device), "cuda": torch.version.cuda,
            "num_classes": num_classes, "argv": sys.argv,
            "deepspeed": import_deepspeed().__version__}
    with open(run_dir / "environment.json", "w") as f:
        json.dump(info, f, indent=1)


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

"""What several benchmarks share: the machine's description and matplotlib when it is there."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (plots are an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable (pip install -e .[bench]): no PNG plots")
        return None
    return plt


def eval_scores(results: list[dict]) -> dict:
    """Verification accuracy (± std), TAR at the FARs and rank-1 of one evaluation."""
    out = {}
    for r in results:
        if r.get("kind") == "verification":
            out["accuracy"], out["accuracy_std"] = r["accuracy"], r.get("accuracy_std")
            out["tar_at_far"] = r["tar_at_far"]
        elif r.get("kind") == "identification":
            out["rank1"] = r["rank"].get("1")
    return out

"""Progress and metrics of a run, on rank 0: a rich progress bar, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pm_dist.files import atomic_write_text

# Shown in the progress bar and in log lines, in this order, when present.
_SHOWN = (("loss", "loss {:.3f}"), ("accuracy", "acc {:.3f}"), ("lr", "lr {:.2e}"),
          ("images_per_s", "{:.0f} img/s"), ("head/occupancy", "occ {:.2f}"),
          ("head/hit_rate", "hit {:.2f}"), ("head/neg_age_mean", "age {:.1f}"))


def summary(metrics: dict) -> str:
    return "  ".join(fmt.format(metrics[k]) for k, fmt in _SHOWN if k in metrics)


def _drop_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


class MetricsLogger:
    """Does nothing on ranks other than 0 (``enabled=False``), so callers need no rank checks."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, total_steps: int,
                 start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.console = Console()
        path = run_dir / "metrics.jsonl"
        _drop_after(path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.jsonl = open(path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self.console.print("tensorboard is not installed: no event files", style="yellow")
        self.progress = None
        if progress:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               info="")
            self.progress.start()

    def log(self, step: int, metrics: dict, console: bool = False) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=summary(metrics))
        if console:
            self.console.print(f"step {step}  {summary(metrics)}", highlight=False, soft_wrap=True)
            self.jsonl.flush()

    def log_eval(self, step: int, results: list[dict]) -> None:
        if not self.enabled:
            return
        for r in results:  # each suite chose its headline numbers (pm_dist.eval.suites)
            for key, value in r.get("headline", {}).items():
                tag = f"eval/{r['name']}/{key}"
                self.jsonl.write(json.dumps({"step": step, tag: float(value)}) + "\n")
                if self.tb is not None:
                    self.tb.add_scalar(tag, float(value), step)
        self.jsonl.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

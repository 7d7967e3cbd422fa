"""Progress and metrics of a run, on rank 0: the console (a rich progress bar, or plain log lines
with the epoch and an ETA), ``training.log`` (every console line), ``metrics.jsonl``, TensorBoard,
and optionally Weights & Biases (``run.wandb``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pm_dist.files import atomic_write_text

# Shown in the progress bar and in log lines, in this order, when present.
_SHOWN = (("loss", "loss {:.3f}"), ("accuracy", "acc {:.3f}"), ("lr", "lr {:.2e}"),
          ("images_per_s", "{:.0f} img/s"), ("head/occupancy", "occ {:.2f}"),
          ("head/hit_rate", "hit {:.2f}"), ("head/neg_age_mean", "age {:.1f}"))

WANDB_MISSING = ("run.wandb: true needs the wandb package, which is not installed: "
                 "pip install 'pm_dist[wandb]' (or pip install wandb), or set run.wandb=false")


def summary(metrics: dict) -> str:
    return "  ".join(fmt.format(metrics[k]) for k, fmt in _SHOWN if k in metrics)


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04``: an ETA for log lines."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    text = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _drop_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


class _PlainLines:
    """The file side of the tee: ANSI colours and cursor codes stripped, one line per ``\\n``, a
    ``\\r`` restarting the line (as a terminal shows it), flushed per line."""

    def __init__(self, f):
        self.f, self.pending = f, ""

    def write(self, text: str) -> None:
        text = self.pending + _ANSI.sub("", text)
        *lines, self.pending = text.split("\n")
        for line in lines:
            self.f.write(line.rsplit("\r", 1)[-1].rstrip() + "\n")
        if lines:
            self.f.flush()

    def close(self) -> None:
        if self.pending.strip():
            self.write("\n")
        self.f.close()


class _Tee:
    """A text stream that writes to the original stream and to the log (isatty, fileno, encoding:
    the original's, so rich still sees the terminal)."""

    def __init__(self, stream, log: _PlainLines):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class TrainingLog:
    """``<run>/training.log``: every line rank 0 writes to stdout or stderr while it is open (the
    plain text, no colours), appended across resumed sessions. Does nothing when not ``enabled``."""

    _open: "TrainingLog | None" = None  # the one installed on sys.stdout/stderr

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled, self.path = enabled, Path(run_dir) / "training.log"
        self._file = None
        if not enabled:
            return
        if TrainingLog._open is not None:  # a run of this process that failed before closing it
            TrainingLog._open.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _PlainLines(open(self.path, "a", encoding="utf-8"))
        self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        self._saved = sys.stdout, sys.stderr
        self.terminal = sys.stdout  # the real console, for a progress bar kept out of the file
        self._tees = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
        sys.stdout, sys.stderr = self._tees
        TrainingLog._open = self

    def write(self, line: str) -> None:
        """A line for the file only (what the progress bar's console shows)."""
        if self.enabled and self._file is not None:
            self._file.write(line + "\n")

    def close(self) -> None:
        if not self.enabled or self._file is None:
            return
        sys.stdout.flush()
        if sys.stdout is self._tees[0]:  # else someone replaced it since: leave theirs alone
            sys.stdout = self._saved[0]
        if sys.stderr is self._tees[1]:
            sys.stderr = self._saved[1]
        self._file.close()
        self._file = None
        if TrainingLog._open is self:
            TrainingLog._open = None


def append_to_log(run_dir: Path, text: str) -> None:
    """One more line in ``training.log`` after the run's log was closed (its final summary)."""
    with open(Path(run_dir) / "training.log", "a", encoding="utf-8") as f:
        f.write(text + "\n")


def check_wandb() -> None:
    """Raise ``ImportError`` with installation advice when wandb is missing."""
    if sys.modules.get("wandb") is None and importlib.util.find_spec("wandb") is None:
        raise ImportError(WANDB_MISSING)


class _Wandb:
    """The Weights & Biases run of a training run: one id per run directory (kept in
    ``wandb_id.txt``), so a resumed run continues the same W&B run. ``WANDB_MODE=offline`` (and
    every other WANDB_* variable) is honoured; the project is ``WANDB_PROJECT`` or
    ``run.wandb_project``."""

    def __init__(self, run_dir: Path, project: str, config: dict | None):
        check_wandb()
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
            atomic_write_text(id_file, run_id + "\n")
        # WANDB_MODE when set; otherwise wandb's own setting (`wandb offline`) decides
        mode = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_dir.name,
                              id=run_id, resume="allow", dir=str(run_dir), config=config or {},
                              **mode)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Does nothing on ranks other than 0 (``enabled=False``), so callers need no rank checks.

    ``images_per_step`` and ``dataset_images`` give the epoch on log lines; plain lines (progress
    off) also carry an ETA from this session's speed. ``log_file``: the run's ``TrainingLog``,
    closed with this logger. ``wandb``: also log to Weights & Biases (``config``: the run config
    shown there)."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, total_steps: int,
                 start_step: int = 0, images_per_step: int | None = None,
                 dataset_images: int | None = None, log_file: TrainingLog | None = None,
                 wandb: bool = False, wandb_project: str = "pm_dist", config: dict | None = None):
        self.enabled = enabled
        self.log_file = log_file
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.console = Console()
        self.total_steps, self.start_step = total_steps, start_step
        self.images_per_step, self.dataset_images = images_per_step, dataset_images
        self._t0 = time.perf_counter()
        path = run_dir / "metrics.jsonl"
        _drop_after(path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.jsonl = open(path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self.console.print("tensorboard is not installed: no event files", style="yellow")
        self.wandb = _Wandb(run_dir, wandb_project, config) if wandb else None
        self.progress = None
        if progress:
            # The bar draws on the real console only; the lines printed above it reach
            # training.log through write_line.
            terminal = log_file.terminal if log_file is not None and log_file.enabled else None
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(file=terminal) if terminal else self.console,
                                     transient=False, redirect_stdout=terminal is None,
                                     redirect_stderr=terminal is None)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               info="")
            self.progress.start()

    def epoch(self, step: int) -> float | None:
        """Epochs done after ``step`` (images seen / dataset images), when the sizes are known."""
        if not (self.images_per_step and self.dataset_images):
            return None
        return step * self.images_per_step / self.dataset_images

    def eta(self, step: int) -> float | None:
        """Seconds left at this session's mean speed so far."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.total_steps - step) * (time.perf_counter() - self._t0) / done

    def line(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        epoch = self.epoch(step)
        if epoch is not None:
            parts.append(f"epoch {epoch:.2f}")
        parts.append(summary(metrics))
        if self.progress is None:  # the bar shows its own time remaining
            eta = self.eta(step)
            if eta is not None:
                parts.append(f"eta {format_duration(eta)}")
        return "  ".join(p for p in parts if p)

    def _print(self, text: str) -> None:
        if self.progress is not None and self.progress.console is not self.console:
            self.progress.console.print(text, highlight=False, soft_wrap=True)
            if self.log_file is not None:
                self.log_file.write(text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def log(self, step: int, metrics: dict, console: bool = False) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=summary(metrics))
        if console:
            self._print(self.line(step, metrics))
            self.jsonl.flush()

    def log_eval(self, step: int, results: list[dict]) -> None:
        if not self.enabled:
            return
        values = {}
        for r in results:  # each suite chose its headline numbers (pm_dist.eval.suites)
            for key, value in r.get("headline", {}).items():
                tag = f"eval/{r['name']}/{key}"
                values[tag] = float(value)
                self.jsonl.write(json.dumps({"step": step, tag: float(value)}) + "\n")
                if self.tb is not None:
                    self.tb.add_scalar(tag, float(value), step)
        if self.wandb is not None and values:
            self.wandb.log(values, step)
        self.jsonl.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def close(self) -> None:
        if self.enabled:
            if self.progress is not None:
                self.progress.stop()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.close()
        if self.log_file is not None:
            self.log_file.close()

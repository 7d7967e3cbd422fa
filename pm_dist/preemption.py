"""Stopping a run cleanly when asked: SIGUSR1, SIGTERM or a stop file → save at the next step
boundary, skip the final evaluation and export, exit with ``EXIT_PREEMPTED`` (75).

Who asks: a scheduler's preemption or time limit (Slurm sends SIGTERM, or with
``--signal=USR1@…`` SIGUSR1; ``launch/slurm.sbatch`` touches the stop file instead, which reaches
every rank of every node through the shared file system), or a person (``touch $PM_DIST_STOP_FILE``
or ``kill -USR1 <pid>``).

Every rank must stop at the *same* step, or the ones still training wait forever in the next
collective. ``Stopper.should_stop()`` is therefore collective: each rank contributes whether it was
signalled (rank 0 also whether the stop file exists) to one all-reduce of one number per step, and
all get the same answer.
"""

from __future__ import annotations

import os
import signal
import threading

from pm_dist.distributed import any_rank, get_rank

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; a requeue continues from the saved checkpoint
STOP_FILE_ENV = "PM_DIST_STOP_FILE"
SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


class Stopper:
    """Catches ``SIGNALS`` (while it is open) and watches ``stop_file`` (default
    ``$PM_DIST_STOP_FILE``; unset: no file). Use as a context manager, or call ``close()``: the
    previous signal handlers come back."""

    def __init__(self, stop_file: str | os.PathLike | None = None, signals=SIGNALS):
        if stop_file is None:
            stop_file = os.environ.get(STOP_FILE_ENV) or None
        self.stop_file = None if stop_file is None else os.fspath(stop_file)
        self.reason: str | None = None  # why this rank wants to stop (None: it does not)
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"

    def requested_here(self) -> str | None:
        """This rank's own reason to stop, if any (no collective). Only rank 0 looks at the stop
        file: one ``stat`` per step on the shared file system, not one per rank."""
        if self.reason is None and self.stop_file and get_rank() == 0 \
                and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file} exists"
        return self.reason

    def should_stop(self) -> bool:
        """Collective (every rank, every step): True on every rank when any rank was asked to stop."""
        return any_rank(self.requested_here() is not None)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> Stopper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Where a step's time goes: named sections timed with the device synchronised at both ends.

The trainer runs with ``NO_TIMING`` (nothing measured, nothing synchronised); the throughput
benchmark passes a ``StepTimer`` to ``TrainStep`` and reads the share of each section.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class StepTimer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def section(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


class _NoTiming:
    def section(self, name: str):
        return nullcontext()


NO_TIMING = _NoTiming()

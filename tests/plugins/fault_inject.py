"""Test-only faults, loaded as a plugin (``PM_DIST_PLUGINS=fault_inject``) by every rank of a real
run: ``PM_DIST_TEST_FAULT=KIND@RANK:STEP`` makes rank RANK fail, in the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0 or unset), as KIND says:

* ``init``: raise before the trainer issues its first collective;
* ``step``: raise inside training step STEP (counted from 1), before its all-gather;
* ``save``: raise while writing its shard of the checkpoint of step STEP;
* ``kill``: SIGKILL itself right after step STEP.
"""

from __future__ import annotations

import os
import signal

SPEC = os.environ.get("PM_DIST_TEST_FAULT", "")
ACTIVE = bool(SPEC) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

if ACTIVE:
    kind, where = SPEC.split("@")
    rank, at = (int(x) for x in where.split(":"))
    if int(os.environ.get("RANK", "0")) == rank:
        if kind == "init":  # the trainer's first collective is the resume decision
            from pm_dist.training.checkpoints import CheckpointManager

            def _init(self, *args, **kwargs):
                raise OSError(f"injected fault: rank {rank} fails before its first collective")

            CheckpointManager.__init__ = _init
        elif kind in ("step", "kill"):
            from pm_dist.training.step import TrainStep

            call = TrainStep.__call__

            def _call(self, *args, **kwargs):
                if kind == "step" and self.step + 1 == at:
                    raise RuntimeError(f"injected fault: rank {rank} fails in step {at}")
                out = call(self, *args, **kwargs)
                if kind == "kill" and self.step + 1 == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            TrainStep.__call__ = _call
        elif kind == "save":
            import pm_dist.checkpoint as checkpoint
            import torch

            class _Torch:
                def __getattr__(self, name):
                    return getattr(torch, name)

                @staticmethod
                def save(obj, path, *args, **kwargs):
                    if f"step_{at:08d}" in str(path):
                        raise OSError(f"injected fault: rank {rank} cannot write {path}")
                    return torch.save(obj, path, *args, **kwargs)

            checkpoint.torch = _Torch()
        else:
            raise ValueError(f"PM_DIST_TEST_FAULT: unknown kind {kind!r}")

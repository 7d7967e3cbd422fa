"""The training loader: P×K batches for steps start_step, start_step+1, … forever.

How the work is split, and why:

* The **main process** turns a step into a plan (the rank's sample indices, labels and flips):
  the sampler is a pure function of (seed, step), and a proposer (a miner) lives in the training
  process, so plans must be made there. The DataLoader draws plans from an infinite sampler, which
  it consumes a fixed number of batches ahead (``lookahead`` = ``num_workers × prefetch_factor``,
  0 without workers): the plan of step s is made when batch s − lookahead is handed out, i.e.
  while step s − lookahead − 1 may be the last step trained. A proposer must therefore answer from
  state that is final by then, whatever the timing: the doppelganger miner reads its table as of
  step s − delay with delay ≥ lookahead (``pm_dist.mining``), so a plan never depends on timing.
* **Workers** load, decode, flip and normalise one whole local batch per item. Flips are drawn from
  (seed, step) for the *global* batch and sliced like the samples, so a batch is bit-identical whatever
  the worker count, timing, or world size, and a resumed run continues exactly.
* **Bad samples**: under ``bad_sample="skip"`` they are dropped (the batch gets shorter), counted in
  ``bad_count`` and logged with their source ids (``bad_sources``); under "error" the loader raises
  ``BadSampleError`` naming the file, row, index and source id.
* **No rank waits forever**: in a process group of W > 1 ranks every ``next()`` ends with one tiny
  all-reduce of "did my batch fail?". When any rank's batch failed, every rank raises (the failing
  one its own error, the others ``PeerDataError`` quoting it) instead of entering the next training
  collective alone. The same agreement guards opening the dataset. A rank that dies outright is
  caught by the process group's timeout (``init_distributed``).
"""

from __future__ import annotations

import logging
import signal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from pm_dist.distributed import first_failure

from .config import DataConfig
from .datasets import build_dataset
from .errors import BadSampleError, PeerDataError
from .sampler import PKSampler, step_rng
from .transforms import normalize

log = logging.getLogger("pm_dist.data")
_TAG_FLIP = 21
MAX_BAD_SOURCES = 10_000  # remembered source ids of skipped samples (the count keeps going)


def flips_for(seed: int, step: int, batch_size: int) -> np.ndarray:
    """Horizontal-flip decisions of the global batch of ``step`` (bool [batch_size])."""
    return step_rng(seed, step, _TAG_FLIP).random(batch_size) < 0.5


class _Plans(Sampler):
    """Infinite stream of per-step plans (step, indices, labels, flips), made in the main process."""

    def __init__(self, sampler: PKSampler, start_step: int, seed: int, augment: bool):
        self.sampler, self.start_step, self.seed, self.augment = sampler, start_step, seed, augment

    def plan(self, step: int):
        batch = self.sampler.local_batch(step)
        if self.augment:
            flips = flips_for(self.seed, step, self.sampler.P * self.sampler.K)[self.sampler.local_slice]
        else:
            flips = np.zeros(len(batch.indices), bool)
        return step, batch.indices, batch.labels, flips

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.plan(step)
            step += 1


class _BatchFetcher(Dataset):
    """Loads one planned local batch; returns (step, images, labels, skipped, error)."""

    def __init__(self, dataset, image_size: int, bad_sample: str):
        self.dataset, self.image_size, self.bad_sample = dataset, image_size, bad_sample

    def __getitem__(self, plan):
        step, indices, labels, flips = plan
        images, keep, skipped = [], [], []
        for pos, (i, y) in enumerate(zip(indices.tolist(), labels.tolist())):
            try:
                img = self.dataset.load(i, y)
                if img.shape != (self.image_size, self.image_size, 3):
                    raise BadSampleError(f"dataset {type(self.dataset).__name__}", i,
                                         self.dataset.source_of(i),
                                         f"image of shape {img.shape}, expected "
                                         f"({self.image_size}, {self.image_size}, 3)")
            except BadSampleError as e:
                if self.bad_sample == "error":
                    return step, None, None, [], e
                skipped.append(e)
                continue
            images.append(img)
            keep.append(pos)
        stack = np.stack(images) if images else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        x = normalize(stack, flips[keep])
        return step, x, torch.from_numpy(labels[keep].astype(np.int64)), skipped, None


def _identity(item):
    return item


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode; the training process owns the cores' BLAS threads
    # A scheduler stopping the job signals every process: the training process saves at the next
    # step (pm_dist.preemption) and needs its workers until then; they end with it.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _sync_active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _agree_on_failure(exc: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when any rank has ``exc`` (each rank calls this once)."""
    failure = first_failure(None if exc is None else f"{type(exc).__name__}: {exc}")
    if failure is None:
        return
    if exc is not None:
        raise exc
    rank, msg = failure
    raise PeerDataError(f"rank {rank} failed {what}: {msg}")


class TrainLoader:
    """Iterator of (images float32 [B_r, 3, S, S], labels int64 [B_r]); see the module docstring.

    ``step``: the step of the next batch (what to save in a checkpoint); ``bad_count`` and
    ``bad_sources``: samples skipped so far on this rank; ``sampler``: the ``PKSampler`` (its
    ``set_proposer`` connects a miner).
    """

    def __init__(self, dataset, sampler: PKSampler, cfg: DataConfig, start_step: int, sync: bool):
        self.dataset, self.sampler, self.cfg = dataset, sampler, cfg
        self.step = start_step
        self.bad_count = 0
        self.bad_sources: list[str] = []
        self._sync = sync
        self._plans = _Plans(sampler, start_step, cfg.seed, cfg.augment)
        workers = cfg.num_workers
        self._loader = DataLoader(
            _BatchFetcher(dataset, cfg.image_size, cfg.bad_sample), batch_size=None,
            sampler=self._plans, num_workers=workers, collate_fn=_identity,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=cfg.prefetch_factor if workers else None,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
            # Its own generator: a DataLoader iterator draws a base seed, which must not come from
            # the global torch RNG (dropout's), or a resumed run would drift from the original.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self._it = None

    @property
    def lookahead(self) -> int:
        """How many steps ahead of the step being trained a plan may be made (see the module)."""
        return self.cfg.num_workers * self.cfg.prefetch_factor if self.cfg.num_workers else 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self._loader)
        exc, result = None, None
        try:
            result = next(self._it)
            if result[4] is not None:
                exc = result[4]
        except Exception as e:  # a dead worker or an I/O error: the other ranks must hear of it too
            exc = e
        if self._sync:
            _agree_on_failure(exc, f"to load its batch of step {self.step}")
        elif exc is not None:
            raise exc
        step, images, labels, skipped, _ = result
        if step != self.step:
            raise RuntimeError(f"loader out of order: expected step {self.step}, got {step}")
        for e in skipped:
            self.bad_count += 1
            if len(self.bad_sources) < MAX_BAD_SOURCES:
                self.bad_sources.append(e.source or e.where)
            log.warning("skipped %s", e)
        self.step = step + 1
        return images, labels

    def close(self) -> None:
        """Stop the worker processes (a new ``next()`` would start them again at ``step``).

        Stopped here, not left to the iterator's garbage collection: a traceback that still holds
        the iterator (an error raised out of ``next()``) would keep the workers alive, and the
        interpreter waits for them at exit."""
        shutdown = getattr(self._it, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()
        self._it = None
        self._plans.start_step = self.step


def build_train_loader(
    cfg: DataConfig, P: int, K: int, rank: int, world_size: int, start_step: int = 0,
    *, proposer=None, proposal_fraction: float = 0.5, sync_errors: bool | None = None,
) -> TrainLoader:
    """The loader of rank ``rank`` of ``world_size`` for steps start_step, start_step+1, ….

    ``sync_errors`` (default: on when a process group of W > 1 is initialised) makes every rank
    raise when one rank fails, at opening and at every batch (one tiny all-reduce per batch).
    ``cfg`` is validated where it is made (loading a run config, or your own ``cfg.validate()``).
    """
    sync = _sync_active(world_size) if sync_errors is None else bool(sync_errors)
    exc, dataset, sampler = None, None, None
    try:
        dataset = build_dataset(cfg)
        sampler = PKSampler(dataset, P, K, world_size, rank, cfg.seed, weighting=cfg.sampling,
                            proposer=proposer, proposal_fraction=proposal_fraction)
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        exc = e
    if sync:
        _agree_on_failure(exc, "to open the training data")
    elif exc is not None:
        raise exc
    return TrainLoader(dataset, sampler, cfg, start_step, sync)

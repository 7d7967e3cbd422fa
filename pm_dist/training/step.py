"""One training step on rank r of W, and the rules that skip it on every rank together.

    images → encoder (DeepSpeed engine) → all-gather (backward: one reduce-scatter ×W) → head on
    the global batch (outside the engine, fp32) → loss → backward → engine.step(), head optimizer

Skips (every rank decides alike, from values all ranks share, so the collectives stay equal): a rank
with fewer than 2 images (BatchNorm cannot train on one), a non-finite loss on any rank (before any
backward), a non-finite gradient on any rank, and DeepSpeed's own overflow skip.

With gradient accumulation a skip drops the whole window, for the encoder and the head alike: the
window's earlier micro-batches' gradients are discarded, its remaining micro-batches are drawn (the
data order does not shift) but not run, and the window ends as DeepSpeed ends an overflowed one
(no update, the learning rate stays, the engine's counters stay on the trainer's step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pm_dist.distributed import all_gather_rows, any_rank, gather_embeddings, gather_sizes
from pm_dist.engine import (checks_own_overflow, drop_accumulation_window, loss_scale,
                            skip_micro_step, step_overflowed)
from pm_dist.training.timing import NO_TIMING

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainStep:
    """Callable ``(images, labels) -> metrics`` for one step; counts the steps it skipped."""

    def __init__(self, engine, head, head_optimizer, head_scheduler, *, lr_source, precision: str,
                 grad_accum: int, image_shape: tuple[int, ...], device,
                 note: Callable[[str], None], timer=NO_TIMING):
        self.engine, self.head = engine, head
        self.head_optimizer, self.head_scheduler = head_optimizer, head_scheduler
        self.lr_source = lr_source  # the encoder's optimizer: the rate this step uses
        self.precision, self.device, self.note = precision, device, note
        self.grad_accum, self.image_shape = grad_accum, image_shape
        self.check_encoder_grads = not checks_own_overflow(engine)
        self.timer = timer  # benchmarks/train_throughput.py times the sections below
        self.head_observer = None  # (embeddings, labels, HeadOutput) after the head: mining's hook
        self.skipped_steps = 0
        self.step = 0  # the trainer's step: where in its accumulation window this micro-step is
        self._window_dropped = False

    @property
    def _last_of_window(self) -> bool:
        return (self.step + 1) % self.grad_accum == 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        self._lr = self.lr_source.param_groups[0]["lr"]
        if self._window_dropped:  # an earlier micro-batch of this window was skipped
            return self._skip(None, "its accumulation window was dropped", ran_backward=False,
                              quiet=True)
        return self._run(images, labels)

    def _run(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        engine = self.engine
        images, labels = images.to(self.device), labels.to(self.device)
        if self.precision in _HALF:
            images = images.to(_HALF[self.precision])
        sizes = gather_sizes(len(labels), self.device)  # skipped bad samples shorten batches
        if min(sizes) < 2:  # every rank sees the same sizes
            return self._skip(None, f"a rank has {min(sizes)} image(s) left after bad samples",
                              ran_backward=False)
        with self.timer.section("encoder forward"):
            local = engine(images)
        with self.timer.section("gather + head forward"):
            # Head numerics in fp32 whatever the encoder runs in.
            embeddings = gather_embeddings(local.float(), sizes=sizes)
            all_labels = all_gather_rows(labels, sizes=sizes)
            out = self.head(embeddings, all_labels)
        if self.head_observer is not None:
            self.head_observer(embeddings, all_labels, out)

        if any_rank(not bool(torch.isfinite(out.loss)), self.device):
            return self._skip(out, "non-finite loss", ran_backward=False)
        scale = loss_scale(engine) if self.precision == "fp16" else 1.0
        with self.timer.section("backward"):
            engine.backward(out.loss)
        if any_rank(not _all_finite(self._grads_to_check()), self.device):
            return self._skip(out, "non-finite gradient", ran_backward=True)
        with self.timer.section("optimizer steps"):
            overflow = self._optimizer_steps(scale)
        return self._metrics(out, skipped=overflow)

    def _optimizer_steps(self, scale: float) -> bool:
        """The engine's step, then the head's at accumulation boundaries unless DeepSpeed skipped
        its own (an fp16 overflow): the two never diverge. Returns whether it was skipped."""
        engine = self.engine
        boundary = self._last_of_window
        if engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError(f"step {self.step}: DeepSpeed's accumulation boundary disagrees "
                               "with the trainer's")
        engine.step()
        overflow = boundary and step_overflowed(engine)  # the flag is stale between boundaries
        if self.head_optimizer is not None and boundary:
            if not overflow:
                if scale != 1.0:  # engine.backward scaled the head's gradients as well
                    for p in self.head.parameters():
                        if p.grad is not None:
                            p.grad.div_(scale)
                self.head_optimizer.step()
                self.head_scheduler.step()
            self.head_optimizer.zero_grad(set_to_none=True)
        return overflow

    def _grads_to_check(self) -> list[torch.Tensor]:
        params = list(self.head.parameters())
        if self.check_encoder_grads:
            params += list(self.engine.module.parameters())
        return [p.grad for p in params if p.grad is not None]

    def _skip(self, out, why: str, *, ran_backward: bool, quiet: bool = False) -> dict:
        """Skip this micro-step on every rank and drop its accumulation window: the head's
        gradients now, the encoder's at the window's end (``drop_accumulation_window``)."""
        self.skipped_steps += 1
        if self.head_optimizer is not None:
            self.head_optimizer.zero_grad(set_to_none=True)
        if not quiet:
            window = " (and the rest of its accumulation window)" if self.grad_accum > 1 else ""
            self.note(f"step {self.step}: {why} on some rank: step skipped on all ranks{window}")
        self._window_dropped = True
        if not self._last_of_window:
            skip_micro_step(self.engine)
        elif ran_backward and not self.check_encoder_grads:
            # This micro-step's gradients reached DeepSpeed: its step sees them non-finite.
            self.engine.step()
            self._window_dropped = False
            if not step_overflowed(self.engine):
                self.note(f"step {self.step}: DeepSpeed found the encoder's gradients finite and "
                          "updated it; the head's update is skipped")
        else:
            drop_accumulation_window(self.engine, self.image_shape)
            self._window_dropped = False
        return self._metrics(out, skipped=True)

    def _metrics(self, out, skipped: bool) -> dict:
        if out is None:  # skipped before the head ran
            return {"loss": float("nan"), "accuracy": float("nan"), "lr": self._lr, "skipped": 1.0}
        m = {"loss": out.loss.item(), "accuracy": out.accuracy.item(), "lr": self._lr,
             "skipped": float(skipped)}
        m.update({f"head/{k}": float(v) for k, v in out.stats.items()})
        return m


def _all_finite(grads) -> bool:
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # one device sync

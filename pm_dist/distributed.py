"""Process group set-up and the autograd-aware collectives the heads are built on.

Two jobs live here and nowhere else:

* ``init_distributed``: read torchrun's environment, pick NCCL on CUDA and gloo otherwise, and fall
  back to a plain single process when not launched by torchrun (so the same code runs everywhere).
* ``gather_embeddings``: all-gather of the per-rank embeddings into the global batch whose backward
  is **one** reduce-scatter, multiplied by the data-parallel size. Each rank differentiates the loss of
  the *global* batch, so the reduce-scatter hands rank r the true gradient of that loss w.r.t. its own
  rows; DeepSpeed then averages encoder gradients over ranks (divides by W), hence the ×W
  (the gradient contract, docs/architecture.md).

Per-rank batch sizes may differ (the last batch of an epoch): sizes are exchanged first and rows
padded to the largest, so every rank issues the same collectives with the same shapes.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch renamed the tensor collectives; keep working on the releases GPU users have.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     single_process_group: bool = False) -> DistEnv:
    """Initialise the default process group from torchrun's environment, if there is one.

    ``backend`` overrides the choice (NCCL when CUDA is available, gloo otherwise). The timeout bounds
    how long a rank waits in a collective for a peer that died, so a failure on one rank ends the job
    instead of hanging the others forever. Calling it again returns the existing set-up.

    Not launched by torchrun, it returns a single-process set-up without a group, unless
    ``single_process_group`` asks for a one-rank group (DeepSpeed insists on one).
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if not launched_by_torchrun():
        if not single_process_group:
            return DistEnv(0, 1, 0, device, None)
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed() -> None:
    """End of a run: every rank waits for the others, then the group is destroyed.

    Without the barrier, a rank that finishes first (rank 1, while rank 0 still writes logs or
    evaluates) tears down its gloo connections under a peer that still holds them; on 2 CPU ranks
    that ended in "terminate called without an active exception" (SIGABRT) about once in a few
    hundred runs. The garbage collection first drops objects (an engine, a head) that still hold
    the group, so its threads are joined here and not during interpreter shutdown."""
    if not is_distributed():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def exit_on_error(message: str, every_rank: bool) -> int:
    """A command's end on bad input: ``message`` on stderr, and the exit status 2 to return.

    ``every_rank``: every rank raised the error together (``first_failure`` announced it). The group
    then ends in order, as after a finished run; a process that exits with its gloo group alive ends
    with SIGABRT instead (about one run in five on 2 CPU ranks). Call it outside the ``except``
    block, whose traceback keeps the objects holding the group alive. A peer that never arrives
    costs at most the group's timeout. An error of one rank's own exits at once: its peers learn of
    it from their next collective."""
    print(message, file=sys.stderr)
    if every_rank:
        try:
            shutdown_distributed()
        except Exception:  # noqa: BLE001 — the error already reported is the one that matters
            pass
    return 2


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce that is a no-op in a single process."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def collective_device(group=None) -> torch.device:
    """Where a small tensor for a collective must live: an NCCL-only group takes CUDA tensors only;
    gloo, and a mixed ``cpu:gloo,cuda:nccl`` group, take CPU tensors."""
    if is_distributed():
        backend = str(dist.get_backend(group))
        if "nccl" in backend and "gloo" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device | str | None = None, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device or collective_device(group))
    return bool(all_reduce_(t, dist.ReduceOp.MAX, group).item() > 0)


def first_failure(message: str | None, group=None) -> tuple[int, str] | None:
    """Collective, the one answer to "did any rank fail?": every rank passes its error message (None
    when it did fine) and every rank gets (rank, message) of the lowest failing rank, or None. Costs
    one all-reduce when nothing failed, plus one object all-gather when something did."""
    if get_world_size(group) == 1:
        return None if message is None else (0, message)
    if not any_rank(message is not None, group=group):
        return None
    messages = [None] * get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    return next((r, m) for r, m in enumerate(messages) if m is not None)


def average_buffers(module: torch.nn.Module, group=None) -> None:
    """Collective: make every rank's buffers identical. Floating buffers (BatchNorm running
    statistics) become their mean over the ranks; the others (counters) take rank 0's value.

    Data parallelism keeps the parameters identical, not the buffers: each rank's BatchNorm tracks
    the statistics of its own slice of the batch. One all-reduce per buffer dtype.
    """
    if get_world_size(group) == 1:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_kind.setdefault((buf.dtype, buf.device), []).append(buf)
    for (dtype, _), bufs in by_kind.items():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        if dtype.is_floating_point:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(get_world_size(group))
        else:
            dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        offset = 0
        for b in bufs:
            b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def gather_sizes(n: int, device: torch.device | str = "cpu", group=None) -> list[int]:
    """Every rank's row count, in rank order."""
    world = get_world_size(group)
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(sizes, local, group=group)
    return sizes.tolist()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


def _unpad(stacked: torch.Tensor, sizes: list[int], rows: int) -> torch.Tensor:
    """[W·rows, ...] with each rank's block padded to ``rows`` → the concatenated real rows."""
    if all(s == rows for s in sizes):
        return stacked
    blocks = stacked.view(len(sizes), rows, *stacked.shape[1:])
    return torch.cat([blocks[r, :s] for r, s in enumerate(sizes)])


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    rows = max(sizes)
    world = len(sizes)
    out = x.new_empty((world * rows,) + tuple(x.shape[1:]))
    _all_gather_single(out, _pad_rows(x, rows), group=group)
    return _unpad(out, sizes, rows)


def all_gather_rows(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (no autograd). Sizes may differ per rank."""
    if get_world_size(group) == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device, group)
    return _gather_padded(x, sizes, group)


class _GatherEmbeddings(torch.autograd.Function):
    """Forward: all-gather rows. Backward: one reduce-scatter of the padded gradient, times scale."""

    @staticmethod
    def forward(ctx, x, sizes, grad_scale, group):
        ctx.sizes, ctx.grad_scale, ctx.group = sizes, grad_scale, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.sizes, ctx.group
        rows = max(sizes)
        rank = get_rank(group)
        if any(s != rows for s in sizes):
            grad = torch.cat([_pad_rows(part, rows) for part in grad.split(sizes)])
        out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), group=group)
        out = out[: sizes[rank]]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None, None


def gather_embeddings(
    x: torch.Tensor, group=None, grad_scale: float | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """All-gather ``x`` [B_r, D] into the global batch [ΣB, D], differentiably.

    The backward is a single reduce-scatter (the sum over ranks of each rank's gradient for my rows),
    multiplied by ``grad_scale``, by default the world size: DeepSpeed divides encoder gradients by W
    when it averages them, so ×W makes the encoder's gradient equal that of the global-batch mean loss.
    Pass ``grad_scale=1`` when nothing averages afterwards.
    """
    world = get_world_size(group)
    if world == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device, group)
    scale = float(world) if grad_scale is None else float(grad_scale)
    return _GatherEmbeddings.apply(x, sizes, scale, group)

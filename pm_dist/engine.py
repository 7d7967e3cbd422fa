"""The encoder under DeepSpeed: its config, its initialisation, and what the step asks of it.

Only the encoder goes into ``deepspeed.initialize``: DeepSpeed broadcasts rank 0's parameters and
averages gradients over ranks, which would corrupt a sharded head. Everything that knows DeepSpeed's
internals (its CPU op builder, the loss scaler's attribute names, the overflow flag) lives here.
"""

from __future__ import annotations

import importlib

import torch

from pm_dist.config import RunConfig
from pm_dist.models.norm import is_norm_statistic, keep_norm_stats_fp32
from pm_dist.training.optim import build_optimizer, build_scheduler


def import_deepspeed():
    """``import deepspeed`` without its CPU shared-memory all-reduce op.

    On CPU, DeepSpeed's comm back-end JIT-compiles that op (60–90 s with g++) when it wraps the
    process group; it serves only inference all-reduce, which pm_dist never uses. On CUDA the builder
    does not exist and nothing changes.
    """
    import deepspeed

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm.torch:
    # ``deepspeed.comm`` re-exports the name ``torch`` (the torch package), which shadows the module.
    if not torch.cuda.is_available():
        ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON (if any) with the run's batch, precision, ZeRO stage and clipping on top."""
    ds = cfg.deepspeed.json()
    ds["train_micro_batch_size_per_gpu"] = cfg.batch.per_rank(world_size)
    ds["gradient_accumulation_steps"] = cfg.batch.grad_accum
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    # DeepSpeed clips at 1.0 unless told otherwise: always say it.
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.effective_zero_stage
    ds["zero_allow_untested_optimizer"] = True  # our torch optimizers under ZeRO ≥ 1
    precision = cfg.deepspeed.effective_precision
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {"initial_scale_power": 16, **ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds.setdefault("steps_per_print", 10**9)
    ds.pop("optimizer", None)  # pm_dist builds the optimizer and schedule itself
    ds.pop("scheduler", None)
    return ds


def initialize_encoder(model: torch.nn.Module, cfg: RunConfig, world_size: int):
    """(engine, optimizer, scheduler) for the encoder."""
    deepspeed = import_deepspeed()
    keep_norm_stats_fp32(model)
    # insightface's IResNet freezes features.weight: optimize what trains.
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size), dist_init_required=False)
    # DeepSpeed casts parameters to bf16/fp16 and leaves buffers fp32. Normalization statistics
    # stay fp32 (models/norm.py); any other floating buffer follows the parameters.
    dtype = next(engine.module.parameters()).dtype
    for name, buf in engine.module.named_buffers():
        if (buf.is_floating_point() and buf.dtype != dtype
                and not is_norm_statistic(engine.module, name)):
            buf.data = buf.data.to(dtype)
    return engine, optimizer, scheduler


def loss_scale(engine) -> float:
    """The fp16 loss scale DeepSpeed multiplied the loss by (1.0 when it has none)."""
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):  # the attribute differs between DeepSpeed optimizers
        value = getattr(opt, name, None)
        if value is not None:
            return float(value)
    return 1.0


def step_overflowed(engine) -> bool:
    """Whether the engine's last ``step()`` was skipped for an fp16 overflow or a non-finite ZeRO
    partition (DeepSpeed then leaves the weights alone)."""
    return bool(getattr(engine.optimizer, "overflow", False))


def checks_own_overflow(engine) -> bool:
    """Whether DeepSpeed finds non-finite gradients itself and skips the step (its fp16/bf16 and
    ZeRO optimizers carry an ``overflow`` flag; a plain torch optimizer under ZeRO-0 fp32 does
    not). Where it does, the trainer leaves the encoder's gradients to it (fp16's loss scaler must
    see its overflows to lower the scale)."""
    return hasattr(engine.optimizer, "overflow")


def skip_micro_step(engine) -> None:
    """Count a micro-batch the trainer drew but did not run, so DeepSpeed's accumulation
    boundaries stay on the trainer's."""
    engine.micro_steps += 1


def drop_accumulation_window(engine, image_shape: tuple[int, ...]) -> None:
    """End the current accumulation window without an update, as DeepSpeed ends one whose
    gradients overflowed: the gradients accumulated so far are discarded, the learning rate does
    not move, ``global_steps`` and ``skipped_steps`` count it. Call it in place of the window's
    last ``engine.step()``.

    Where DeepSpeed checks gradients itself, its gradient state (ZeRO partitions, fp16/bf16 flat
    buffers) is not ours to clear: one backward of a NaN-scaled output of two blank images (in eval
    mode: no statistic or dropout draw changes) makes every accumulated gradient non-finite, and
    DeepSpeed's own overflow path discards the window.
    """
    if checks_own_overflow(engine):
        module = engine.module
        was_training = module.training
        module.eval()
        param = next(module.parameters())
        blank = torch.zeros((2, *image_shape), dtype=param.dtype, device=param.device)
        out = engine(blank)
        module.train(was_training)
        assert engine.is_gradient_accumulation_boundary(), "not the window's last micro-step"
        engine.backward(out.float().sum() * float("nan"))
        engine.step()
        if not step_overflowed(engine):
            raise RuntimeError("DeepSpeed applied an update to a dropped accumulation window")
        return
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.skipped_steps += 1
    engine.global_samples += engine.train_batch_size()

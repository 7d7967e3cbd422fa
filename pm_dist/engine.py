"""The encoder under DeepSpeed: its config, its optimizer and learning-rate schedule.

Only the encoder goes into ``deepspeed.initialize``: DeepSpeed broadcasts rank 0's parameters and
averages gradients over ranks, which would corrupt a sharded head (DESIGN.md §2). The learned heads
get an optimizer and schedule of the same kind here, stepped beside the engine.
"""

from __future__ import annotations

import importlib
import math

import torch

from pm_dist.config import RunConfig


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
    global_batch = cfg.batch.global_batch
    if global_batch % world_size:
        raise ValueError(f"the global batch of {global_batch} images (batch.classes_per_batch × "
                         f"batch.images_per_class) does not split over {world_size} ranks")
    ds["train_micro_batch_size_per_gpu"] = global_batch // world_size
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


def build_optimizer(params, cfg: RunConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.lr * lr_scale
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(cfg: RunConfig, step: int) -> float:
    """Linear warm-up, then poly or cosine decay to min_lr over the run (per optimizer step)."""
    o, total = cfg.optim, max(1, cfg.run.steps // cfg.batch.grad_accum)
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.min_lr / o.lr
    if o.schedule == "poly":
        return floor + (1 - floor) * (1 - progress) ** o.power
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: RunConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))


def initialize_encoder(model: torch.nn.Module, cfg: RunConfig, world_size: int):
    """(engine, optimizer, scheduler) for the encoder."""
    deepspeed = import_deepspeed()
    # insightface's IResNet freezes features.weight: optimize what trains.
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size), dist_init_required=False)
    # DeepSpeed casts parameters to bf16/fp16 but leaves buffers fp32; BatchNorm on CPU refuses
    # half weights with fp32 running statistics.
    dtype = next(engine.module.parameters()).dtype
    for buf in engine.module.buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    return engine, optimizer, scheduler

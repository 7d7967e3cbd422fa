"""Optimizers and the learning-rate schedule, the same kind for the encoder and a learned head."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.lr * lr_scale
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(cfg, step: int) -> float:
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


def build_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))

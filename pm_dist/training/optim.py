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


def resolve_epochs(cfg, dataset_images: int) -> dict | None:
    """Turn ``run.epochs`` / ``optim.warmup_epochs`` into steps, in place; returns what was
    resolved (None when the config counts in steps only).

    An epoch is ``dataset_images // global_batch`` steps (insightface's num_image // global batch;
    global batch = classes_per_batch × images_per_class, every rank together, so the world size
    does not enter). ``run.steps`` counts micro-batches and is rounded down to a multiple of
    ``batch.grad_accum`` (at least one window); the warm-up counts optimizer steps, i.e. its
    micro-batches divided by ``grad_accum``. The epoch keys are cleared afterwards, so the saved
    config.yaml states the steps the run took."""
    run, o, accum = cfg.run, cfg.optim, cfg.batch.grad_accum
    if run.epochs is None and o.warmup_epochs is None:
        return None
    per_epoch = dataset_images // cfg.batch.global_batch
    if per_epoch < 1:
        raise ValueError(f"the dataset's {dataset_images} images are fewer than one global batch "
                         f"of {cfg.batch.global_batch}: an epoch has no step")
    info = {"dataset_images": dataset_images, "global_batch": cfg.batch.global_batch,
            "grad_accum": accum, "steps_per_epoch": per_epoch}
    if run.epochs is not None:
        steps = int(run.epochs * per_epoch) // accum * accum
        info.update(epochs=run.epochs, steps=max(accum, steps))
        run.steps, run.epochs = info["steps"], None
    if o.warmup_epochs is not None:
        info.update(warmup_epochs=o.warmup_epochs,
                    warmup_steps=int(o.warmup_epochs * per_epoch) // accum)
        o.warmup_steps, o.warmup_epochs = info["warmup_steps"], None
    return info


def describe_resolution(info: dict) -> str:
    """The log line of :func:`resolve_epochs`'s result."""
    parts = [f"{info['steps_per_epoch']} steps per epoch ({info['dataset_images']} images // "
             f"global batch {info['global_batch']})"]
    if "epochs" in info:
        parts.append(f"run.epochs={info['epochs']:g} → run.steps={info['steps']}"
                     + (f" (a multiple of grad_accum={info['grad_accum']})" if info["grad_accum"] > 1 else ""))
    if "warmup_epochs" in info:
        parts.append(f"optim.warmup_epochs={info['warmup_epochs']:g} → optim.warmup_steps="
                     f"{info['warmup_steps']} optimizer steps")
    return "; ".join(parts)

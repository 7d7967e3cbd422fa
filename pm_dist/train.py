"""Training entry point: ``torchrun --nproc_per_node=N -m pm_dist.train --config X.yaml [k=v ...]``.

One step on rank r (DESIGN.md §2): load the rank's slice of the P×K batch → encoder (DeepSpeed
engine, data parallel) → all-gather embeddings (backward: reduce-scatter ×W) and labels → head on the
global batch (sharded, outside the engine) → backward → step the engine and the head's optimizer.

With no arguments it trains the embedded default (a tiny encoder on synthetic identities, CPU-sized)
and prints held-out verification accuracy at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pm_dist import __version__
from pm_dist.checkpoint import CheckpointError, find_latest, load_file, read_meta, save_checkpoint
from pm_dist.config import RunConfig, load_config
from pm_dist.config_io import ConfigError, to_dict
from pm_dist.distributed import (DistEnv, all_gather_rows, any_rank, gather_embeddings,
                                 gather_sizes, init_distributed)
from pm_dist.engine import build_optimizer, build_scheduler, import_deepspeed, initialize_encoder
from pm_dist.heads import build_head
from pm_dist.heads.fc import reshard_fc_state
from pm_dist.metrics import MetricsLogger

LEARNED_HEADS = ("full_fc", "partial_fc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pm_dist.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML run config (default: the embedded CPU demo)")
    p.add_argument("--resume", default="none",
                   help="'none', 'auto' (newest valid checkpoint of the run), or a checkpoint dir")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.steps=100")
    return p.parse_args(argv)


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, resume: str = "none",
                 record_history: bool = False):
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.skipped_steps = 0
        self.record_history = record_history
        self.history: list[dict] = []  # every step's metrics when recorded (tests, notebooks)
        _seed_everything(cfg.run.seed)  # same on every rank: the encoders start identical

        from pm_dist.data.loader import build_train_loader
        from pm_dist.models import build_model

        ckpt, meta = self._resolve_resume(resume)
        self.loader = build_train_loader(cfg.data, cfg.batch.classes_per_batch,
                                         cfg.batch.images_per_class, env.rank, env.world_size,
                                         start_step=meta["step"] if meta else 0)
        self.num_classes = self.loader.dataset.num_classes
        model = build_model(cfg.model.name, cfg.model.embedding_size, cfg.data.image_size,
                            cfg.model.dropout)
        self.engine, self.optimizer, self.scheduler = initialize_encoder(model, cfg, env.world_size)
        self.head = build_head(cfg, self.num_classes, env.world_size, self.device)
        self.head_optimizer = self.head_scheduler = None
        if cfg.head.name in LEARNED_HEADS:
            self.head_optimizer = build_optimizer(self.head.parameters(), cfg, cfg.head.lr_scale)
            self.head_scheduler = build_scheduler(self.head_optimizer, cfg)
        if ckpt is not None:
            self._load(ckpt, meta)
        self.metrics = MetricsLogger(self.run_dir, enabled=env.is_main, progress=cfg.run.progress,
                                     total_steps=cfg.run.steps, start_step=self.step)
        if env.is_main:
            self._write_run_info()

    # ------------------------------------------------------------------ one step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        engine, cfg = self.engine, self.cfg
        self._lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        images, labels = images.to(self.device), labels.to(self.device)
        precision = cfg.deepspeed.effective_precision
        if precision != "fp32":
            images = images.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        sizes = gather_sizes(len(labels), self.device)  # skipped bad samples shorten batches
        if min(sizes) < 2:  # BatchNorm cannot train on one image; every rank sees the same sizes
            return self._skip(None, f"a rank has {min(sizes)} image(s) left after bad samples")
        local = engine(images)
        # Head numerics in fp32 whatever the encoder runs in (DESIGN.md §3).
        embeddings = gather_embeddings(local.float(), sizes=sizes)
        all_labels = all_gather_rows(labels, sizes=sizes)
        out = self.head(embeddings, all_labels)

        # A non-finite loss on any rank skips the step on every rank, before any backward.
        if any_rank(not bool(torch.isfinite(out.loss)), self.device):
            return self._skip(out, "non-finite loss")
        loss_scale = _loss_scale(engine) if precision == "fp16" else 1.0
        engine.backward(out.loss)
        if any_rank(not _grads_finite(self._local_grads()), self.device):
            engine.zero_grad()
            return self._skip(out, "non-finite gradient")
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        overflow = bool(getattr(engine.optimizer, "overflow", False))  # DeepSpeed skipped its step
        if self.head_optimizer is not None and boundary:
            if not overflow:
                if loss_scale != 1.0:  # engine.backward scaled the head's gradients as well
                    for p in self.head.parameters():
                        if p.grad is not None:
                            p.grad.div_(loss_scale)
                self.head_optimizer.step()
                self.head_scheduler.step()
            self.head_optimizer.zero_grad(set_to_none=True)
        return self._step_metrics(out, skipped=overflow)

    def _local_grads(self):
        params = list(self.head.parameters())
        ds = self.cfg.deepspeed
        # ZeRO ≥ 1 checks its own partitions, and fp16's loss scaler must see its overflows itself
        # to lower the scale: both skip the encoder step on their own (engine.optimizer.overflow).
        if ds.effective_zero_stage == 0 and ds.effective_precision != "fp16":
            params += list(self.engine.module.parameters())
        return [p.grad for p in params if p.grad is not None]

    def _skip(self, out, why: str) -> dict:
        self.skipped_steps += 1
        if self.head_optimizer is not None:
            self.head_optimizer.zero_grad(set_to_none=True)
        self.metrics.note(f"step {self.step}: {why} on some rank: step skipped on all ranks")
        return self._step_metrics(out, skipped=True)

    def _step_metrics(self, out, skipped: bool) -> dict:
        if out is None:  # skipped before the head ran
            return {"loss": float("nan"), "accuracy": float("nan"), "lr": self._lr, "skipped": 1.0}
        m = {"loss": out.loss.item(), "accuracy": out.accuracy.item(),
             "lr": self._lr, "skipped": float(skipped)}
        m.update({f"head/{k}": float(v) for k, v in out.stats.items()})
        return m

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg = self.cfg
        images_per_step = cfg.batch.global_batch
        last_eval: list[dict] = []
        try:
            tick = time.perf_counter()
            for images, labels in self.loader:
                if self.step >= cfg.run.steps:
                    break
                self.engine.train()
                m = self.train_step(images, labels)
                self.step += 1
                now = time.perf_counter()
                m["images_per_s"] = images_per_step / max(now - tick, 1e-9)
                tick = now
                if self.record_history:
                    self.history.append({"step": self.step, **m})
                self.metrics.log(self.step, m, console=self._due(cfg.run.log_every))
                if self._due(cfg.run.checkpoint_every) and self.step < cfg.run.steps:
                    self.save()
                if self._due(cfg.run.eval_every) and self.step < cfg.run.steps:
                    last_eval = self.evaluate()
                    tick = time.perf_counter()
            self.save()
            last_eval = self.evaluate()
            self._export()
        finally:
            self.loader.close()
            self.metrics.close()
        return {"step": self.step, "skipped_steps": self.skipped_steps, "eval": last_eval}

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[dict]:
        """Every rank takes part (each embeds a slice); rank 0 prints and writes the report."""
        from pm_dist.eval.report import write_report
        from pm_dist.eval.synthetic import evaluate_synthetic
        from pm_dist.eval.verification import evaluate_verification, load_bin

        cfg, model = self.cfg, self.engine.module
        was_training = model.training
        model.eval()
        results = []
        with torch.no_grad():
            if cfg.data.source == "synthetic" and cfg.eval.synthetic_pairs > 0:
                from pm_dist.data.synthetic import SyntheticIdentities
                ident = SyntheticIdentities(**cfg.data.synthetic_kwargs())
                results += evaluate_synthetic(
                    model, ident, num_pairs=cfg.eval.synthetic_pairs,
                    num_identities=min(cfg.eval.identification_identities,
                                       cfg.data.heldout_identities),
                    batch_size=cfg.eval.batch_size, device=self.device)
            size = cfg.eval.image_size or cfg.data.image_size
            for path in cfg.eval.bin_files:
                results.append(evaluate_verification(model, load_bin(path, size),
                                                     cfg.eval.batch_size, self.device))
        model.train(was_training)
        if results:
            write_report(results, self.run_dir / "eval", step=self.step)
            self.metrics.log_eval(self.step, results)
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        head_state = {"head": self.head.state_dict(), "name": self.cfg.head.name,
                      "world_size": self.env.world_size, "rank": self.env.rank}
        if self.head_optimizer is not None:
            head_state["optimizer"] = self.head_optimizer.state_dict()
            head_state["scheduler"] = self.head_scheduler.state_dict()
        # DeepSpeed saves rank 0's module; BatchNorm statistics differ per rank (no SyncBN).
        buffers = {k: v.clone() for k, v in self.engine.module.named_buffers()}
        rank_state = {"rng": _rng_state(), "skipped_steps": self.skipped_steps, "buffers": buffers}
        meta = {"world_size": self.env.world_size, "head": self.cfg.head.name,
                "config": to_dict(self.cfg), "pm_dist": __version__}
        path = save_checkpoint(self.ckpt_root, self.step, self.engine, head_state, rank_state, meta,
                               keep=self.cfg.run.keep_checkpoints)
        self.metrics.note(f"checkpoint: {path}")
        return path

    def _resolve_resume(self, resume: str) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its verified meta.json (None, None: a fresh start)."""
        if resume in ("none", "", None):
            return None, None
        if resume == "auto":
            return find_latest(self.ckpt_root, log=self._log_main)
        return Path(resume), read_meta(resume)

    def _load(self, ckpt: Path, meta: dict) -> None:
        if meta["head"] != self.cfg.head.name:
            raise CheckpointError(f"checkpoint {ckpt} holds a {meta['head']} head, the config asks "
                                  f"for {self.cfg.head.name}")
        old_world, world = meta["world_size"], self.env.world_size
        same_world = old_world == world
        # ZeRO ≥ 1 partitions optimizer state by rank: on another world size only the weights load.
        load_optim = same_world or self.cfg.deepspeed.effective_zero_stage == 0
        path, _ = self.engine.load_checkpoint(str(ckpt / "engine"), tag="ds",
                                              load_optimizer_states=load_optim,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint {ckpt / 'engine'}: DeepSpeed found nothing to load")
        head_files = [ckpt / f"head_rank{r}.pt" for r in range(old_world)]
        if not same_world:
            self._log_main(f"resume: resharding the head from {old_world} to {world} ranks"
                           + ("" if load_optim else "; encoder optimizer state restarts (ZeRO ≥ 1)"))
        if self.cfg.head.name == "prototype_memory":
            # All shards: the memory rebuilds its own (an exact copy at the same world size and
            # capacity, else resharded by class mod W).
            dropped = self.head.load_shards([load_file(f)["head"] for f in head_files])
            if dropped:
                self._log_main(f"resume: {dropped} prototypes did not fit the new shards "
                               "(the oldest were dropped)")
        elif same_world:
            self._load_learned_head(load_file(head_files[self.env.rank]))
        else:
            states = [load_file(f) for f in head_files]
            module, optim = reshard_fc_state(states, self.head.start, self.head.end)
            self._load_learned_head({**states[0], "head": module, "optimizer": optim})
        if same_world:  # RNG streams and BatchNorm statistics are per rank
            rank_state = load_file(ckpt / f"state_rank{self.env.rank}.pt")
            _set_rng_state(rank_state["rng"])
            own = dict(self.engine.module.named_buffers())
            for name, value in rank_state["buffers"].items():
                own[name].copy_(value)
            self.skipped_steps = rank_state["skipped_steps"]
        self.step = meta["step"]
        self._log_main(f"resumed from {ckpt} at step {self.step}")

    def _load_learned_head(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["optimizer"])
        self.head_scheduler.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------------ outputs
    def _export(self) -> None:
        if not self.env.is_main:
            return
        from pm_dist.models import save_encoder
        path = save_encoder(self.run_dir / "encoder.pt", copy.deepcopy(self.engine.module).float(),
                            self.cfg.model.name, self.cfg.model.embedding_size, self.cfg.data.image_size)
        self.metrics.note(f"encoder: {path}")
        if self.cfg.run.export_onnx:
            from pm_dist.export import check_onnx, export_onnx
            onnx_path = export_onnx(self.engine.module, self.run_dir / "encoder.onnx",
                                    self.cfg.data.image_size)
            diff = check_onnx(self.engine.module, onnx_path, self.cfg.data.image_size)
            self.metrics.note(f"onnx: {onnx_path} (max |ONNX − PyTorch| = {diff:.2e})")

    def _write_run_info(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(to_dict(self.cfg), f, sort_keys=False)
        info = {"pm_dist": __version__, "torch": torch.__version__, "python": sys.version,
                "platform": platform.platform(), "world_size": self.env.world_size,
                "backend": self.env.backend, "device": str(self.device),
                "cuda": torch.version.cuda, "num_classes": self.num_classes,
                "argv": sys.argv, "deepspeed": import_deepspeed().__version__}
        with open(self.run_dir / "environment.json", "w") as f:
            json.dump(info, f, indent=1)

    def _log_main(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)


def _loss_scale(engine) -> float:
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if value is not None:
            return float(value)
    return 1.0


def _grads_finite(grads) -> bool:
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # one device sync


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.preflight(int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s, single_process_group=True)
    trainer = Trainer(cfg, env, resume=args.resume)
    result = trainer.fit()
    if env.is_main:
        for r in result["eval"]:
            if r.get("kind") == "verification":
                print(f"final {r['name']}: accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f}")
        print(f"outputs: {trainer.run_dir.resolve()}")
    if env.backend is not None:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

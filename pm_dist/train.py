"""Training entry point: ``torchrun --nproc_per_node=N -m pm_dist.train --config X.yaml [k=v ...]``.

One step on rank r: load the rank's slice of the P×K batch → encoder (DeepSpeed engine, data
parallel) → all-gather embeddings (backward: reduce-scatter ×W) and labels → head on the global batch
(sharded, outside the engine) → backward → step the engine and the head's optimizer
(``pm_dist.training.step``; docs/architecture.md draws it).

With no arguments it trains the embedded default (a tiny encoder on synthetic identities, CPU-sized)
and prints held-out verification accuracy at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pm_dist.checkpoint import CheckpointError
from pm_dist.config import RunConfig, load_config
from pm_dist.config_io import ConfigError
from pm_dist.distributed import (DistEnv, average_buffers, exit_on_error, init_distributed,
                                 shutdown_distributed)
from pm_dist.engine import initialize_encoder
from pm_dist.heads import HeadContext, build_head
from pm_dist.config_io import to_dict
from pm_dist.metrics import MetricsLogger, TrainingLog, append_to_log
from pm_dist.mining import attach as attach_miner
from pm_dist.plugins import PluginError, load_plugins
from pm_dist.preemption import EXIT_PREEMPTED, Stopper
from pm_dist.training.checkpoints import CheckpointManager
from pm_dist.training.optim import (build_optimizer, build_scheduler, describe_resolution,
                                    resolve_epochs)
from pm_dist.training.outputs import BestModel, dataset_images, export_encoder, write_run_info
from pm_dist.training.rng import seed_everything, seed_rank_streams
from pm_dist.training.step import TrainStep


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pm_dist.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML run config (default: the embedded CPU demo)")
    p.add_argument("--resume", default="none",
                   help="'none', 'auto' (newest valid checkpoint of the run), 'auto-or-fresh' "
                        "(as auto, but step 0 when no checkpoint verifies), or a checkpoint dir")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers your heads or evaluation suites)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.steps=100")
    return p.parse_args(argv)


class Trainer:
    """A run: its parts built from the config, then ``fit()`` — steps, checkpoints, evaluation,
    export. Attributes: ``loader``, ``engine`` (the encoder), ``head``, ``head_optimizer`` (learned
    heads), ``step``, ``history`` (every step's metrics when ``record_history``)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: str = "none",
                 record_history: bool = False):
        from pm_dist.data.loader import build_train_loader
        from pm_dist.models import build_model

        self.cfg, self.env, self.device = cfg, env, env.device
        self.run_dir = Path(cfg.run.out_dir)
        self.record_history = record_history
        self.history: list[dict] = []
        self.step = 0
        # training.log: every console line of rank 0 from here on (closed with self.metrics)
        self.training_log = TrainingLog(self.run_dir, enabled=env.is_main)
        seed_everything(cfg.run.seed)  # same on every rank: the encoders start identical

        self.checkpoints = CheckpointManager(cfg, env, log=self._log_main)
        ckpt, meta = self.checkpoints.resolve(resume)
        self.loader = build_train_loader(cfg.data, cfg.batch.classes_per_batch,
                                         cfg.batch.images_per_class, env.rank, env.world_size,
                                         start_step=meta["step"] if meta else 0)
        self.num_classes = self.loader.dataset.num_classes
        if self.loader.sampler.num_ineligible:
            self._log_main(f"data: {self.loader.sampler.num_ineligible} of {self.num_classes} "
                           "identities have fewer than 2 images and are never batch identities")
        self.dataset_images = dataset_images(self.loader.dataset, needed=cfg.run.epochs is not None
                                             or cfg.optim.warmup_epochs is not None)
        self.schedule = resolve_epochs(cfg, self.dataset_images)  # run.epochs → run.steps
        if self.schedule is not None:
            self._log_main(describe_resolution(self.schedule))
        model = build_model(cfg.model.name, cfg.model.embedding_size, cfg.data.image_size,
                            cfg.model.dropout)
        self._init_from(model, ckpt)  # before initialize: DeepSpeed broadcasts rank 0's weights
        seed_rank_streams(cfg.run.seed, env.rank)  # dropout draws differ between ranks
        self.engine, self.optimizer, self.scheduler = initialize_encoder(model, cfg, env.world_size)
        self.head, self.head_optimizer, self.head_scheduler = self._build_head()
        self.metrics = MetricsLogger(self.run_dir, enabled=env.is_main, progress=cfg.run.progress,
                                     total_steps=cfg.run.steps, start_step=meta["step"] if meta else 0,
                                     images_per_step=cfg.batch.global_batch,
                                     dataset_images=self.dataset_images, log_file=self.training_log,
                                     wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project,
                                     config=to_dict(cfg))
        self.best = BestModel(self.run_dir, cfg, self.metrics.note, enabled=env.is_main,
                              start_step=meta["step"] if meta else 0)
        self.train_step = TrainStep(
            self.engine, self.head, self.head_optimizer, self.head_scheduler,
            lr_source=self.optimizer, precision=cfg.deepspeed.effective_precision,
            grad_accum=cfg.batch.grad_accum, device=self.device, note=self.metrics.note,
            image_shape=(3, cfg.data.image_size, cfg.data.image_size))
        self.miner = attach_miner(cfg.mining, self.loader, self.head, self.train_step)  # None: off
        if ckpt is not None:
            self._resume(ckpt, meta)
        if env.is_main:
            write_run_info(self.run_dir, cfg, env, self.num_classes, self.schedule)

    def _init_from(self, model, ckpt) -> None:
        """``model.init_from``: start the encoder from trained weights (the head starts fresh)."""
        source = self.cfg.model.init_from
        if not source:
            return
        if ckpt is not None:
            self._log_main(f"model.init_from={source} ignored: resuming from {ckpt} (the "
                           "checkpoint's weights win)")
            return
        from pm_dist.models.loading import init_from

        m = self.cfg.model
        meta = init_from(model, source, m.name, m.embedding_size, self.cfg.data.image_size)
        self._log_main(f"encoder initialised from {source} ({meta['arch']}, D={meta['embedding_size']})")

    def _build_head(self):
        cfg = self.cfg
        context = HeadContext(
            embedding_size=cfg.model.embedding_size, num_classes=self.num_classes,
            classes_per_batch=cfg.batch.classes_per_batch, world_size=self.env.world_size,
            margin=cfg.head.margin.build(), seed=cfg.run.seed, device=self.device)
        head = build_head(cfg.head.name, cfg.head.options, context)
        if not head.learned:
            if cfg.head.margin.kind == "arcface":  # measured, not forbidden: say so once
                self._log_main("warning: head.margin.kind=arcface with a head without learned "
                               "weights: in the accuracy benchmark the Prototype Memory collapsed "
                               "under ArcFace (docs/prototype_memory.md, 'Why these defaults'); "
                               "cosface is the measured choice")
            return head, None, None
        optimizer = build_optimizer(head.parameters(), cfg, cfg.head.lr_scale)
        return head, optimizer, build_scheduler(optimizer, cfg)

    @property
    def skipped_steps(self) -> int:
        return self.train_step.skipped_steps

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        last_eval: list[dict] = []
        stopper, saved_step, preempted = Stopper(), self.step, None
        try:
            tick = time.perf_counter()
            for images, labels in self.loader:
                if self.step >= cfg.run.steps:
                    break
                # Collective: every rank stops after the same step, at an accumulation boundary
                # (a checkpoint inside a window would not resume exactly).
                if self.step % cfg.batch.grad_accum == 0 and stopper.should_stop():
                    preempted = stopper.reason or "another rank was asked to stop"
                    self._log_main(f"stopping at step {self.step}: {preempted}")
                    if self.step != saved_step:
                        self.save()
                    break
                self.engine.train()
                self.train_step.step = self.step
                m = self.train_step(images, labels)
                if self.miner is not None:
                    m.update(self.miner.end_step(self.step, m))
                self.step += 1
                now = time.perf_counter()
                m["images_per_s"] = cfg.batch.global_batch / max(now - tick, 1e-9)
                tick = now
                if self.record_history:
                    self.history.append({"step": self.step, **m})
                self.metrics.log(self.step, m, console=self._due(cfg.run.log_every))
                if self._due(cfg.run.checkpoint_every) and self.step < cfg.run.steps:
                    self.save()
                    saved_step = self.step
                if self._due(cfg.run.eval_every) and self.step < cfg.run.steps:
                    last_eval = self.evaluate()
                    tick = time.perf_counter()
            if preempted is None:
                self.save()
                last_eval = self.evaluate()
                with self._one_encoder():
                    if self.env.is_main:
                        export_encoder(self.engine.module, self.run_dir, cfg, self.metrics.note)
        finally:
            stopper.close()
            self.loader.close()
            self.metrics.close()
        return {"step": self.step, "skipped_steps": self.skipped_steps, "eval": last_eval,
                "preempted": preempted}

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[dict]:
        """The config's evaluation suites, built as ``python -m pm_dist.evaluate --config`` builds
        them; every rank embeds a share; rank 0 prints and writes the report."""
        from pm_dist.eval.report import write_report
        from pm_dist.eval.suites import run_suites
        from pm_dist.evaluate import eval_context, suites_from_config

        with self._one_encoder():
            model = self.engine.module
            was_training = model.training
            model.eval()
            with torch.no_grad():
                results = run_suites(model, suites_from_config(self.cfg),
                                     eval_context(self.cfg, self.device))
            model.train(was_training)
            if results:
                write_report(results, self.run_dir / "eval", step=self.step)
                self.metrics.log_eval(self.step, results)
                self.best.update(self.step, results, model)  # eval.best_metric: best_encoder.pt
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        with self._one_encoder() as own_buffers:
            path = self.checkpoints.save(
                self.step, self.engine, self.head, self.head_optimizer, self.head_scheduler,
                {"skipped_steps": self.skipped_steps, **self._mining_state()},
                own_buffers=own_buffers)
        self.metrics.note(f"checkpoint: {path}")
        return path

    @contextmanager
    def _one_encoder(self):
        """Every rank's encoder identical, BatchNorm statistics included (their mean over ranks),
        while evaluation, a checkpoint or the export reads it as *the* encoder; afterwards each
        rank's own statistics come back, so stopping to save or evaluate does not change the run
        (a resumed run continues as if it never stopped). Yields this rank's own buffers."""
        module = self.engine.module
        own = {k: b.detach().clone() for k, b in module.named_buffers()}
        average_buffers(module)
        try:
            yield own
        finally:
            for name, buf in module.named_buffers():
                buf.data.copy_(own[name])

    def _mining_state(self) -> dict:
        """The doppelganger table is replicated: rank 0 saves it, every rank loads that copy."""
        if self.miner is None or not self.env.is_main:
            return {}
        return {"mining": self.miner.state_dict()}

    def _resume(self, ckpt: Path, meta: dict) -> None:
        extra = self.checkpoints.load(ckpt, meta, self.engine, self.head, self.head_optimizer,
                                      self.head_scheduler)
        if self.miner is not None:
            state = self.checkpoints.replicated_state(ckpt, meta, "mining")
            if state is None:
                self._log_main(f"resume: {ckpt} has no doppelganger table; mining starts empty "
                               f"(batches differ from a run that mined from the start)")
                self.miner.table.start_at(meta["step"])
            else:
                self.miner.load_state_dict(state)
        self.train_step.skipped_steps = extra.get("skipped_steps", 0)
        self.step = meta["step"]
        self._log_main(f"resumed from {ckpt} at step {self.step}")

    def _log_main(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        load_plugins(args.plugin)
        cfg = load_config(args.config, args.overrides)
        cfg.preflight(int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, PluginError) as err:
        return exit_on_error(f"config error: {err}", every_rank=False)  # before the group
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s, single_process_group=True)
    failure = None
    try:
        result = _train(cfg, env, args.resume)
    except CheckpointError as err:  # raised on every rank together
        failure = f"checkpoint error: {err}"
    if failure is not None:
        return exit_on_error(failure, every_rank=True)
    shutdown_distributed()
    return EXIT_PREEMPTED if result["preempted"] else 0


def _train(cfg, env: DistEnv, resume) -> dict:
    """Train and report; the trainer (and the engine holding the process group) ends with it."""
    trainer = Trainer(cfg, env, resume=resume)
    result = trainer.fit()
    if result["preempted"]:
        if env.is_main:
            saved = " with a checkpoint of that step" if result["step"] else ""
            print(f"stopped at step {result['step']} ({result['preempted']}){saved}; "
                  f"exit {EXIT_PREEMPTED}: --resume auto continues", flush=True)
        return result
    if env.is_main:
        lines = [f"final {r['name']}: accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
                 for r in result["eval"] if r.get("kind") == "verification"]
        lines.append(f"outputs: {trainer.run_dir.resolve()}")
        for line in lines:
            print(line)
            append_to_log(trainer.run_dir, line)  # training.log closed with the run
    return result

if __name__ == "__main__":
    sys.exit(main())

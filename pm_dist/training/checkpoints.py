"""Saving and restoring a run: every part's state in one checkpoint, restorable at any world size.

The parts and what each keeps (the file layout and its verification are ``pm_dist.checkpoint``'s):

* the encoder engine: DeepSpeed's own checkpoint (module, optimizer, lr schedule);
* the head: ``Head.shard_state`` per rank, with its optimizer's state;
* each rank: its RNG streams, its encoder buffers (BatchNorm statistics), the head's schedule and
  the skipped-step count.

On resume at the same world size every part loads exactly (a resumed run continues bit for bit on
CPU); at another world size the head reshards itself from the saved shards, the encoder loads its
weights (and, under ZeRO-0, its optimizer), and the per-rank streams start afresh.

Which checkpoint is one decision, rank 0's, broadcast (``pm_dist.checkpoint.resolve``); every file
a rank loads is checked to belong to it. Each save names its parent (the previous save, or the
checkpoint the run started from), so pruning touches only this run's line.
"""

from __future__ import annotations

from pathlib import Path

from pm_dist import __version__
from pm_dist.checkpoint import CheckpointError, check_loaded, load_file, resolve, save_checkpoint
from pm_dist.config_io import to_dict
from pm_dist.distributed import first_failure
from pm_dist.heads.base import ShardFiles
from pm_dist.training.rng import rng_state, set_rng_state


class CheckpointManager:
    """The checkpoints of one run directory, over the parts of ``pm_dist.train.Trainer``."""

    def __init__(self, cfg, env, log):
        self.cfg, self.env, self.log = cfg, env, log
        self.root = Path(cfg.run.out_dir) / "checkpoints"
        self.parent: str | None = None  # id of the checkpoint the next save descends from

    def resolve(self, resume: str | None) -> tuple[Path | None, dict | None]:
        """Collective: the checkpoint to resume from and its verified meta.json, the same on every
        rank (None, None: a fresh start). ``resume``: none, auto, auto-or-fresh or a directory."""
        ckpt, meta = resolve(self.root, resume, log=self.log)
        self.parent = meta.get("id") if meta else None
        return ckpt, meta

    def save(self, step: int, engine, head, head_optimizer, head_scheduler, rank_extra: dict,
             own_buffers: dict | None = None) -> Path:
        """Collective: every rank calls it at the same step. ``own_buffers``: this rank's BatchNorm
        statistics when the module's are the ranks' mean at the moment (``Trainer.save``)."""
        head_state = {"head": head.shard_state(head_optimizer), "name": self.cfg.head.name,
                      "world_size": self.env.world_size, "rank": self.env.rank}
        # DeepSpeed saves rank 0's module (the model); a rank's own buffers resume it exactly.
        buffers = own_buffers or {k: v.clone() for k, v in engine.module.named_buffers()}
        rank_state = {"rng": rng_state(), "buffers": buffers, **rank_extra}
        if head_scheduler is not None:
            rank_state["head_scheduler"] = head_scheduler.state_dict()
        meta = {"world_size": self.env.world_size, "head": self.cfg.head.name,
                "config": to_dict(self.cfg), "pm_dist": __version__}
        path, self.parent = save_checkpoint(self.root, step, engine, head_state, rank_state, meta,
                                            keep=self.cfg.run.keep_checkpoints, parent=self.parent)
        return path

    def load(self, ckpt: Path, meta: dict, engine, head, head_optimizer, head_scheduler) -> dict:
        """Collective: restore every part; returns this rank's extra state (empty at another world
        size). When loading fails on any rank, every rank raises (none waits for it)."""
        error, extra = None, {}
        try:
            extra = self._load(ckpt, meta, engine, head, head_optimizer, head_scheduler)
        except Exception as err:  # noqa: BLE001 — the others must hear of it, whatever it is
            error = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
        failed = first_failure(error)
        if failed is not None:
            raise CheckpointError(f"resume from {ckpt} failed on rank {failed[0]}: {failed[1]}")
        return extra

    def _load(self, ckpt: Path, meta: dict, engine, head, head_optimizer, head_scheduler) -> dict:
        if meta["head"] != self.cfg.head.name:
            raise CheckpointError(f"checkpoint {ckpt} holds a {meta['head']} head, the config asks "
                                  f"for {self.cfg.head.name}")
        old_world, world = meta["world_size"], self.env.world_size
        same_world = old_world == world
        # ZeRO ≥ 1 partitions optimizer state by rank: on another world size only the weights load.
        load_optim = same_world or self.cfg.deepspeed.effective_zero_stage == 0
        path, _ = engine.load_checkpoint(str(ckpt / "engine"), tag="ds",
                                         load_optimizer_states=load_optim,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint {ckpt / 'engine'}: DeepSpeed found nothing to load")
        if not same_world:
            self.log(f"resume: resharding the head from {old_world} to {world} ranks"
                     + ("" if load_optim else "; encoder optimizer state restarts (ZeRO ≥ 1)"))
        shards = self.head_shards(ckpt, meta)
        for note in head.load_shards(shards, head_optimizer):  # reads only the files it needs
            self.log(f"resume: {note}")
        # the head's schedule is the same on every rank: at another world size, rank 0's
        rank_state = self._load_checked(ckpt / f"state_rank{self.env.rank if same_world else 0}.pt",
                                        meta)
        if head_scheduler is not None:
            head_scheduler.load_state_dict(rank_state["head_scheduler"])
        if not same_world:  # RNG streams and buffers are per rank: nothing to match them to
            return {}
        set_rng_state(rank_state["rng"])
        own = dict(engine.module.named_buffers())
        for name, value in rank_state["buffers"].items():
            own[name].copy_(value)
        return {k: v for k, v in rank_state.items()
                if k not in ("rng", "buffers", "head_scheduler", "checkpoint_id")}

    @classmethod
    def head_shards(cls, ckpt: Path, meta: dict) -> ShardFiles:
        """The saved head shards, one lazily read file per saved rank (checked against ``meta``)."""
        files = [ckpt / f"head_rank{r}.pt" for r in range(meta["world_size"])]
        return ShardFiles([(lambda f=f: cls._load_checked(f, meta)["head"]) for f in files])

    @staticmethod
    def _load_checked(path: Path, meta: dict) -> dict:
        state = load_file(path)
        check_loaded(state, meta, path)
        return state

    # -- replicated state (the doppelganger table): saved by rank 0 in its rank state, read by all
    def replicated_state(self, ckpt: Path, meta: dict, key: str):
        """``key`` of rank 0's saved state (None when absent), whatever this rank and world size."""
        return self._load_checked(ckpt / "state_rank0.pt", meta).get(key)

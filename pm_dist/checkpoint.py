"""Atomic, verifiable, prunable training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_00000200/``:

    engine/              DeepSpeed checkpoint of the encoder (module, optimizer, lr schedule)
    head_rank{r}.pt      rank r's head shard (memory or FC weights, head optimizer and schedule)
    state_rank{r}.pt     rank r's RNG states
    meta.json            step, world size, config, and the size + sha256 of every file above

All ranks write into ``.tmp-step_…``; only when every rank is done does rank 0 write ``meta.json``
and rename the directory into place, so a crash mid-write never leaves a directory named ``step_*``
that is incomplete, and never touches the last good one. ``meta.json`` is written last: a
``step_*`` directory without it, or whose files do not match their recorded size and sha256, is
damaged. ``--resume auto`` takes the newest valid checkpoint and says which damaged ones it passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pm_dist.distributed import get_rank, is_distributed

FORMAT = "pm_dist.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if is_distributed():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, engine, head_state: dict, rank_state: dict,
                    meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    rank = get_rank()
    tmp, final = root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never a valid checkpoint
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / "engine"), tag="ds", save_latest=False)
    torch.save(head_state, tmp / f"head_rank{rank}.pt")
    torch.save(rank_state, tmp / f"state_rank{rank}.pt")
    _barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in files}
        record = {"format": FORMAT, "version": VERSION, "step": step, **meta, "files": manifest}
        with open(tmp / "meta.json", "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt: str | os.PathLike, verify: bool = True) -> dict:
    """meta.json of a checkpoint, after checking every recorded file; raises naming the bad file."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or damaged: {meta_path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {meta_path} is damaged: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a pm_dist checkpoint (format {meta.get('format')!r})")
    if verify:
        for rel, rec in meta["files"].items():
            path = ckpt / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            if path.stat().st_size != rec["bytes"] or _sha256(path) != rec["sha256"]:
                raise CheckpointError(f"checkpoint file {path} is damaged (size or sha256 differs "
                                      "from meta.json)")
    return meta


def find_latest(root: str | os.PathLike, log=print) -> tuple[Path | None, dict | None]:
    """The newest valid checkpoint under ``root`` and its verified meta.json (damaged ones are
    reported and passed over); (None, None) when there is none."""
    root = Path(root)
    for ckpt in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            return ckpt, read_meta(ckpt)
        except CheckpointError as err:
            log(f"resume: passing over {ckpt}: {err}")
    return None, None


def load_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — any unpickling failure is a damaged file
        raise CheckpointError(f"checkpoint file {path} cannot be read: {err}") from None

"""Atomic, verifiable checkpoints that never go backwards, and the one resume decision of a run.

A checkpoint is a directory ``<run>/checkpoints/step_00000200/``:

    engine/              DeepSpeed checkpoint of the encoder (module, optimizer, lr schedule)
    head_rank{r}.pt      rank r's head shard (memory or FC weights, head optimizer and schedule)
    state_rank{r}.pt     rank r's RNG states
    meta.json            step, world size, config, its ``id`` and ``parent``, and the size + sha256
                         of every file above

**Atomic.** All ranks write into ``.tmp-step_…``; the files are hashed by all ranks (each a share);
rank 0 writes ``meta.json`` last, syncs, and renames the directory into place. Re-saving an
existing step renames the old directory aside (``.old-step_…``), renames the new one into place,
and only then deletes the old one, so a kill at any moment leaves a whole ``step_…``. Leftovers of
a crash are cleaned when the next run starts (``clean_leftovers``).

**Lines.** Every checkpoint records a random ``id`` and the ``parent`` it descends from (the
checkpoint the run resumed from, or its previous save). A re-save that replaces its own parent
(a finished run resumed, saving its last step again) takes over the replaced one's parent, so the
line stays connected. Pruning keeps the newest ``run.keep_checkpoints`` of *this run's line* only;
checkpoints of other lines are never pruned.
When a run starts from a checkpoint (or from nothing), every ``step_*`` newer than that start is
moved aside into ``checkpoints/aside-<time>/`` (never deleted) and the run says so: a rollback's
own checkpoints can then never lose to those of the run it abandoned, and ``--resume auto`` after a
requeue continues the rollback.

**One decision.** ``resolve`` is collective: rank 0 finds and verifies the checkpoint (hashing it
once, in parallel threads), then broadcasts its choice; every rank checks that the files it loads
carry the chosen ``id`` (``check_loaded``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from pm_dist.distributed import first_failure, get_rank, get_world_size, is_distributed
from pm_dist.files import fsync_dir, sha256_file

FORMAT = "pm_dist.checkpoint"
VERSION = 2
RESUME_CHOICES = ("none", "auto", "auto-or-fresh")
_HASH_THREADS = 8


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if is_distributed():
        dist.barrier()


def _broadcast(obj):
    """rank 0's ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_together(message: str | None, what: str) -> None:
    """Collective: when any rank failed, every rank raises (nobody waits in the next collective)."""
    failed = first_failure(message)
    if failed is not None:
        rank, text = failed
        raise CheckpointError(f"{what} failed on rank {rank}: {text}")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _hash_many(paths: list[Path]) -> list[str]:
    """sha256 of each file, in parallel threads (hashlib releases the GIL on large reads)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------- saving
def save_checkpoint(root: str | os.PathLike, step: int, engine, head_state: dict, rank_state: dict,
                    meta: dict, keep: int, parent: str | None = None) -> tuple[Path, str]:
    """Collective: every rank calls it. Returns the final directory and the new checkpoint's id.

    ``parent``: the id this checkpoint descends from (the run's previous save or the checkpoint it
    resumed from; None for a run's first save after a fresh start)."""
    root = Path(root)
    rank, world = get_rank(), get_world_size()
    tmp, final = root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)
    ckpt_id, error = None, None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never a valid checkpoint
            tmp.mkdir(parents=True)
            ckpt_id = uuid.uuid4().hex
        except OSError as err:
            error = f"cannot create {tmp}: {err}"
    ckpt_id = _broadcast(ckpt_id)
    _raise_together(error, f"checkpoint {final}")
    try:
        engine.save_checkpoint(str(tmp / "engine"), tag="ds", save_latest=False)
        torch.save({**head_state, "checkpoint_id": ckpt_id}, tmp / f"head_rank{rank}.pt")
        torch.save({**rank_state, "checkpoint_id": ckpt_id}, tmp / f"state_rank{rank}.pt")
        error = None
    except Exception as err:  # noqa: BLE001 — every rank must hear of it, whatever it is
        error = f"{type(err).__name__}: {err}"
    _raise_together(error, f"writing checkpoint {final}")
    # Every file is whole now; each rank hashes a share of them (rank 0 lists them for all).
    error, files = None, None
    if rank == 0:
        try:
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        except OSError as err:
            error = f"cannot list {tmp}: {err}"
    error, files = _broadcast((error, files))
    if error is not None:
        raise CheckpointError(f"checkpoint {final}: {error}")
    manifest = {}
    try:
        mine = files[rank::world]
        paths = [tmp / rel for rel in mine]
        for f in paths:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        manifest = {rel: {"bytes": p.stat().st_size, "sha256": h}
                    for rel, p, h in zip(mine, paths, _hash_many(paths))}
    except Exception as err:  # noqa: BLE001
        error = f"{type(err).__name__}: {err}"
    _raise_together(error, f"hashing checkpoint {final}")
    parts = _all_gather(manifest)
    error = None
    if rank == 0:
        try:
            parent = _inherited_parent(final, parent)
            files = {k: v for part in parts for k, v in sorted(part.items())}
            record = {"format": FORMAT, "version": VERSION, "step": step, "id": ckpt_id,
                      "parent": parent, **meta, "files": dict(sorted(files.items()))}
            with open(tmp / "meta.json", "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                fsync_dir(d)
            _replace_dir(tmp, final)
            _prune(root, ckpt_id, keep)
        except Exception as err:  # noqa: BLE001
            error = f"{type(err).__name__}: {err}"
    _raise_together(error, f"publishing checkpoint {final}")
    return final, ckpt_id


def _inherited_parent(final: Path, parent: str | None) -> str | None:
    """The parent of a checkpoint about to be saved at ``final``: ``parent``, unless ``final``
    already holds that very checkpoint (a run re-saving the step it resumed from or last saved),
    whose directory the save replaces: then its own parent, so the line stays connected."""
    if final.is_dir():
        replaced = _read_json(final / "meta.json")
        if replaced and replaced.get("id") is not None and replaced.get("id") == parent:
            return replaced.get("parent")
    return parent


def _replace_dir(new: Path, final: Path) -> None:
    """Put ``new`` at ``final``; an existing ``final`` is renamed aside first and deleted last, so
    there is a whole checkpoint at ``final`` or at ``.old-…`` at every moment."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _line(root: Path, ckpt_id: str) -> list[Path]:
    """The checkpoints of ``ckpt_id``'s line under ``root`` (it and its ancestors that are there)."""
    by_id = {}
    for d in _step_dirs(root):
        meta = _read_json(d / "meta.json")
        if meta and meta.get("id"):
            by_id[meta["id"]] = (d, meta.get("parent"))
    line, seen = [], set()
    while ckpt_id in by_id and ckpt_id not in seen:
        seen.add(ckpt_id)
        d, ckpt_id = by_id[ckpt_id]
        line.append(d)
    return sorted(line)


def _prune(root: Path, ckpt_id: str, keep: int) -> None:
    """Delete the older checkpoints of this line beyond the newest ``keep``; nothing else."""
    for old in _line(root, ckpt_id)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- reading
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
    except OSError as err:
        raise CheckpointError(f"checkpoint file {meta_path} cannot be read: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a pm_dist checkpoint (format {meta.get('format')!r})")
    if verify:
        records = list(meta["files"].items())
        paths = [ckpt / rel for rel, _ in records]
        for path, (_, rec) in zip(paths, records):
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            if path.stat().st_size != rec["bytes"]:
                raise CheckpointError(f"checkpoint file {path} is damaged (size differs from "
                                      "meta.json)")
        for path, (_, rec), digest in zip(paths, records, _hash_many(paths)):
            if digest != rec["sha256"]:
                raise CheckpointError(f"checkpoint file {path} is damaged (size or sha256 differs "
                                      "from meta.json)")
    return meta


def find_latest(root: str | os.PathLike, log=print) -> tuple[Path | None, dict | None]:
    """The newest valid checkpoint under ``root`` and its verified meta.json (damaged ones are
    reported and passed over); (None, None) when there is none."""
    root = Path(root)
    for ckpt in reversed(_step_dirs(root)):
        try:
            return ckpt, read_meta(ckpt)
        except CheckpointError as err:
            log(f"resume: passing over {ckpt}: {err}")
    return None, None


def clean_leftovers(root: str | os.PathLike, log=print) -> None:
    """Undo what a crash mid-save left (rank 0, before anything else touches ``root``): a
    ``.old-step_X`` whose ``step_X`` is missing is the last good copy and goes back; other
    ``.old-*`` and every ``.tmp-step_*`` are removed."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in sorted(root.glob(".old-step_*")):
        final = root / old.name[len(".old-"):]
        if not final.exists():
            os.replace(old, final)
            log(f"resume: restored {final} (a re-save of it was interrupted)")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in sorted(root.glob(".tmp-step_*")):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"resume: removed {tmp}, left by an interrupted save")


def set_aside_newer(root: Path, step: int, log=print) -> Path | None:
    """Move every ``step_*`` newer than ``step`` into ``root/aside-<time>/`` (never deleted)."""
    newer = [d for d in _step_dirs(root) if _step_of(d) is not None and _step_of(d) > step]
    if not newer:
        return None
    aside = root / time.strftime("aside-%Y%m%d-%H%M%S", time.gmtime())
    n = 0
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    aside.mkdir(parents=True)
    for d in newer:
        os.replace(d, aside / d.name)
    fsync_dir(root)
    log(f"resume: moved {len(newer)} checkpoint(s) newer than step {step} "
        f"({', '.join(d.name for d in newer)}) aside into {aside}; this run's line continues from "
        f"step {step}")
    return aside


def _step_of(d: Path) -> int | None:
    try:
        return int(d.name[len("step_"):])
    except ValueError:
        return None


def _resolve_here(root: Path, resume: str | None, log) -> tuple[Path | None, dict | None]:
    """Rank 0's decision (see ``resolve``)."""
    resume = resume or "none"
    clean_leftovers(root, log)
    if resume == "none":
        ckpt, meta = None, None
    elif resume in ("auto", "auto-or-fresh"):
        ckpt, meta = find_latest(root, log=log)
        if ckpt is None and _step_dirs(root):
            names = ", ".join(d.name for d in _step_dirs(root))
            if resume == "auto":
                raise CheckpointError(
                    f"--resume auto: {root} has checkpoints ({names}) but none verifies; refusing "
                    "to start over from step 0 (use --resume auto-or-fresh to allow it, or "
                    "--resume DIR for a checkpoint elsewhere)")
            log(f"resume: no checkpoint of {root} verifies ({names}); starting from step 0 "
                "(--resume auto-or-fresh)")
    else:
        ckpt = Path(resume)
        meta = read_meta(ckpt)
    if root.is_dir():
        set_aside_newer(root, meta["step"] if meta else -1, log)
    return ckpt, meta


def resolve(root: str | os.PathLike, resume: str | None, log=print) -> tuple[Path | None, dict | None]:
    """Collective: the checkpoint a run starts from and its verified meta.json, the same on every
    rank ((None, None): from step 0).

    ``resume``: ``none`` (from step 0), ``auto`` (the newest valid checkpoint of ``root``; from
    step 0 when there is none; an error when there are ``step_*`` directories but none verifies),
    ``auto-or-fresh`` (as ``auto``, but from step 0 in that last case), or a checkpoint directory
    (an error when it does not verify). Rank 0 decides, hashing the files once; newer checkpoints
    of ``root`` are moved aside (``set_aside_newer``)."""
    root = Path(root)
    choice, error = None, None
    if get_rank() == 0:
        try:
            ckpt, meta = _resolve_here(root, resume, log)
            choice = None if ckpt is None else (str(ckpt), meta)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001
            error = f"{type(err).__name__}: {err}"
    error, choice = _broadcast((error, choice))
    if error is not None:
        raise CheckpointError(error)
    if choice is None:
        return None, None
    ckpt, meta = Path(choice[0]), choice[1]
    error = None
    if get_rank() != 0:  # this rank sees the same checkpoint: its meta.json names the same id
        try:
            mine = read_meta(ckpt, verify=False)
            if mine.get("id") != meta.get("id") or mine.get("step") != meta.get("step"):
                error = (f"it reads another checkpoint at {ckpt} (id {mine.get('id')}, step "
                         f"{mine.get('step')}) than rank 0 chose (id {meta.get('id')}, step "
                         f"{meta.get('step')})")
        except CheckpointError as err:
            error = str(err)
    _raise_together(error, "resume")
    return ckpt, meta


def check_loaded(state: dict, meta: dict, path: Path) -> None:
    """A loaded per-rank file belongs to the chosen checkpoint (files without an id predate ids)."""
    want, got = meta.get("id"), state.get("checkpoint_id") if isinstance(state, dict) else None
    if want is not None and got != want:
        raise CheckpointError(f"checkpoint file {path} belongs to checkpoint {got}, not to the "
                              f"chosen {want} (the directory changed while it was read?)")


def load_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — any unpickling failure is a damaged file
        raise CheckpointError(f"checkpoint file {path} cannot be read: {err}") from None

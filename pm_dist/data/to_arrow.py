"""Converting a source into an Arrow dataset: planned once, written shard by shard in parallel,
resumable, then finalised.

Steps, and what makes each restartable:

1. **Plan** (``raw_sources.py``): every image as (label, reference), sorted by label, saved to
   ``OUT/.convert/plan.npz`` with the settings in ``OUT/.convert/settings.json``. A rerun with the
   same settings reuses the saved plan; different settings are refused unless ``overwrite``.
2. **Shards**: shard i holds plan rows [i·shard_rows, (i+1)·shard_rows) minus the samples dropped by
   the ``skip`` policy. Each is written to a temporary file and renamed, then a marker
   ``.convert/shard-i.json`` records its rows, size and SHA-256. A rerun skips every shard whose
   marker matches its file, so an interrupted conversion (Ctrl-C, a killed job, ``max_shards``)
   continues where it stopped, and the result is byte-identical to an uninterrupted run.
3. **Finalise**, once all shards exist: identity counts and ranges from the shards' labels,
   ``identities.arrow``, then ``manifest.json`` last (its presence means "complete"); the
   ``.convert`` directory is removed.

Bad input under ``policy="error"`` stops the conversion with an error naming the file and
record/path; under ``"skip"`` it is left out and listed in the manifest (``skipped``,
``num_skipped``). With ``decode_check`` every image is fully decoded once (catches corrupt files
before training); without it only the image header is parsed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from pm_dist.files import atomic_path, sha256_file

from .arrow_format import (IDENTITIES, MANIFEST, Manifest, ShardReader, shard_name,
                           write_identities, write_json, write_shard)
from .datasets import ArrowDataset
from .errors import BadSampleError, DataError
from .raw_sources import Plan
from .transforms import DECODE_ERRORS, decode, image_size

log = logging.getLogger("pm_dist.data")
STATE_DIR = ".convert"
MAX_LISTED_SKIPS = 1000


@dataclass
class ConversionReport:
    out: str
    complete: bool  # False when stopped early by max_shards
    num_identities: int
    num_images: int  # planned images (complete: rows written)
    num_skipped: int
    shards_total: int
    shards_written: int  # by this call (the others were already done)
    empty_identities: int  # identities left without images (-1 until the conversion is complete)


def _settings(source, shard_rows: int, policy: str, decode_check: bool) -> dict:
    return {"source": source.describe(), "shard_rows": shard_rows, "policy": policy,
            "decode_check": decode_check}


def _skip_record(err: BadSampleError) -> dict:
    return {"source": err.source or err.where, "reason": err.reason}


def convert_shard(source, labels: np.ndarray, refs: np.ndarray, path: str, policy: str,
                  decode_check: bool) -> dict:
    """Read, check and write one shard; returns its marker (rows, bytes, sha256, skipped, sizes)."""
    images, kept_labels, sids, skipped, sizes = [], [], [], [], {}
    for label, ref in zip(labels.tolist(), refs.tolist()):
        sid = None
        try:
            data, sid = source.fetch(label, ref)
            h, w = decode(data).shape[:2] if decode_check else image_size(data)
        except (DataError, *DECODE_ERRORS) as e:
            what = "cannot be read" if isinstance(e, DataError) else "image does not decode"
            err = BadSampleError(source.where(ref), None, sid or source.source_id(ref), f"{what}: {e}")
            if policy == "error":
                raise err from None
            skipped.append(_skip_record(err))
            continue
        sizes[f"{h}x{w}"] = sizes.get(f"{h}x{w}", 0) + 1
        images.append(data)
        kept_labels.append(label)
        sids.append(sid)
    write_shard(path, images, kept_labels, sids)
    return {"rows": len(images), "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "skipped": skipped, "sizes": sizes}


def _marker_path(out: str, i: int) -> str:
    return os.path.join(out, STATE_DIR, f"shard-{i:05d}.json")


def _done_marker(out: str, i: int) -> dict | None:
    try:
        with open(_marker_path(out, i)) as f:
            marker = json.load(f)
        if os.path.getsize(os.path.join(out, shard_name(i))) == marker["bytes"]:
            return marker
    except (OSError, ValueError, KeyError):
        pass
    return None


def _load_or_plan(source, out: str, settings: dict, policy: str) -> Plan:
    state = os.path.join(out, STATE_DIR)
    settings_path, plan_path = os.path.join(state, "settings.json"), os.path.join(state, "plan.npz")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(settings)):
            raise DataError(f"{out} holds an unfinished conversion with other settings "
                            f"({previous}); use overwrite (--overwrite) or another output directory")
        if os.path.exists(plan_path):
            with np.load(plan_path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                skipped = [BadSampleError(s["where"], None, s["source"], s["reason"]) for s in meta["skipped"]]
                return Plan(z["labels"], z["refs"], meta["num_identities"], meta["names"], skipped)
    os.makedirs(state, exist_ok=True)
    plan = source.plan(policy)
    meta = {"num_identities": plan.num_identities, "names": plan.names,
            "skipped": [{"where": e.where, "source": e.source, "reason": e.reason} for e in plan.skipped]}
    with atomic_path(plan_path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
        np.savez(tmp, labels=plan.labels, refs=plan.refs, meta=np.array(json.dumps(meta)))
    write_json(settings_path, settings)
    return plan


def _clear(out: str) -> None:
    for name in os.listdir(out):
        if name == STATE_DIR or name in (MANIFEST, IDENTITIES) or (name.startswith("shard-") and ".arrow" in name):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def convert_dataset(
    source, out: str, *, workers: int = 1, shard_rows: int = 10_000, policy: str = "error",
    decode_check: bool = True, max_shards: int | None = None, overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Convert ``source`` (a ``raw_sources.py`` source) into the Arrow dataset directory ``out``."""
    if policy not in ("error", "skip"):
        raise ValueError(f'policy must be "error" or "skip", got {policy!r}')
    if shard_rows < 1 or workers < 1:
        raise ValueError("shard_rows and workers must be >= 1")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    settings = _settings(source, shard_rows, policy, decode_check)
    if os.path.exists(os.path.join(out, MANIFEST)):
        manifest = Manifest.load(out)
        if manifest.source == json.loads(json.dumps(settings)) and not overwrite:
            counts = ArrowDataset(out, bad_sample="skip").count_array()
            return ConversionReport(out, True, manifest.num_identities, manifest.num_images,
                                    manifest.num_skipped, len(manifest.shards), 0, int((counts == 0).sum()))
        if not overwrite:
            raise DataError(f"{out} already holds a dataset converted with other settings; "
                            f"use overwrite (--overwrite) or another output directory")
    if overwrite:
        _clear(out)
    plan = _load_or_plan(source, out, settings, policy)
    n_shards = max(1, math.ceil(len(plan.labels) / shard_rows))
    markers = {i: m for i in range(n_shards) if (m := _done_marker(out, i)) is not None}
    todo = [i for i in range(n_shards) if i not in markers]
    if max_shards is not None:
        todo = todo[:max_shards]

    def job(i):
        a, b = i * shard_rows, min((i + 1) * shard_rows, len(plan.labels))
        refs = plan.refs[a:b]
        part = source.subset(refs) if hasattr(source, "subset") else source  # ship only what it reads
        return (part, plan.labels[a:b], refs, os.path.join(out, shard_name(i)), policy, decode_check)

    def finished(i, marker):
        write_json(_marker_path(out, i), marker)
        markers[i] = marker

    _run_jobs(todo, job, finished, workers, progress, total_rows=len(plan.labels),
              done_rows=sum(min(shard_rows, len(plan.labels) - i * shard_rows) for i in markers))
    complete = len(markers) == n_shards
    empty = -1
    if complete:
        empty = _finalise(out, plan, markers, n_shards, settings)
    skipped = len(plan.skipped) + sum(len(m["skipped"]) for m in markers.values())
    images = sum(m["rows"] for m in markers.values()) if complete else len(plan.labels)
    return ConversionReport(out, complete, plan.num_identities, images, skipped, n_shards, len(todo), empty)


def _run_jobs(todo, job, finished, workers, progress, total_rows, done_rows):
    bar = None
    if progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        bar = Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                       TimeElapsedColumn(), TimeRemainingColumn())
        task = bar.add_task("convert", total=total_rows, completed=done_rows)
        bar.start()
    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                args = job(i)
                finished(i, convert_shard(*args))
                if bar:
                    bar.advance(task, len(args[1]))
            return
        # spawn: the parent may hold threads (the progress bar), which fork does not mix with
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            pending = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < 2 * workers:  # bounded: plans can be large
                    i = queue.pop(0)
                    args = job(i)
                    pending[pool.submit(convert_shard, *args)] = (i, len(args[1]))
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, rows = pending.pop(fut)
                    finished(i, fut.result())  # re-raises a worker's BadSampleError here
                    if bar:
                        bar.advance(task, rows)
    finally:
        if bar:
            bar.stop()


def _finalise(out: str, plan: Plan, markers: dict, n_shards: int, settings: dict) -> int:
    shards, first, labels = [], 0, []
    for i in range(n_shards):
        m = markers[i]
        reader = ShardReader(os.path.join(out, shard_name(i)))
        labels.append(reader.labels())
        reader.close()
        shards.append({"file": shard_name(i), "rows": m["rows"], "first_row": first, "bytes": m["bytes"],
                       "sha256": m["sha256"]})
        first += m["rows"]
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if labels.size and (np.diff(labels) < 0).any():
        raise DataError(f"{out}: shard labels are not sorted; the conversion state is inconsistent "
                        f"(rerun with overwrite)")
    counts = np.bincount(labels, minlength=plan.num_identities).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    write_identities(os.path.join(out, IDENTITIES), counts, starts, plan.names)
    sizes = {}
    for m in markers.values():
        for k, v in m["sizes"].items():
            sizes[k] = sizes.get(k, 0) + v
    image_size = [int(v) for v in next(iter(sizes)).split("x")] if len(sizes) == 1 else None
    skipped = [_skip_record(e) for e in plan.skipped]
    for i in range(n_shards):
        skipped.extend(markers[i]["skipped"])
    manifest = Manifest(num_identities=plan.num_identities, num_images=int(labels.size),
                        image_size=image_size, shards=shards, source=settings,
                        skipped=skipped[:MAX_LISTED_SKIPS], num_skipped=len(skipped))
    write_json(os.path.join(out, MANIFEST), manifest.to_json())
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    empty = int((counts == 0).sum())
    if empty:
        log.warning("%s: %d identities have no images after conversion", out, empty)
    single = int((counts == 1).sum())
    if single:
        log.warning("%s: %d identities have a single image: training never draws them as batch "
                    "identities (a prototype needs two images)", out, single)
    return empty

"""Files that are either whole or absent: the one atomic write and the one file hash of pm_dist.

Every file that a crash must not leave half-written (checkpoints' meta, encoder files, reports,
shards, manifests, the converter's resume state) is written to a temporary name beside its final
path, flushed to disk, and renamed into place: a reader sees the old file or the new one, never a
mix. ``os.replace`` is atomic within one file system, which a sibling temporary guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it is synced and renamed to
    ``path``, on error removed. ``suffix`` ends the temporary name (``np.savez`` wants ``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **{"indent": 1, **dump_kwargs}) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (files created or renamed in it) durable; a no-op where a
    directory cannot be opened for syncing (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

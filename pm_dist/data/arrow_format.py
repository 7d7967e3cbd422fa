"""The on-disk Arrow dataset format: layout, schema, manifest, and writing/opening one shard.

A dataset is a directory::

    manifest.json        format, version, counts, image size, shard list with sizes and SHA-256
    identities.arrow     one row per identity: count, start (first row), name (may be null)
    shard-00000.arrow    rows of images, Arrow IPC *file* format (random access, memory-mappable)
    shard-00001.arrow    ...

Shard rows have ``image`` (binary: the encoded bytes exactly as in the source, JPEG/PNG),
``label`` (int64), ``source`` (string: where the image came from, e.g. ``train.rec#1234`` or
``id017/0003.jpg``) and ``crc32`` (uint32 of the image bytes, so that a flipped bit is caught at the
row that holds it). Rows are sorted by label across the whole dataset: identity c owns the global
rows [start[c], start[c] + count[c]), so "image k of identity c" is one addition and the K images of
a P×K batch sit next to each other on disk.

Shards are read through ``pyarrow.memory_map``: opening one reads only its footer, a row touches only
the pages of its own bytes, and the page cache is shared by every DataLoader worker and every rank on
a machine. Files are written to a temporary name and renamed (``pm_dist.files``), so a shard is either
complete or absent.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pm_dist.files import atomic_path, atomic_write_json

from .errors import DataError

FORMAT = "pm_dist.arrow"
VERSION = 1
MANIFEST = "manifest.json"
IDENTITIES = "identities.arrow"
SHARD_SCHEMA = pa.schema(
    [("image", pa.binary()), ("label", pa.int64()), ("source", pa.string()), ("crc32", pa.uint32())],
    metadata={b"pm_dist.format": FORMAT.encode(), b"pm_dist.version": str(VERSION).encode()},
)
IDENTITY_SCHEMA = pa.schema([("count", pa.int64()), ("start", pa.int64()), ("name", pa.string())])
BATCH_ROWS = 1024  # rows per record batch inside a shard (keeps 32-bit binary offsets far from 2 GB)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write_shard(path: str, images: list, labels, sources: list[str]) -> None:
    """Write one shard (atomically: a temporary file beside it, then renamed)."""
    n = len(images)
    if not (len(labels) == len(sources) == n):
        raise ValueError("images, labels and sources must have the same length")
    labels = np.asarray(labels, dtype=np.int64)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        for a in range(0, max(n, 1), BATCH_ROWS):
            b = min(a + BATCH_ROWS, n)
            chunk = [bytes(x) for x in images[a:b]]
            writer.write_batch(pa.record_batch([
                pa.array(chunk, pa.binary()),
                pa.array(labels[a:b], pa.int64()),
                pa.array(sources[a:b], pa.string()),
                pa.array([crc32(x) for x in chunk], pa.uint32()),
            ], schema=SHARD_SCHEMA))


def write_identities(path: str, counts, starts, names) -> None:
    table = pa.table([pa.array(np.asarray(counts, np.int64)), pa.array(np.asarray(starts, np.int64)),
                      pa.array(names, pa.string())], schema=IDENTITY_SCHEMA)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, IDENTITY_SCHEMA) as writer:
        writer.write_table(table)


def write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, sort_keys=True)


@dataclass
class Manifest:
    num_identities: int
    num_images: int
    image_size: list | None  # [height, width] when every image has it, else None
    shards: list  # dicts: file, rows, first_row, bytes, sha256
    source: dict  # what was converted (kind, path, settings)
    skipped: list  # [{"source", "reason"}] samples left out by the converter (first 1000)
    num_skipped: int

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.__dict__}

    @classmethod
    def load(cls, directory: str) -> "Manifest":
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: no manifest; not a (finished) pm_dist Arrow dataset") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable manifest: {e}") from None
        if obj.get("format") != FORMAT:
            raise DataError(f"{path}: format is {obj.get('format')!r}, expected {FORMAT!r}")
        if obj.get("version") != VERSION:
            raise DataError(f"{path}: format version {obj.get('version')!r}; this pm_dist reads {VERSION}")
        try:
            m = cls(**{k: obj[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise DataError(f"{path}: manifest lacks field {e}") from None
        rows = 0
        for s in m.shards:
            if s["first_row"] != rows:
                raise DataError(f"{path}: shard {s['file']} starts at row {s['first_row']}, expected {rows}")
            rows += s["rows"]
        if rows != m.num_images:
            raise DataError(f"{path}: shards hold {rows} rows but num_images is {m.num_images}")
        return m


class ShardReader:
    """Random access to one memory-mapped shard: ``row(i) -> (image bytes, label, source, crc32)``."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._mmap = pa.memory_map(path, "r")
            reader = pa.ipc.open_file(self._mmap)
            if not reader.schema.equals(SHARD_SCHEMA, check_metadata=False):
                raise DataError(f"{path}: unexpected schema {reader.schema}")
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise DataError(f"{path}: cannot open shard: {e}") from None
        sizes = [b.num_rows for b in self._batches]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self._starts[-1])

    def row(self, i: int):
        if not 0 <= i < self.num_rows:
            raise IndexError(f"{self.path}: row {i} out of range [0, {self.num_rows})")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        batch, j = self._batches[b], i - int(self._starts[b])
        image = batch.column(0)[j].as_buffer()
        return (image, batch.column(1)[j].as_py(), batch.column(2)[j].as_py(),
                batch.column(3)[j].as_py())

    def labels(self) -> np.ndarray:
        """All labels of the shard (zero-copy where possible)."""
        if not self._batches:
            return np.zeros(0, np.int64)
        return np.concatenate([b.column(1).to_numpy() for b in self._batches]).astype(np.int64)

    def close(self) -> None:
        self._batches = []
        self._mmap.close()

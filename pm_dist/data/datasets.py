"""The two training datasets behind one protocol: ``ArrowDataset`` (converted real data) and
``SyntheticDataset`` (rendered on the fly).

Both are identity indexes (``index.py``: num_classes, counts, max_count, sample_index,
count_array) and both answer ``load(i, label) -> uint8 [S, S, 3]`` and ``source_of(i)``. ``load``
raises ``BadSampleError`` naming the file, row, dataset index and source id; what to do with it
(raise or skip) is the loader's policy. Both are safe to pickle into DataLoader workers: open files
are dropped on pickling and reopened lazily in each process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from .arrow_format import IDENTITIES, IDENTITY_SCHEMA, Manifest, ShardReader, crc32
from .errors import BadSampleError, DataError
from .index import ContiguousIndex
from .synthetic import SyntheticIdentities
from .transforms import DECODE_ERRORS, decode

log = logging.getLogger("pm_dist.data")


class IdentityNames(Sequence):
    """The identities' names, left in the memory-mapped Arrow column: ``names[c]`` converts one
    name (for an error message); nothing turns them all into Python strings (at 10⁸ identities a
    list of them would cost gigabytes per process)."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, c):
        if isinstance(c, slice):
            return self._column[c].to_pylist()
        return self._column[int(c)].as_py()

    def __eq__(self, other) -> bool:
        return list(other) == self._column.to_pylist() if isinstance(other, (list, tuple,
                                                                           IdentityNames)) \
            else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"IdentityNames({len(self)} names)"


class ArrowDataset:
    """A converted dataset directory (see ``arrow_format.py``), read through memory maps.

    ``bad_sample`` decides what a damaged *dataset* does when opened: "error" raises ``DataError``
    naming the truncated shard or the empty identity; "skip" logs it and carries on (rows of a broken
    shard then fail one by one in ``load``, and empty identities are never sampled).
    ``image_size``: the side images are resized to (None keeps the stored size).
    """

    def __init__(self, path: str, bad_sample: str = "error", image_size: int | None = None):
        if bad_sample not in ("error", "skip"):
            raise ValueError(f'bad_sample must be "error" or "skip", got {bad_sample!r}')
        self.path = os.path.abspath(path)
        self.bad_sample = bad_sample
        self.image_size = image_size
        self.manifest = Manifest.load(self.path)
        m = self.manifest
        counts, starts, self.names = self._read_identities()
        if len(counts) != m.num_identities:
            raise DataError(f"{self._ident_path}: {len(counts)} identities, manifest says {m.num_identities}")
        if int(counts.sum()) != m.num_images or (len(counts) and (
                starts[0] != 0 or (starts[1:] != starts[:-1] + counts[:-1]).any())):
            raise DataError(f"{self._ident_path}: identity ranges do not tile the {m.num_images} rows")
        self.index = ContiguousIndex(counts, starts)
        self.num_classes, self.num_images = m.num_identities, m.num_images
        self.max_count = self.index.max_count
        self._shard_first = np.array([s["first_row"] for s in m.shards], dtype=np.int64)
        self.broken_shards: dict[int, str] = {}
        for i, s in enumerate(m.shards):
            problem = self._check_shard_file(s)
            if problem:
                self._damaged(problem)
                self.broken_shards[i] = problem
        self.empty_identities = np.flatnonzero(counts == 0)
        if self.empty_identities.size:
            shown = ", ".join(self._identity_name(int(c)) for c in self.empty_identities[:5])
            more = "" if self.empty_identities.size <= 5 else f" and {self.empty_identities.size - 5} more"
            self._damaged(f"{self.path}: {self.empty_identities.size} identities have no images "
                          f"({shown}{more})")
        self._readers: dict[int, ShardReader] = {}
        self._pid = os.getpid()

    @property
    def _ident_path(self) -> str:
        return os.path.join(self.path, IDENTITIES)

    def _read_identities(self):
        try:
            with pa.memory_map(self._ident_path, "r") as mm:
                table = pa.ipc.open_file(mm).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{self._ident_path}: cannot read identity table: {e}") from None
        if not table.schema.equals(IDENTITY_SCHEMA, check_metadata=False):
            raise DataError(f"{self._ident_path}: unexpected schema {table.schema}")
        # int64 by the schema: views of the memory map, no copies (pages shared by a node's ranks)
        counts = np.asarray(table.column("count").to_numpy(), dtype=np.int64)
        starts = np.asarray(table.column("start").to_numpy(), dtype=np.int64)
        return counts, starts, IdentityNames(table.column("name"))

    def _identity_name(self, c: int) -> str:
        name = self.names[c] if len(self.names) else None
        return f"identity {c}" + (f" ({name!r})" if name else "")

    def _check_shard_file(self, s: dict) -> str | None:
        path = os.path.join(self.path, s["file"])
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{path}: shard file is missing"
        if size != s["bytes"]:
            what = "truncated" if size < s["bytes"] else "longer than recorded"
            return f"{path}: shard is {what} ({size} bytes, manifest says {s['bytes']})"
        return None

    def _damaged(self, message: str) -> None:
        if self.bad_sample == "error":
            raise DataError(message + ' (use bad_sample="skip" to train on the rest)')
        log.warning("%s; skipping it (bad_sample=skip)", message)

    # -- the identity index ------------------------------------------------------------------
    def counts(self, classes) -> np.ndarray:
        return self.index.counts(classes)

    def count_array(self) -> np.ndarray:
        return self.index.count_array()

    def sample_index(self, classes, ks) -> np.ndarray:
        return self.index.sample_index(classes, ks)

    def __len__(self) -> int:
        return self.num_images

    # -- rows --------------------------------------------------------------------------------
    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"sample index {i} out of range [0, {self.num_images}) in {self.path}")
        s = int(np.searchsorted(self._shard_first, i, side="right")) - 1
        return s, i - int(self._shard_first[s])

    def _reader(self, s: int) -> ShardReader:
        if os.getpid() != self._pid:  # a forked worker must not share the parent's handles
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.get(s)
        if reader is None:
            reader = ShardReader(os.path.join(self.path, self.manifest.shards[s]["file"]))
            if reader.num_rows != self.manifest.shards[s]["rows"]:
                raise DataError(f"{reader.path}: {reader.num_rows} rows, manifest says "
                                f"{self.manifest.shards[s]['rows']}")
            self._readers[s] = reader
        return reader

    def _row(self, i: int):
        """(where, image bytes as a pyarrow Buffer, label, source, stored crc32) of row ``i``."""
        s, j = self._locate(i)
        where = f"{os.path.join(self.path, self.manifest.shards[s]['file'])} row {j}"
        if s in self.broken_shards:
            raise BadSampleError(where, i, None, self.broken_shards[s])
        try:
            return (where, *self._reader(s).row(j))
        except DataError as e:
            self.broken_shards[s] = str(e)
            raise BadSampleError(where, i, None, str(e)) from None

    def read(self, i: int):
        """Raw row ``i``: (image bytes as a pyarrow Buffer, label, source, stored crc32)."""
        return self._row(i)[1:]

    def source_of(self, i: int) -> str | None:
        try:
            return self._row(i)[3]
        except BadSampleError:
            return None

    def load(self, i: int, label: int | None = None) -> np.ndarray:
        """Decoded image of row ``i`` (uint8 [S, S, 3]), checked against its crc32 and its label."""
        where, image, row_label, source, stored_crc = self._row(i)
        if crc32(image) != stored_crc:
            raise BadSampleError(where, i, source, "image bytes do not match their crc32 (corrupted)")
        if not 0 <= row_label < self.num_classes:
            raise BadSampleError(where, i, source, f"label {row_label} outside [0, {self.num_classes})")
        expected = int(self.index.class_of([i])[0]) if label is None else int(label)
        if row_label != expected:
            raise BadSampleError(where, i, source, f"label {row_label} in the rows of identity {expected}")
        try:
            return decode(image, self.image_size)
        except DECODE_ERRORS as e:
            raise BadSampleError(where, i, source, f"image does not decode: {e}") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state


class SyntheticDataset:
    """Synthetic identities behind the dataset protocol. Sample index = c·2²⁰ + k (sparse: no table)."""

    STRIDE = 1 << 20

    def __init__(self, generator: SyntheticIdentities):
        self.generator = generator
        self.num_classes = generator.num_classes
        self.max_count = generator.max_images
        self.image_size = generator.image_size

    def counts(self, classes) -> np.ndarray:
        return self.generator.counts(classes)

    def count_array(self) -> None:
        return None  # uniform sampling needs no table; count weighting uses rejection

    def sample_index(self, classes, ks) -> np.ndarray:
        classes, ks = np.asarray(classes, np.int64), np.asarray(ks, np.int64)
        return classes * self.STRIDE + ks

    def split(self, i: int) -> tuple[int, int]:
        return divmod(int(i), self.STRIDE)

    def source_of(self, i: int) -> str:
        c, k = self.split(i)
        return f"synthetic:{c}/{k}"

    def load(self, i: int, label: int | None = None) -> np.ndarray:
        c, k = self.split(i)
        if label is not None and label != c:
            raise BadSampleError("synthetic identities", int(i), self.source_of(i),
                                 f"label {label} requested for an image of identity {c}")
        return self.generator.render(c, k)


def build_dataset(cfg) -> ArrowDataset | SyntheticDataset:
    """The dataset a ``DataConfig`` describes."""
    cfg.validate()
    if cfg.source == "arrow":
        return ArrowDataset(cfg.path, bad_sample=cfg.bad_sample, image_size=cfg.image_size)
    return SyntheticDataset(SyntheticIdentities(**cfg.synthetic_kwargs()))

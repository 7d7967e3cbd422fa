"""insightface's RecordIO training sets (``train.rec`` + ``train.idx``), read without mxnet.

The layout, as written by dmlc-core's ``RecordIOWriter`` and mxnet's ``recordio.pack``
(all integers little-endian):

``train.rec`` is a sequence of records; each record on disk is one or more *parts*::

    uint32 magic = 0xCED7230A
    uint32 lrecord = cflag << 29 | length      (cflag: 3 bits, length: 29 bits)
    length bytes of data, then zero padding to a multiple of 4 bytes

``cflag`` 0 is a whole record. A payload that contains the magic number at a 4-aligned offset is
split there by the writer (the magic itself is dropped): parts with cflag 1 (first), 2 (middle),
3 (last); the reader joins them with the magic re-inserted between consecutive parts.

``train.idx`` is text, one ``key<TAB>byte offset`` line per record (offset of its first part).

A record's payload (mxnet ``IRHeader``, struct ``<IfQQ``, 24 bytes)::

    uint32 flag, float32 label, uint64 id, uint64 id2
    if flag > 0: flag float32 values (the label array; the scalar label field is then 0)
    the rest: the encoded image (JPEG in insightface's sets)

insightface's convention: record 0 is a header whose label array is (a, b): image records are keys
1 .. a-1, and keys a .. b-1 are one record per identity whose label array is the [start, end) range
of that identity's image keys. Without such a header (flag 0) every key is an image. An image's
identity is its label (the first value of a label array). A ``property`` file beside them, when
present, reads ``num_classes,height,width``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import DataError

MAGIC = 0xCED7230A
_PART = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the remaining bytes (mxnet ``recordio.unpack``)."""
    if len(payload) < IR_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte header")
    flag, label, id_, id2 = _IR.unpack_from(payload, 0)
    rest = payload[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError(f"header announces {flag} label values but only {len(rest)} bytes follow")
        label = np.frombuffer(rest, dtype="<f4", count=flag).astype(np.float32)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


def read_idx(path: str) -> dict[int, int]:
    """``train.idx`` → {key: byte offset}."""
    out = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (IndexError, ValueError):
                raise DataError(f"{path} line {line_no}: expected 'key<TAB>offset', got {line.strip()!r}") from None
            out[key] = offset
    return out


class RecordIOReader:
    """Random access to an indexed RecordIO file by key; thread-unsafe, cheap to reopen per process."""

    def __init__(self, rec_path: str, idx_path: str | None = None, offsets: dict[int, int] | None = None):
        """``offsets`` (key → byte offset) replaces reading the .idx file: a conversion worker gets
        only its own records' offsets instead of re-reading an index of millions of lines."""
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        if not os.path.exists(rec_path):
            raise DataError(f"{rec_path}: no such RecordIO file")
        if offsets is None and not os.path.exists(self.idx_path):
            raise DataError(f"{self.idx_path}: no index file beside {rec_path}")
        self.offsets = read_idx(self.idx_path) if offsets is None else dict(offsets)
        self.size = os.path.getsize(rec_path)
        self._fd = None
        self._pid = None

    @property
    def keys(self) -> list[int]:
        return sorted(self.offsets)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return self._fd

    def _pread(self, n: int, offset: int, key: int) -> bytes:
        data = os.pread(self._file(), n, offset)
        if len(data) != n:
            raise DataError(f"{self.rec_path} record {key}: file ends at byte {self.size}, "
                            f"record needs bytes up to {offset + n} (truncated)")
        return data

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (parts joined)."""
        try:
            pos = self.offsets[key]
        except KeyError:
            raise DataError(f"{self.idx_path}: no record with key {key}") from None
        chunks = []
        while True:
            magic, lrec = _PART.unpack(self._pread(8, pos, key))
            if magic != MAGIC:
                raise DataError(f"{self.rec_path} record {key}: bad magic 0x{magic:08X} at byte {pos}")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            chunks.append(self._pread(length, pos + 8, key))
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                if cflag == 3 and len(chunks) == 1:
                    raise DataError(f"{self.rec_path} record {key}: continuation part without a start")
                break
            if cflag not in (1, 2) or (cflag == 1 and len(chunks) > 1):
                raise DataError(f"{self.rec_path} record {key}: unexpected part flag {cflag} at byte {pos}")
        return struct.pack("<I", MAGIC).join(chunks)

    def header(self, key: int) -> IRHeader:
        """Only the IRHeader of a record: reads a few dozen bytes, not the image (planning a
        conversion of millions of records must not read the whole file)."""
        try:
            pos = self.offsets[key]
        except KeyError:
            raise DataError(f"{self.idx_path}: no record with key {key}") from None
        head = os.pread(self._file(), 8 + IR_SIZE + 16, pos)
        if len(head) >= 8 + IR_SIZE:
            magic, lrec = _PART.unpack_from(head, 0)
            length = lrec & ((1 << 29) - 1)
            if magic == MAGIC and length >= IR_SIZE:
                flag = _IR.unpack_from(head, 8)[0]
                need = IR_SIZE + 4 * flag
                if length >= need and len(head) >= 8 + need:
                    return unpack(head[8 : 8 + need])[0]
        return unpack(self.read(key))[0]  # long label arrays, split headers, and all error reporting

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, None
        return state


def label_of(header: IRHeader) -> float:
    """The identity label of an image record (first value of a label array)."""
    if isinstance(header.label, np.ndarray):
        if header.label.size == 0:
            raise ValueError("empty label array")
        return float(header.label[0])
    return float(header.label)


def read_property(directory: str) -> tuple[int, int, int] | None:
    """insightface's ``property`` file: (num_classes, height, width), or None if absent."""
    path = os.path.join(directory, "property")
    if not os.path.exists(path):
        return None
    try:
        values = [int(v) for v in open(path).read().strip().split(",")]
        return values[0], values[1], values[2]
    except (ValueError, IndexError):
        raise DataError(f"{path}: expected 'num_classes,height,width'") from None


@dataclass(frozen=True)
class InsightFaceLayout:
    """What record 0 says: which keys are images and how many identity records follow them."""

    image_keys: list[int]
    identity_keys: list[int]


def insightface_layout(reader: RecordIOReader) -> InsightFaceLayout:
    keys = reader.keys
    if 0 in reader.offsets:
        h = reader.header(0)
        if h.flag > 0:
            label = np.atleast_1d(h.label)
            if label.size < 2:
                raise DataError(f"{reader.rec_path} record 0: header label array needs 2 values, got {label.size}")
            a, b = int(label[0]), int(label[1])
            if not 1 <= a <= b:
                raise DataError(f"{reader.rec_path} record 0: bad index range ({a}, {b})")
            return InsightFaceLayout([k for k in range(1, a) if k in reader.offsets],
                                     [k for k in range(a, b) if k in reader.offsets])
    return InsightFaceLayout(keys, [])

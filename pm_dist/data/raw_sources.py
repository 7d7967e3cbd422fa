"""What a conversion reads from: insightface RecordIO, an image folder, or the synthetic generator.

A source is planned once in the converting process: ``plan()`` lists every image as
(label, reference), and the converter sorts that list by label and cuts it into shards. Workers then
call ``fetch(label, ref) -> (encoded bytes, source id)`` for their shard's references. References
are a numpy array (record keys, image numbers, relative paths) so that a plan of millions of images
is compact and can be saved for a resumed run. Sources are small picklable descriptions; file
handles are opened lazily in each worker.

Bad input found while planning (a label that is not an integer, outside the identity range, an
empty identity folder) is handled by the policy right away; what only shows when reading (a
truncated record, an undecodable image) is handled per shard.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import BadSampleError, DataError
from .recordio import RecordIOReader, insightface_layout, label_of, read_property, unpack
from .synthetic import SyntheticIdentities

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Plan:
    """Every image to convert: parallel arrays sorted by label, plus identity names and the
    problems found while planning."""

    labels: np.ndarray  # int64 [M]
    refs: np.ndarray  # [M] what ``fetch`` needs: record keys, relative paths, image numbers k
    num_identities: int
    names: list  # identity names (None where unknown), length num_identities
    skipped: list = field(default_factory=list)  # BadSampleError found while planning


def _sorted_plan(labels, refs, num_identities, names, skipped) -> Plan:
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # stable: source order within an identity
    return Plan(labels[order], np.asarray(refs)[order], num_identities, names, skipped)


class RecSource:
    """insightface ``train.rec``/``train.idx`` (see ``recordio.py`` for the layout)."""

    kind = "rec"

    def __init__(self, rec_path: str, idx_path: str | None = None, num_identities: int | None = None):
        self.rec_path = os.path.abspath(rec_path)
        self.idx_path = os.path.abspath(idx_path) if idx_path else None
        self.num_identities = num_identities
        self._reader = None
        self._offsets = None  # set by subset(): only these records, no .idx to read

    def subset(self, keys) -> "RecSource":
        """A copy that knows only the byte offsets of ``keys`` (what one shard's worker needs)."""
        part = RecSource(self.rec_path, self.idx_path, self.num_identities)
        part._offsets = {int(k): self.reader.offsets[int(k)] for k in keys}
        return part

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None  # never ship a full index to a worker
        return state

    def describe(self) -> dict:
        st = os.stat(self.rec_path)
        return {"kind": self.kind, "path": self.rec_path, "idx": self.reader.idx_path,
                "bytes": st.st_size, "num_identities": self.num_identities}

    @property
    def reader(self) -> RecordIOReader:
        if self._reader is None:
            self._reader = RecordIOReader(self.rec_path, self.idx_path, offsets=self._offsets)
        return self._reader

    def source_id(self, key) -> str:
        return f"{os.path.basename(self.rec_path)}#{int(key)}"

    def where(self, key) -> str:
        return f"{self.rec_path} record {int(key)}"

    def plan(self, policy: str) -> Plan:
        reader = self.reader
        layout = insightface_layout(reader)
        num = self.num_identities
        if num is None:
            prop = read_property(os.path.dirname(self.rec_path))
            if prop is not None:
                num = prop[0]
            elif layout.identity_keys:
                num = len(layout.identity_keys)
        labels, refs, skipped = [], [], []
        for key in layout.image_keys:
            where = f"{self.rec_path} record {key} (byte {reader.offsets[key]})"
            try:
                value = label_of(reader.header(key))
            except (ValueError, DataError) as e:
                skipped.append(_bad(policy, BadSampleError(where, key, self.source_id(key), str(e))))
                continue
            if not (np.isfinite(value) and value == int(value) and value >= 0
                    and (num is None or value < num)):
                limit = f" [0, {num})" if num is not None else " (a non-negative integer)"
                skipped.append(_bad(policy, BadSampleError(
                    where, key, self.source_id(key), f"label {value} is not an identity in{limit}")))
                continue
            labels.append(int(value))
            refs.append(key)
        refs = np.asarray(refs, dtype=np.int64)
        if num is None:
            num = (max(labels) + 1) if labels else 0
        if num == 0:
            raise DataError(f"{self.rec_path}: no images to convert")
        return _sorted_plan(labels, refs, num, [None] * num, skipped)

    def fetch(self, label: int, key) -> tuple[bytes, str]:
        key = int(key)
        try:
            _, image = unpack(self.reader.read(key))
        except ValueError as e:
            raise DataError(f"{self.rec_path} record {key}: {e}") from None
        return image, self.source_id(key)


class FolderSource:
    """One sub-folder per identity (its name is the identity's name), images inside; labels are
    the folder's position in sorted order (empty folders do not take a label under "skip")."""

    kind = "folder"

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: not a directory")

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.root}

    def plan(self, policy: str) -> Plan:
        names, labels, refs, skipped = [], [], [], []
        for name in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, name)
            if not os.path.isdir(folder):
                continue
            files = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
            if not files:
                skipped.append(_bad(policy, BadSampleError(folder, None, name, "identity folder has no images")))
                continue
            label = len(names)
            names.append(name)
            labels.extend([label] * len(files))
            refs.extend(f"{name}/{f}" for f in files)
        if not names:
            raise DataError(f"{self.root}: no identity folders with images")
        # UTF-8 bytes, not numpy's UTF-32 strings: a plan of millions of paths stays 4× smaller
        return _sorted_plan(labels, np.array([r.encode() for r in refs], dtype=bytes), len(names), names,
                            skipped)

    @staticmethod
    def _text(rel) -> str:
        return rel.decode() if isinstance(rel, bytes) else str(rel)

    def source_id(self, rel) -> str:
        return self._text(rel)

    def where(self, rel) -> str:
        return os.path.join(self.root, self._text(rel))

    def fetch(self, label: int, rel) -> tuple[bytes, str]:
        rel = self._text(rel)
        try:
            with open(os.path.join(self.root, rel), "rb") as f:
                return f.read(), rel
        except OSError as e:
            raise DataError(f"{os.path.join(self.root, rel)}: cannot read: {e}") from None


class SyntheticSource:
    """The synthetic generator's training images, encoded (PNG: lossless, so the Arrow copy decodes
    to exactly the rendered pixels; JPEG: like real datasets)."""

    kind = "synthetic"

    def __init__(self, generator: SyntheticIdentities, encoding: str = "png", quality: int = 95):
        if encoding not in ("png", "jpeg"):
            raise ValueError(f'encoding must be "png" or "jpeg", got {encoding!r}')
        self.generator, self.encoding, self.quality = generator, encoding, quality

    def describe(self) -> dict:
        return {"kind": self.kind, "generator": self.generator.params(), "encoding": self.encoding,
                "quality": self.quality}

    def plan(self, policy: str) -> Plan:
        n = self.generator.num_identities
        counts = self.generator.counts(np.arange(n))
        labels = np.repeat(np.arange(n, dtype=np.int64), counts)
        ks = np.arange(labels.size) - np.repeat(np.cumsum(counts) - counts, counts)
        return Plan(labels, ks.astype(np.int64), n, [None] * n, [])

    def source_id(self, k) -> str:
        return f"synthetic image {int(k)}"

    def where(self, k) -> str:
        return f"synthetic identities (seed {self.generator.seed}) image {int(k)}"

    def fetch(self, label: int, k) -> tuple[bytes, str]:
        c, k = int(label), int(k)
        buf = io.BytesIO()
        img = Image.fromarray(self.generator.render(c, k))
        if self.encoding == "png":
            img.save(buf, format="PNG", compress_level=1)
        else:
            img.save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue(), f"synthetic:{c}/{k}"


def _bad(policy: str, err: BadSampleError) -> BadSampleError:
    """Apply the policy to a problem found while planning: raise it, or return it to be recorded."""
    if policy == "error":
        raise err
    return err

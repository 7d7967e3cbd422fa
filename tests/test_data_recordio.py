"""insightface RecordIO: files written here byte by byte (independently of the reader), read back
and converted to Arrow with every image's bytes and label preserved; bad records by policy."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pm_dist.data.arrow_format import Manifest
from pm_dist.data.to_arrow import convert_dataset
from pm_dist.data.datasets import ArrowDataset
from pm_dist.data.errors import BadSampleError, DataError
from pm_dist.data.recordio import RecordIOReader, insightface_layout, unpack
from pm_dist.data.raw_sources import RecSource

MAGIC = struct.pack("<I", 0xCED7230A)


# -- an independent writer, following dmlc-core's RecordIOWriter::WriteRecord and mxnet's pack -----
def pack_payload(label, image: bytes, id_: int = 0, id2: int = 0) -> bytes:
    if np.ndim(label):
        arr = np.asarray(label, dtype="<f4")
        return struct.pack("<IfQQ", arr.size, 0.0, id_, id2) + arr.tobytes() + image
    return struct.pack("<IfQQ", 0, float(label), id_, id2) + image


def encode_record(payload: bytes) -> bytes:
    """One record as it lies in a .rec file: split where the magic sits at a 4-aligned offset."""
    out, start, n = bytearray(), 0, len(payload)
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == MAGIC:
            flag = 1 if start == 0 else 2
            out += MAGIC + struct.pack("<I", flag << 29 | (i - start)) + payload[start:i]
            start = i + 4
    out += MAGIC + struct.pack("<I", (3 if start else 0) << 29 | (n - start)) + payload[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def write_rec(directory: str, records: list[tuple[int, bytes]], name: str = "train") -> str:
    rec, idx = os.path.join(directory, name + ".rec"), os.path.join(directory, name + ".idx")
    with open(rec, "wb") as f, open(idx, "w") as g:
        for key, payload in records:
            g.write(f"{key}\t{f.tell()}\n")
            f.write(encode_record(payload))
    return rec


def jpeg(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def insightface_rec(directory: str, labels: list[int], num_classes: int, property_file: bool = True):
    """An insightface-style set: header record 0, image records 1..n, one record per identity."""
    n = len(labels)
    images = {k: jpeg(k) for k in range(1, n + 1)}
    records = [(0, pack_payload([n + 1, n + 1 + num_classes], b""))]
    records += [(k, pack_payload(labels[k - 1], images[k], id_=k)) for k in range(1, n + 1)]
    for c in range(num_classes):
        keys = [k for k in range(1, n + 1) if labels[k - 1] == c]
        rng = [min(keys), max(keys) + 1] if keys else [0, 0]
        records.append((n + 1 + c, pack_payload(rng, b"")))
    rec = write_rec(directory, records)
    if property_file:
        with open(os.path.join(directory, "property"), "w") as f:
            f.write(f"{num_classes},12,12\n")
    return rec, images


# -- the format ----------------------------------------------------------------------------------
def test_writer_matches_documented_bytes():
    # magic (LE), lrecord = length 5 with cflag 0, data, padding to 4
    assert encode_record(b"abcde") == bytes.fromhex("0a23d7ce05000000" "6162636465" "000000")
    # magic inside at offset 4: part 1 (cflag 1, 4 bytes), part 3 (cflag 3, 2 bytes) + padding
    split = encode_record(b"wxyz" + MAGIC + b"ab")
    assert split == (MAGIC + struct.pack("<I", 1 << 29 | 4) + b"wxyz"
                     + MAGIC + struct.pack("<I", 3 << 29 | 2) + b"ab\0\0")


def test_reader_joins_parts_and_reads_headers(tmp_path):
    payloads = {
        0: pack_payload([5.0, 9.0], b""),
        1: pack_payload(3, b"plain image bytes"),
        2: pack_payload(7, b"ab" + MAGIC + b"unaligned: not split"),
        3: pack_payload(1, b"head" + MAGIC + b"mid!" + MAGIC + MAGIC + b"tail"),  # aligned: split 3x
        4: pack_payload([2.0, 0.5], b"label array, flag 2", id_=4, id2=77),
    }
    raw = encode_record(payloads[3])
    assert raw.count(MAGIC) == 4  # three split points → four parts, each with its own magic
    rec = write_rec(str(tmp_path), list(payloads.items()))
    reader = RecordIOReader(rec)
    for key, payload in payloads.items():
        assert reader.read(key) == payload
    h, img = unpack(reader.read(4))
    assert (h.flag, h.id, h.id2) == (2, 4, 77) and img == b"label array, flag 2"
    np.testing.assert_array_equal(h.label, np.array([2.0, 0.5], np.float32))
    assert reader.header(1).label == 3.0 and reader.header(3).label == 1.0
    layout = insightface_layout(reader)
    assert layout.image_keys == [1, 2, 3, 4] and layout.identity_keys == []  # keys 5..8 absent


# -- conversion ----------------------------------------------------------------------------------
def test_rec_to_arrow_preserves_bytes_and_labels(tmp_path):
    labels = [2, 0, 1, 2, 0, 3, 1, 2, 2, 0, 3]  # identities interleaved: the converter sorts
    rec, images = insightface_rec(str(tmp_path), labels, num_classes=4)
    out = tmp_path / "arrow"
    report = convert_dataset(RecSource(rec), str(out), shard_rows=4, workers=1)
    assert report.complete and report.num_images == len(labels) and report.num_identities == 4
    ds = ArrowDataset(str(out))
    np.testing.assert_array_equal(ds.count_array(), np.bincount(labels, minlength=4))
    seen = set()
    for i in range(ds.num_images):
        image, label, source, _ = ds.read(i)
        key = int(source.split("#")[1])
        assert source == f"train.rec#{key}"
        assert image.to_pybytes() == images[key] and label == labels[key - 1]
        seen.add(key)
    assert seen == set(images)
    assert Manifest.load(str(out)).image_size == [12, 12]


def test_rec_conversion_in_parallel_equals_serial(tmp_path):
    labels = [i % 5 for i in range(23)]
    rec, _ = insightface_rec(str(tmp_path), labels, num_classes=5, property_file=False)
    convert_dataset(RecSource(rec), str(tmp_path / "a"), shard_rows=5, workers=1)
    convert_dataset(RecSource(rec), str(tmp_path / "b"), shard_rows=5, workers=2)
    a, b = Manifest.load(str(tmp_path / "a")), Manifest.load(str(tmp_path / "b"))
    assert a.num_identities == 5  # from the header's identity range (no property file)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_bad_label_is_an_error_naming_the_record_or_skipped(tmp_path):
    n = 6
    records = [(0, pack_payload([n + 1, n + 3], b""))]
    records += [(k, pack_payload(k % 2, jpeg(k))) for k in range(1, n + 1)]
    records[3] = (3, pack_payload(7, jpeg(3)))  # only identities 0 and 1 exist
    records[5] = (5, pack_payload(0.5, jpeg(5)))  # not an integer
    records += [(n + 1, pack_payload([1, 2], b"")), (n + 2, pack_payload([2, 3], b""))]
    rec = write_rec(str(tmp_path), records)
    with pytest.raises(BadSampleError, match=r"train\.rec record 3 .*label 7\.0 is not an identity in \[0, 2\)"):
        convert_dataset(RecSource(rec), str(tmp_path / "strict"))
    report = convert_dataset(RecSource(rec), str(tmp_path / "lenient"), policy="skip")
    assert report.complete and report.num_images == n - 2 and report.num_skipped == 2
    m = Manifest.load(str(tmp_path / "lenient"))
    assert sorted(s["source"] for s in m.skipped) == ["train.rec#3", "train.rec#5"]


def test_truncated_rec_and_corrupt_image(tmp_path):
    records = [(k, pack_payload(k % 2, jpeg(k))) for k in range(6)]
    records[2] = (2, pack_payload(0, b"\xff\xd8 this is no jpeg"))
    rec = write_rec(str(tmp_path), records)
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 40)  # cut into the last record (key 5)
    with pytest.raises(BadSampleError, match=r"record 2.*does not decode"):
        convert_dataset(RecSource(rec), str(tmp_path / "strict"))
    report = convert_dataset(RecSource(rec), str(tmp_path / "lenient"), policy="skip")
    skipped = {s["source"]: s["reason"] for s in Manifest.load(str(tmp_path / "lenient")).skipped}
    assert set(skipped) == {"train.rec#2", "train.rec#5"} and report.num_images == 4
    assert "truncated" in skipped["train.rec#5"]


def test_bad_header_record_is_reported(tmp_path):
    rec = write_rec(str(tmp_path), [(0, pack_payload([1.0], b""))])
    with pytest.raises(DataError, match="record 0: header label array needs 2 values"):
        insightface_layout(RecordIOReader(rec))
    with open(rec, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(DataError, match="bad magic"):
        RecordIOReader(rec).read(0)


def test_arrow_rows_are_memory_mapped(tmp_path):
    labels = [i % 3 for i in range(30)]
    rec, images = insightface_rec(str(tmp_path), labels, num_classes=3)
    convert_dataset(RecSource(rec), str(tmp_path / "a"), shard_rows=30)
    ds = ArrowDataset(str(tmp_path / "a"))
    before = pa.total_allocated_bytes()
    rows = [ds.read(i)[0] for i in (29, 0, 17)]  # random access
    assert pa.total_allocated_bytes() - before < 1024  # zero-copy: no Arrow buffers allocated
    assert all(r.to_pybytes() in images.values() for r in rows)


def test_shard_jobs_carry_only_their_own_offsets(tmp_path):
    import pickle

    labels = [i % 4 for i in range(40)]
    rec, images = insightface_rec(str(tmp_path), labels, num_classes=4)
    source = RecSource(rec)
    plan = source.plan("error")
    assert source.reader.offsets and pickle.loads(pickle.dumps(source))._reader is None  # index stays home
    part = source.subset(plan.refs[:3])
    assert sorted(part.reader.offsets) == sorted(int(k) for k in plan.refs[:3])
    assert part.fetch(0, plan.refs[0])[0] == images[int(plan.refs[0])]

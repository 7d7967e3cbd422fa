"""Image folders → Arrow, the verification pass, resumable conversion, and damaged datasets."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pm_dist.data.arrow_format import Manifest
from pm_dist.data.to_arrow import convert_dataset
from pm_dist.data.convert import main as convert_main
from pm_dist.data.datasets import ArrowDataset
from pm_dist.data.errors import BadSampleError, DataError
from pm_dist.data.raw_sources import FolderSource, SyntheticSource
from pm_dist.data.synthetic import SyntheticIdentities
from pm_dist.data.verify import verify_dataset


def encoded(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def image_folder(root, layout: dict[str, int], broken: set[str] = frozenset()) -> dict[str, bytes]:
    """Folders of JPEG and PNG images; ``broken`` relative paths get bytes that do not decode."""
    files = {}
    for name, n in layout.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(n):
            rel = f"{name}/{k:03d}." + ("png" if k % 3 == 0 else "jpg")
            data = b"\x89PNG\r\n\x1a\n broken" if rel in broken else \
                encoded(sum(map(ord, name)) * 1000 + k, "PNG" if k % 3 == 0 else "JPEG")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
            files[rel] = data
    return files


def test_folder_round_trip_preserves_bytes_labels_and_names(tmp_path):
    files = image_folder(tmp_path / "src", {"bob": 3, "alice": 5, "carol": 1, "dave": 4})
    (tmp_path / "src" / "notes.txt").write_text("not an identity")
    report = convert_dataset(FolderSource(str(tmp_path / "src")), str(tmp_path / "out"), shard_rows=5)
    assert report.complete and report.num_identities == 4 and report.num_images == 13
    ds = ArrowDataset(str(tmp_path / "out"))
    assert ds.names == ["alice", "bob", "carol", "dave"]  # labels follow sorted folder names
    np.testing.assert_array_equal(ds.count_array(), [5, 3, 1, 4])
    got = {}
    for i in range(ds.num_images):
        image, label, source, _ = ds.read(i)
        assert ds.names[label] == source.split("/")[0]
        got[source] = image.to_pybytes()
    assert got == files
    assert verify_dataset(str(tmp_path / "out"), decode=True).ok


def test_empty_identity_folder_by_policy(tmp_path):
    image_folder(tmp_path / "src", {"a": 2, "b": 2})
    os.makedirs(tmp_path / "src" / "empty")
    with pytest.raises(BadSampleError, match=r"src/empty.*identity folder has no images"):
        convert_dataset(FolderSource(str(tmp_path / "src")), str(tmp_path / "strict"))
    report = convert_dataset(FolderSource(str(tmp_path / "src")), str(tmp_path / "ok"), policy="skip")
    assert report.num_identities == 2
    assert Manifest.load(str(tmp_path / "ok")).skipped == [
        {"source": "empty", "reason": "identity folder has no images"}]


def test_identity_left_empty_by_skipped_images_is_handled_at_load(tmp_path):
    image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 3}, broken={"b/000.png", "b/001.jpg"})
    report = convert_dataset(FolderSource(str(tmp_path / "src")), str(tmp_path / "out"), policy="skip")
    assert report.empty_identities == 1 and report.num_skipped == 2
    with pytest.raises(DataError, match=r"1 identities have no images \(identity 1 \('b'\)\)"):
        ArrowDataset(str(tmp_path / "out"))
    ds = ArrowDataset(str(tmp_path / "out"), bad_sample="skip")
    np.testing.assert_array_equal(ds.empty_identities, [1])


def test_verification_catches_tampered_and_truncated_shards(tmp_path):
    files = image_folder(tmp_path / "src", {"a": 4, "b": 4, "c": 4})
    out = str(tmp_path / "out")
    convert_dataset(FolderSource(str(tmp_path / "src")), out, shard_rows=6)
    assert verify_dataset(out).ok
    shard0 = os.path.join(out, "shard-00000.arrow")
    blob = bytearray(open(shard0, "rb").read())
    target = files["a/002.jpg"]
    pos = bytes(blob).index(target) + len(target) // 2  # one byte inside one image
    blob[pos] ^= 0xFF
    open(shard0, "wb").write(bytes(blob))
    report = verify_dataset(out)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "shard-00000.arrow: SHA-256 differs" in text
    assert "shard-00000.arrow row 2 (dataset row 2, source 'a/002.jpg'): image bytes do not match their crc32" in text
    # the loader catches the same row on its own (crc32 checked at every read)
    with pytest.raises(BadSampleError, match=r"shard-00000\.arrow row 2.*a/002\.jpg.*crc32"):
        ArrowDataset(out).load(2, 0)

    shard1 = os.path.join(out, "shard-00001.arrow")
    with open(shard1, "r+b") as f:
        f.truncate(os.path.getsize(shard1) - 100)
    assert any("shard-00001.arrow" in p and "truncated" in p for p in verify_dataset(out).problems)
    with pytest.raises(DataError, match=r"shard-00001\.arrow: shard is truncated"):
        ArrowDataset(out)
    ds = ArrowDataset(out, bad_sample="skip")  # the rest stays usable; that shard's rows fail one by one
    assert ds.load(0, 0).shape == (10, 10, 3)
    with pytest.raises(BadSampleError, match=r"shard-00001\.arrow row 0.*truncated"):
        ds.load(6, 1)


def test_interrupted_conversion_resumes_to_identical_bytes(tmp_path):
    gen = SyntheticIdentities(12, image_size=16, seed=3, count_median=5, count_sigma=0.5)
    one_shot = str(tmp_path / "one")
    convert_dataset(SyntheticSource(gen), one_shot, shard_rows=10)
    out = str(tmp_path / "resumed")
    first = convert_dataset(SyntheticSource(gen), out, shard_rows=10, max_shards=2)
    assert not first.complete and first.shards_written == 2
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    stamp = os.stat(os.path.join(out, "shard-00001.arrow")).st_mtime_ns
    with open(os.path.join(out, ".shard-00002.arrow.tmp-999"), "wb") as f:  # a shard killed mid-write
        f.write(b"half a shard")
    with pytest.raises(DataError, match="unfinished conversion with other settings"):
        convert_dataset(SyntheticSource(gen), out, shard_rows=7)
    rest = convert_dataset(SyntheticSource(gen), out, shard_rows=10)
    assert rest.complete and rest.shards_written == rest.shards_total - 2
    assert os.stat(os.path.join(out, "shard-00001.arrow")).st_mtime_ns == stamp  # not rewritten
    a, b = Manifest.load(one_shot), Manifest.load(out)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert not os.path.exists(os.path.join(out, ".convert"))
    again = convert_dataset(SyntheticSource(gen), out, shard_rows=10)  # already complete: a no-op
    assert again.complete and again.shards_written == 0
    # the Arrow copy decodes to exactly the rendered pixels (PNG is lossless)
    ds = ArrowDataset(out)
    i = int(ds.sample_index([5], [1])[0])
    np.testing.assert_array_equal(ds.load(i, 5), gen.render(5, 1))


def test_cli_folder_and_verify(tmp_path, capsys):
    image_folder(tmp_path / "src", {"x": 2, "y": 3})
    out = str(tmp_path / "out")
    assert convert_main(["folder", str(tmp_path / "src"), "--out", out, "--quiet"]) == 0
    assert "complete; 2 identities, 5 images" in capsys.readouterr().out
    assert convert_main(["verify", out, "--decode"]) == 0
    with open(os.path.join(out, "identities.arrow"), "r+b") as f:
        f.truncate(10)
    assert convert_main(["verify", out]) == 1
    assert "identities.arrow: cannot read identity table" in capsys.readouterr().out
    assert convert_main(["folder", str(tmp_path / "missing"), "--out", out]) == 1


def test_conversion_reports_identities_with_a_single_image(tmp_path, caplog):
    image_folder(tmp_path / "src", {"a": 2, "b": 1, "c": 1, "d": 3})
    with caplog.at_level("WARNING"):
        convert_dataset(FolderSource(str(tmp_path / "src")), str(tmp_path / "out"))
    assert "2 identities have a single image: training never draws them" in caplog.text
    from pm_dist.data.sampler import PKSampler
    sampler = PKSampler(ArrowDataset(str(tmp_path / "out")), 2, 2)
    assert sampler.num_ineligible == 2
    assert set(np.concatenate([sampler.classes(s) for s in range(20)]).tolist()) == {0, 3}

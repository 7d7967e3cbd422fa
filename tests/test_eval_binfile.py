"""insightface ``.bin`` files: read in every form they come in, and clear errors for broken ones."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from pm_dist.eval.binfile import BinFormatError, read_bin, write_bin
from pm_dist.eval.images import ImageDecodeError
from pm_dist.eval.verification import VerificationSet, load_bin


def images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def encode(img, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def python2_pickle(bins, flags):
    """The bytes Python 2's cPickle (protocol 2) writes for (list of str, list of bool): each image is
    a BINSTRING, which Python 3 can only read with encoding='bytes'."""
    out = [b"\x80\x02", b"]", b"("]
    for data in bins:
        out += [b"T", struct.pack("<I", len(data)), data]
    out += [b"e", b"]", b"("] + [b"\x88" if f else b"\x89" for f in flags] + [b"e", b"\x86", b"."]
    return b"".join(out)


def test_round_trip_png_is_pixel_exact(tmp_path):
    imgs, issame = images(6), [True, False, True]
    write_bin(tmp_path / "lfw.bin", imgs, issame)
    vset = load_bin(tmp_path / "lfw.bin", image_size=16)
    assert vset.name == "lfw" and vset.num_pairs == 3
    assert np.array_equal(vset.images, imgs)
    assert vset.issame.tolist() == issame


def test_python2_pickle_with_str_entries(tmp_path):
    imgs = images(4)
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(python2_pickle([encode(i) for i in imgs], [False, True]))
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load does with such a file
        pickle.loads(path.read_bytes())
    bins, flags = read_bin(path)
    assert all(isinstance(b, bytes) for b in bins) and flags.tolist() == [False, True]
    assert np.array_equal(load_bin(path, 16).images, imgs)


def test_numpy_bytes_and_uint8_array_entries(tmp_path):
    imgs = images(4)
    bins = [np.bytes_(encode(imgs[0])), np.frombuffer(encode(imgs[1]), dtype=np.uint8),
            bytearray(encode(imgs[2])), encode(imgs[3])]
    path = tmp_path / "cfp_fp.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, np.array([True, False])), f, protocol=2)
    vset = load_bin(path, 16)
    assert np.array_equal(vset.images, imgs)
    assert vset.issame.tolist() == [True, False]


def test_jpeg_and_resize(tmp_path):
    big = np.full((4, 40, 30, 3), 128, dtype=np.uint8)  # 30 wide, 40 high, flat grey
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        pickle.dump(([encode(i, "JPEG") for i in big], [True, False]), f)
    vset = load_bin(path, image_size=16)
    assert vset.images.shape == (4, 16, 16, 3)
    assert np.abs(vset.images.astype(int) - 128).max() <= 2  # JPEG of flat grey stays grey


def write_raw(path, bins, flags):
    with open(path, "wb") as f:
        pickle.dump((bins, flags), f)
    return path


def test_mismatched_lengths_named(tmp_path):
    bins = [encode(i) for i in images(6)]
    path = write_raw(tmp_path / "bad.bin", bins, [True, False])
    with pytest.raises(BinFormatError, match=r"bad\.bin: 6 images make 3 pairs, but issame_list has 2 flags"):
        read_bin(path)


def test_odd_number_of_images_named(tmp_path):
    path = write_raw(tmp_path / "odd.bin", [encode(i) for i in images(5)], [True, False])
    with pytest.raises(BinFormatError, match=r"odd\.bin: odd number of images \(5\)"):
        load_bin(path)


def test_undecodable_image_named_by_index(tmp_path):
    bins = [encode(i) for i in images(4)]
    bins[3] = b"\xff\xd8 not really a jpeg"
    path = write_raw(tmp_path / "broken.bin", bins, [True, False])
    with pytest.raises(ImageDecodeError, match=r"broken\.bin: image 3 cannot be decoded"):
        load_bin(path, 16)


def test_non_boolean_flag_named(tmp_path):
    path = write_raw(tmp_path / "flags.bin", [encode(i) for i in images(2)], ["yes"])
    with pytest.raises(BinFormatError, match=r"issame_list\[0\] = 'yes' is not a boolean"):
        read_bin(path)


def test_not_a_pair_of_lists(tmp_path):
    path = tmp_path / "dict.bin"
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(BinFormatError, match="expected a pickled pair"):
        read_bin(path)


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_naming_other_callables_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit()], [True])))
    with pytest.raises(BinFormatError, match="refusing to load posix.getcwd"):
        read_bin(path)


def test_verification_set_from_encoded_bytes_and_checks():
    imgs = images(4)
    vset = VerificationSet("enc", [encode(i) for i in imgs], [True, False])
    assert np.array_equal(vset.images, imgs)
    with pytest.raises(ValueError, match="enc: 4 images make 2 pairs, but 3 flags"):
        VerificationSet("enc", imgs, [True, False, True])
    with pytest.raises(ValueError, match="odd number of images"):
        VerificationSet("enc", imgs[:3], [True])
    with pytest.raises(ValueError, match=r"enc: images must be uint8 \[N, H, W, 3\] RGB, got float32"):
        VerificationSet("enc", imgs.astype(np.float32), [True, False])

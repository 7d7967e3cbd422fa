"""insightface's ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...), read and written without mxnet.

The file is a pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG/PNG bytes), pairs
consecutive (images 2i and 2i+1 form pair i), ``issame_list`` one same/different flag per pair.
Files written by Python 2 hold ``str`` entries, which Python 3 reads with ``encoding='bytes'`` (the
retry insightface also does).

Pickle runs code named in the file, and these files are downloaded from file-sharing links: the
unpickler here resolves only the few names such a file legitimately contains (numpy arrays and scalars,
``bytes``/``bytearray``), so a hostile file fails to load instead of running.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
from PIL import Image

_ALLOWED = {
    ("_codecs", "encode"),  # how protocol-2 pickles spell a bytes object
    ("builtins", "bytes"), ("builtins", "bytearray"),
    ("__builtin__", "bytes"), ("__builtin__", "bytearray"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class BinFormatError(ValueError):
    """A ``.bin`` file that does not hold a valid verification set; the message says what is wrong."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise BinFormatError(
                f"refusing to load {module}.{name}: a .bin file holds only image bytes and flags"
            )
        return super().find_class(module, name)


def _unpickle(path: str, encoding: str):
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding=encoding).load()


def read_bin(path: str | os.PathLike) -> tuple[list, np.ndarray]:
    """Raw contents of a ``.bin``: (list of encoded images, bool [n] same flags), validated.

    Raises ``BinFormatError`` naming the problem: not a pair of lists, an odd number of images,
    image and flag counts that disagree, a flag that is not a boolean.
    """
    path = os.fspath(path)
    try:
        try:
            obj = _unpickle(path, "ASCII")
        except UnicodeDecodeError:  # written by Python 2: its str entries are raw bytes
            obj = _unpickle(path, "bytes")
    except BinFormatError as exc:
        raise BinFormatError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise BinFormatError(f"{path}: not a readable .bin pickle ({exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pickled pair (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    try:
        bins, issame = list(bins), list(issame)
    except TypeError:
        raise BinFormatError(f"{path}: bins and issame_list must be lists") from None
    if len(bins) % 2:
        raise BinFormatError(
            f"{path}: odd number of images ({len(bins)}); pairs are consecutive images, so it must be even"
        )
    if len(bins) != 2 * len(issame):
        raise BinFormatError(
            f"{path}: {len(bins)} images make {len(bins) // 2} pairs, but issame_list has "
            f"{len(issame)} flags"
        )
    flags = np.empty(len(issame), dtype=bool)
    for i, flag in enumerate(issame):
        if isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (int, np.integer)) and flag in (0, 1)):
            flags[i] = bool(flag)
        else:
            raise BinFormatError(f"{path}: issame_list[{i}] = {flag!r} is not a boolean")
    return bins, flags


def write_bin(path: str | os.PathLike, images: np.ndarray, issame, fmt: str = "PNG", quality: int = 95) -> None:
    """Write uint8 [2n, H, W, 3] RGB images and n flags as an insightface ``.bin``.

    PNG (default) is lossless, so a set written here and read back gives the same pixels; JPEG gives
    files like the published ones.
    """
    images = np.asarray(images)
    issame = [bool(x) for x in issame]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 [2n, H, W, 3], got {images.dtype} {list(images.shape)}")
    if images.shape[0] != 2 * len(issame):
        raise ValueError(f"{images.shape[0]} images for {len(issame)} pairs")
    bins = []
    for img in images:
        buf = io.BytesIO()
        kwargs = {"quality": quality} if fmt.upper() in ("JPEG", "JPG") else {}
        Image.fromarray(img).save(buf, format=fmt, **kwargs)
        bins.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)

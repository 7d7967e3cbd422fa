"""Turning encoded face crops into the uint8 [N, H, W, 3] RGB arrays the evaluation feeds the encoder.

Two kinds of source feed the embedding extractor (``eval/embed.py``):

* ``ArraySource``: images already decoded in memory (a ``.bin`` set, synthetic identities).
* ``FileSource``: a list of image files decoded batch by batch, so that an IJB-sized list (half a
  million crops) never has to sit decoded in memory.

Both answer ``len(source)`` and ``source.read(start, stop) -> uint8 [stop-start, S, S, 3]``.

Crops of the wrong size are resized the way insightface's ``load_bin`` does (shorter side to the target,
bicubic, as mxnet's ``resize_short`` with its default interpolation) and then centre-cropped to a square,
a case insightface cannot handle at all. Decoding uses Pillow, not OpenCV/mxnet: JPEG decoders may
differ in the last bit of a pixel, so "the same numbers as insightface" holds for the same embeddings,
not necessarily for the same JPEG bytes.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; the message names the item."""


def encoded_bytes(item, what: str) -> bytes:
    """The raw bytes of one encoded image as stored in a ``.bin`` list.

    insightface's files hold ``bytes`` (Python 3 pickles, or Python 2 ``str`` read with
    ``encoding='bytes'``); some converters store numpy byte scalars or uint8 arrays instead.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):  # np.bytes_ is a bytes subclass
        return bytes(item)
    if isinstance(item, np.ndarray) and (item.dtype == np.uint8 or item.dtype.kind == "S"):
        return item.tobytes()
    raise ImageDecodeError(f"{what}: expected encoded image bytes, got {type(item).__name__}")


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to ``size`` × ``size``."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, image_size: int | None, what: str) -> np.ndarray:
    """Encoded bytes → uint8 [S, S, 3] RGB. ``what`` names the item in any error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if image_size is not None:
                img = fit_square(img, image_size)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # Pillow raises several types for corrupt data
        raise ImageDecodeError(f"{what} cannot be decoded as an image: {exc}") from None
    return arr


def decode_all(items: Sequence, image_size: int | None, what: str) -> np.ndarray:
    """Decode a list of encoded images into one uint8 [N, S, S, 3] array.

    Without ``image_size`` every image must already have the size of the first one.
    """
    out = None
    for i, item in enumerate(items):
        label = f"{what} image {i}"
        arr = decode_image(encoded_bytes(item, label), image_size, label)
        if out is None:
            out = np.empty((len(items),) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ImageDecodeError(
                f"{label} is {arr.shape[1]}x{arr.shape[0]}, the first image is "
                f"{out.shape[2]}x{out.shape[1]}: pass image_size to resize them"
            )
        out[i] = arr
    if out is None:
        raise ValueError(f"{what} holds no images")
    return out


def check_image_array(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"{what}: images must be uint8 [N, H, W, 3] RGB, got {images.dtype} {list(images.shape)}"
        )
    return images


class ArraySource:
    """Decoded images held in memory."""

    def __init__(self, images: np.ndarray, what: str = "images"):
        self.images = check_image_array(images, what)

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


class FileSource:
    """Image files decoded on demand, ``image_size`` square. Missing files are reported up front."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths = list(paths)
        self.image_size = int(image_size)
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"image file not found: {missing[0]}{more}")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, path in enumerate(self.paths[start:stop]):
            with open(path, "rb") as f:
                out[i] = decode_image(f.read(), self.image_size, f"image file {path}")
        return out


def as_source(images) -> ArraySource | FileSource:
    """Accept a source or a plain uint8 array."""
    if hasattr(images, "read") and hasattr(images, "__len__"):
        return images
    return ArraySource(images)

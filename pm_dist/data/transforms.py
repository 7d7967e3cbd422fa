"""Decoding and the standard face augmentation, shared by every dataset and the loader.

* Decoding: Pillow (libjpeg-turbo in current wheels). Measured on this machine (benchmarks/
  data_throughput.py) it decodes a 112×112 JPEG in well under the time the encoder spends on the
  image, so a faster decoder would not change the training speed; see docs/data.md.
* Resizing: images whose size is not the configured one are resized with Pillow's antialiased
  bilinear filter (e.g. 112×112 datasets used at 56×56 for CPU runs).
* Normalisation exactly as insightface's ``arcface_torch``: ToTensor (x/255) then
  Normalize(0.5, 0.5), i.e. (x/255 − 0.5)/0.5, computed in float32 in that order.
* Flip: horizontal, decided per sample by the loader from (seed, step, position), never by worker
  timing, so a resumed run sees the same flips.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Exceptions Pillow raises on broken input (SyntaxError: some malformed PNG chunks).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def decode(data, size: int | None = None) -> np.ndarray:
    """Encoded image bytes → uint8 RGB [S, S, 3]; resized to ``size`` when given and different.

    Raises one of ``DECODE_ERRORS`` on undecodable data, a truncated file included (Pillow's
    ``LOAD_TRUNCATED_IMAGES`` stays off: half an image is not a face).
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def image_size(data) -> tuple[int, int]:
    """(height, width) from the header only (no decoding)."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    return h, w


def normalize(images, flips: np.ndarray | None = None, device=None):
    """uint8 [B, H, W, 3] (array or tensor) → float32 tensor [B, 3, H, W] on ``device`` (default:
    the CPU), flipped where ``flips``, normalised as insightface. The one place the model's input
    convention lives: training batches and evaluation images both pass here. (torch is imported
    here, not above: converter processes never need it.)"""
    import torch

    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    x = x.to(device).permute(0, 3, 1, 2).to(torch.float32)  # uint8 crosses to the device
    if flips is not None and len(flips) and flips.any():
        sel = torch.from_numpy(np.flatnonzero(flips)).to(x.device)
        x[sel] = x[sel].flip(-1)
    x = x.div_(255.0).sub_(0.5).div_(0.5)
    return x.contiguous()

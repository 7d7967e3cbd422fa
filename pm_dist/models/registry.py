"""One entry point that turns an encoder name into a module: :func:`build_model`."""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from .iresnet import IRESNET_LAYERS, iresnet
from .mobilefacenet import MobileFaceNet
from .tiny import TinyEncoder

_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    **{name: (lambda d, s, p, name=name: iresnet(name, d, s, p)) for name in IRESNET_LAYERS},
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyEncoder,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0) -> nn.Module:
    """Build encoder ``name`` mapping float ``[N, 3, S, S]`` to unnormalised ``[N, D]``.

    ``S = image_size`` must be a positive multiple of 16 for every encoder (each halves the
    resolution four times and sizes its head to the final map). Inputs are normalised as in
    insightface, ``(pixel / 255 - 0.5) / 0.5``. The embedding is *not* L2-normalised: the
    margin head normalises, and some heads use the norm.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(MODEL_NAMES)}.{hint}")
    if embedding_size <= 0:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return builder(embedding_size, image_size, dropout)

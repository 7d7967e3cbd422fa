"""One entry point that turns an encoder name into a module: :func:`build_model`.

insightface's arcface_torch names its backbones ``r18``, ``r34``, ``r50``, ``r100`` and ``mbf``;
those names are accepted wherever an architecture is named (config ``model.name``, ``evaluate
--arch``, ``export --arch``) and resolve to the canonical names here (:func:`canonical_name`).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from pm_dist.suggest import did_you_mean

from .iresnet import IRESNET_LAYERS, iresnet
from .mobilefacenet import MobileFaceNet
from .tiny import TinyEncoder

_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    **{name: (lambda d, s, p, name=name: iresnet(name, d, s, p)) for name in IRESNET_LAYERS},
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyEncoder,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)

# insightface arcface_torch's backbone names (get_model) → pm_dist's.
ALIASES: dict[str, str] = {
    "r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
    "mbf": "mobilefacenet",
}


def canonical_name(name: str) -> str:
    """The pm_dist name of encoder ``name`` (itself, or an insightface alias resolved).

    Raises ``ValueError`` naming the valid names, with a did-you-mean, for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in _BUILDERS:
        valid = list(MODEL_NAMES) + list(ALIASES)
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(MODEL_NAMES)} "
                         f"(insightface aliases: {', '.join(ALIASES)}){did_you_mean(name, valid)}")
    return name


def build_model(name: str, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0) -> nn.Module:
    """Build encoder ``name`` (a canonical name or an insightface alias) mapping float
    ``[N, 3, S, S]`` to unnormalised ``[N, D]``.

    ``S = image_size`` must be a positive multiple of 16 for every encoder (each halves the
    resolution four times and sizes its head to the final map). Inputs are normalised as in
    insightface, ``(pixel / 255 - 0.5) / 0.5``. The embedding is *not* L2-normalised: the
    margin head normalises, and some heads use the norm.
    """
    builder = _BUILDERS[canonical_name(name)]
    if embedding_size <= 0:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return builder(embedding_size, image_size, dropout)

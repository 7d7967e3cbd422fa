"""The encoder file: one self-describing PyTorch file per trained encoder.

Layout (a plain dict, loadable with ``torch.load(weights_only=True)``, no pickled classes)::

    {"format": "pm_dist.encoder", "version": 1, "arch": str,
     "embedding_size": int, "image_size": int, "state_dict": {name: tensor}}

The architecture fields are stored next to the weights because a state dict alone cannot
say which encoder or input size it belongs to; with them, :func:`load_encoder` rebuilds
the module without the training config. Writes are atomic (temp file, fsync, rename), so a
crash mid-save leaves the previous file intact rather than a truncated one.

:func:`load_encoder` also accepts a bare insightface ``backbone.pth`` (a state dict) when
told its ``arch``: IResNet and MobileFaceNet keep insightface's key names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pm_dist.files import atomic_path, fsync_dir

from .registry import ALIASES, MODEL_NAMES, build_model, canonical_name

ENCODER_FORMAT = "pm_dist.encoder"
ENCODER_VERSION = 1


class EncoderFileError(ValueError):
    """An encoder file that cannot be read, is of another kind, or does not fit its arch."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)


def _check_fields(path, arch: Any, embedding_size: Any, image_size: Any) -> None:
    if arch not in MODEL_NAMES:
        raise EncoderFileError(path, f"unknown arch {arch!r}; valid: {', '.join(MODEL_NAMES)}")
    for field, value in (("embedding_size", embedding_size), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EncoderFileError(path, f"{field} must be a positive int, got {value!r}")


def _build(path, arch: str, embedding_size: int, image_size: int, device: str | torch.device | None = None):
    try:
        if device is None:
            return build_model(arch, embedding_size, image_size)
        with torch.device(device):
            return build_model(arch, embedding_size, image_size)
    except ValueError as e:
        raise EncoderFileError(path, str(e)) from e


def _shape_mismatches(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [
        f"{k}: shape {tuple(got[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    return problems


def _describe(problems: list[str], limit: int = 5) -> str:
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def save_encoder(path: str | os.PathLike, model: nn.Module, arch: str, embedding_size: int, image_size: int) -> Path:
    """Write ``model``'s weights and architecture to ``path`` atomically; returns the path.

    The state dict is checked against a fresh ``build_model(arch, ...)`` (on the meta device,
    so this costs no memory) before anything is written: a file that would not load back —
    wrong arch, or a ZeRO-3 partitioned module whose parameters are empty — is refused here,
    not discovered at evaluation time.
    """
    path = Path(path)
    if arch in ALIASES:
        arch = ALIASES[arch]
    _check_fields(path, arch, embedding_size, image_size)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    reference = _build(path, arch, embedding_size, image_size, device="meta").state_dict()
    problems = _shape_mismatches(reference, state)
    if problems:
        raise EncoderFileError(path, f"model does not match {arch} (D={embedding_size}, "
                                     f"S={image_size}): {_describe(problems)}")
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_VERSION,
        "arch": arch,
        "embedding_size": embedding_size,
        "image_size": image_size,
        "state_dict": state,
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    fsync_dir(path.parent)
    return path


def load_encoder(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    arch: str | None = None,
    embedding_size: int = 512,
    image_size: int = 112,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder stored at ``path``; returns ``(model, meta)`` with the model in eval mode.

    ``meta`` holds ``format``, ``version``, ``arch``, ``embedding_size``, ``image_size``.
    For a pm_dist encoder file the architecture comes from the file (``arch``, if given, must
    agree). For a bare state dict (insightface's ``backbone.pth``) pass ``arch`` and, when
    not 512/112, ``embedding_size``/``image_size``. Weights load with ``strict=True``.
    Call ``.train()`` on the result to fine-tune.

    Raises :class:`EncoderFileError` (naming the file) for an unreadable, truncated or foreign
    file, or weights that do not fit the architecture; ``FileNotFoundError`` if it is absent.
    """
    path = Path(path)
    if arch is not None:
        try:  # insightface's names (r50, mbf, ...) are accepted
            arch = canonical_name(arch)
        except ValueError as e:
            raise EncoderFileError(path, str(e)) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such encoder file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise EncoderFileError(path, "cannot be read as PyTorch weights (damaged, truncated, or another "
                                     f"kind of file): {type(e).__name__}: {first_line}") from e
    if not isinstance(obj, dict):
        raise EncoderFileError(path, f"expected a dict, found {type(obj).__name__}")

    if "format" in obj:
        if obj["format"] != ENCODER_FORMAT:
            raise EncoderFileError(path, f"format {obj['format']!r} is not {ENCODER_FORMAT!r}")
        if obj.get("version") != ENCODER_VERSION:
            raise EncoderFileError(path, f"encoder file version {obj.get('version')!r}; this pm_dist reads "
                                         f"version {ENCODER_VERSION}")
        meta = {k: obj.get(k) for k in ("format", "version", "arch", "embedding_size", "image_size")}
        _check_fields(path, meta["arch"], meta["embedding_size"], meta["image_size"])
        if arch is not None and arch != meta["arch"]:
            raise EncoderFileError(path, f"holds a {meta['arch']} encoder, not {arch}")
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise EncoderFileError(path, "has no state_dict")
    elif obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        if arch is None:
            raise EncoderFileError(path, "is a bare state dict; pass arch= (and embedding_size=, "
                                         "image_size= if not 512/112) to load it")
        meta = {"format": "state_dict", "version": None, "arch": arch,
                "embedding_size": embedding_size, "image_size": image_size}
        _check_fields(path, arch, embedding_size, image_size)
        state = obj
        # Checkpoints saved from a DDP wrapper carry a "module." prefix on every key.
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
    else:
        raise EncoderFileError(path, "neither a pm_dist encoder file nor a state dict of tensors")

    model = _build(path, meta["arch"], meta["embedding_size"], meta["image_size"])
    problems = _shape_mismatches(model.state_dict(), state)
    if problems:
        raise EncoderFileError(path, f"weights do not fit {meta['arch']} (D={meta['embedding_size']}, "
                                     f"S={meta['image_size']}): {_describe(problems)}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), meta

"""Loading a trained model from whatever a run or a user has: a pm_dist encoder file, an insightface
``backbone.pth``, an ONNX file, or a training checkpoint directory.

The result maps float [N, 3, S, S] (insightface normalization) to [N, D] and comes with its input
size S. ``onnxruntime`` is imported only for ``.onnx`` files; a checkpoint is read without
DeepSpeed's engine (:func:`load_checkpoint_encoder`), so a run that died mid-way still yields a
model on a machine without its GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch


class OnnxEncoder:
    """An ONNX model (e.g. written by ``python -m pm_dist.export``) run by onnxruntime, called like
    the PyTorch encoder: float tensor [N, 3, S, S] in, float tensor [N, D] out (on the input's device)."""

    def __init__(self, path: str, device="cpu"):
        import onnxruntime as ort

        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(path, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one image input [N, 3, S, S], found "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        shape = inputs[0].shape
        meta = self.session.get_modelmeta().custom_metadata_map
        # a static spatial size, else the size pm_dist.export records in the metadata
        self.image_size = shape[2] if isinstance(shape[2], int) else (
            int(meta["pm_dist.image_size"]) if "pm_dist.image_size" in meta else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``path`` names, or None when it names none: a ``step_N/``
    directory itself, or a run's ``checkpoints/`` (or the run directory): its newest valid
    checkpoint. Raises ``FileNotFoundError`` for a directory holding no checkpoint."""
    from pm_dist.checkpoint import find_latest

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if any(root.glob("step_*")):
            ckpt, _ = find_latest(root, log=lambda text: print(text, file=sys.stderr))
            if ckpt is None:
                raise FileNotFoundError(f"{root}: no valid checkpoint (every step_* is damaged)")
            return ckpt
    raise FileNotFoundError(f"{path}: a directory, but neither a checkpoint (step_N/ with "
                            "meta.json) nor a run's checkpoints/ directory")


ENGINE_MODEL_FILE = "engine/ds/mp_rank_00_model_states.pt"


def load_checkpoint_encoder(path: str | os.PathLike, map_location="cpu"):
    """``(model, meta)`` from a training checkpoint (see :func:`resolve_checkpoint`): the encoder
    weights of DeepSpeed's model-states file (rank 0's module, BatchNorm statistics included),
    read with ``torch.load`` and no engine, cast to fp32; the architecture from the checkpoint's
    meta.json. ``meta`` is an encoder file's (arch, embedding_size, image_size) plus ``step``
    and ``checkpoint``. The model is in eval mode."""
    from pm_dist.checkpoint import load_file, read_meta
    from pm_dist.models import build_model
    from pm_dist.models.encoder_file import EncoderFileError

    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    record = read_meta(ckpt)
    config = record.get("config", {})
    arch = config.get("model", {}).get("name")
    embedding_size = config.get("model", {}).get("embedding_size")
    image_size = config.get("data", {}).get("image_size")
    states = load_file(ckpt / ENGINE_MODEL_FILE)
    state = states.get("module") if isinstance(states, dict) else None
    if not isinstance(state, dict):
        raise EncoderFileError(ckpt / ENGINE_MODEL_FILE, "holds no 'module' state dict")
    model = build_model(arch, embedding_size, image_size)
    own = model.state_dict()
    state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v)
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EncoderFileError(ckpt / ENGINE_MODEL_FILE,
                               f"weights do not fit {arch}: {str(err).splitlines()[0]}") from None
    meta = {"format": "checkpoint", "version": None, "arch": arch, "embedding_size": embedding_size,
            "image_size": image_size, "step": record["step"], "checkpoint": str(ckpt)}
    return model.to(map_location).eval(), meta


def load_any_encoder(path: str | os.PathLike, map_location="cpu", arch: str | None = None,
                     embedding_size: int = 512, image_size: int = 112):
    """``(model, meta)`` of a checkpoint directory or an encoder file / bare state dict
    (``pm_dist.models.load_encoder``'s arguments)."""
    from pm_dist.models import load_encoder

    if os.path.isdir(path):
        return load_checkpoint_encoder(path, map_location)
    return load_encoder(path, map_location=map_location, arch=arch, embedding_size=embedding_size,
                        image_size=image_size)


def load_model(path: str | os.PathLike, device="cpu", image_size: int | None = None, arch: str | None = None,
               embedding_size: int = 512):
    """(model, image_size) for an ``.onnx`` file, a PyTorch encoder file or a checkpoint directory.

    ``image_size`` overrides what the file says (needed for an ONNX model with a dynamic input size,
    and for a bare state dict together with ``arch`` and ``embedding_size``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if path.endswith(".onnx"):
        model = OnnxEncoder(path, device)
        size = image_size or model.image_size
        if size is None:
            raise ValueError(f"{path}: the ONNX input size is dynamic; pass --image-size")
        return model, int(size)
    model, meta = load_any_encoder(path, device, arch=arch, embedding_size=embedding_size,
                                   image_size=image_size or 112)
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"{path}: the encoder takes {meta['image_size']}x{meta['image_size']} images, "
                         f"not {image_size}x{image_size}")
    return model, int(meta["image_size"])


def init_from(model: torch.nn.Module, path: str | os.PathLike, arch: str, embedding_size: int,
              image_size: int) -> dict:
    """Copy the weights of ``path`` (a pm_dist encoder file, an insightface ``backbone.pth`` or a
    checkpoint directory) into ``model``, built as ``arch``/``embedding_size``/``image_size``
    (``model.init_from``: fine-tuning). Returns the source's meta. Raises ``EncoderFileError``
    naming the file and what differs (the architecture, or the first mismatching keys/shapes)."""
    from pm_dist.models import canonical_name
    from pm_dist.models.encoder_file import EncoderFileError

    arch = canonical_name(arch)
    source, meta = load_any_encoder(path, "cpu", arch=arch, embedding_size=embedding_size,
                                    image_size=image_size)
    want = {"arch": arch, "embedding_size": embedding_size, "image_size": image_size}
    differ = [f"{k} {meta[k]} (the config has {v})" for k, v in want.items() if meta[k] != v]
    if differ:
        raise EncoderFileError(path, "does not fit model.init_from's run: its " + ", ".join(differ))
    model.load_state_dict(source.state_dict(), strict=True)
    return meta

"""Loading the model to evaluate: a pm_dist encoder file / insightface ``backbone.pth``, or ONNX.

Either way the result maps float [N, 3, S, S] (insightface normalization) to [N, D] and comes with
its input size S. ``pm_dist.models`` and ``onnxruntime`` are imported only when needed, so evaluating
an ONNX model needs no model code and evaluating a checkpoint needs no onnxruntime.
"""

from __future__ import annotations

import os

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


def load_model(path: str | os.PathLike, device="cpu", image_size: int | None = None, arch: str | None = None,
               embedding_size: int = 512):
    """(model, image_size) for an ``.onnx`` file or a PyTorch encoder file.

    ``image_size`` overrides what the file says (needed for an ONNX model with a dynamic input size,
    and for a bare state dict together with ``arch`` and ``embedding_size``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if path.endswith(".onnx"):
        model = OnnxEncoder(path, device)
        size = image_size or model.image_size
        if size is None:
            raise ValueError(f"{path}: the ONNX input size is dynamic; pass --image-size")
        return model, int(size)
    from pm_dist.models import load_encoder

    model, meta = load_encoder(path, map_location=device, arch=arch, embedding_size=embedding_size,
                               image_size=image_size or 112)
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"{path}: the encoder takes {meta['image_size']}x{meta['image_size']} images, "
                         f"not {image_size}x{image_size}")
    return model, int(meta["image_size"])

"""Export a trained encoder for deployment: a plain state dict and a verified ONNX model.

    python -m pm_dist.export --encoder runs/x/encoder.pt --out exported/ [--opset 17]
    python -m pm_dist.export --encoder runs/x/checkpoints --out exported/   # newest checkpoint

writes ``exported/backbone.pth`` (a bare state dict with insightface key names for IResNet
and MobileFaceNet, so insightface tooling loads it) and ``exported/encoder.onnx`` (input
``input`` float32 ``[N, 3, S, S]``, output ``embedding`` ``[N, D]``, batch axis dynamic),
then runs the ONNX model with onnxruntime next to the PyTorch model on random inputs and
fails if they disagree.

Exporter choice: torch 2.13's ``torch.onnx.export`` defaults to the dynamo exporter, which
needs ``onnxscript`` (not a dependency here, and not installable offline). These encoders
are static convolutional graphs, which the TorchScript-based exporter (``dynamo=False``)
handles exactly; it is deprecated upstream but present in torch 2.13, so we use it and
silence its deprecation notice.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path
from .models import EncoderFileError
from .models.encoder_file import atomic_torch_save

DEFAULT_OPSET = 17
# ONNX Runtime and PyTorch use different conv kernels; fp32 rounding differences grow with
# depth but stay ~1e-6 relative. The check passes when max|onnx - torch| <= ATOL + RTOL·max|torch|.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "embedding"


class OnnxMismatchError(RuntimeError):
    """ONNX Runtime's embeddings differ from PyTorch's beyond the tolerance."""


class _eval_mode:
    """Put a module in eval mode for a block and restore its previous mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (traced in eval mode) as ONNX to ``path``; returns the path.

    The batch axis is dynamic; the image size is fixed (the encoders' heads are sized to it).
    ``metadata`` is stored as ONNX ``metadata_props`` (string key/values). The file is written
    beside ``path`` and renamed into place, and passes ``onnx.checker``.
    """
    import onnx  # optional dependency (extras "onnx"); imported here so training never needs it

    path = Path(path)
    device = next(model.parameters()).device
    # Batch 2, not 1: tracing must not specialise on a size-1 batch.
    dummy = torch.zeros(2, 3, image_size, image_size, device=device)
    with atomic_path(path) as tmp:
        with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (dummy,), str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return path


def check_onnx(model: nn.Module, path: str | os.PathLike, image_size: int, batch: int = 4,
               atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0) -> float:
    """Compare ONNX Runtime and PyTorch (eval mode) embeddings on random inputs in [-1, 1].

    Returns max |onnx - torch|. Raises :class:`OnnxMismatchError` if it exceeds
    ``atol + rtol * max|torch|`` or anything is non-finite. Use a ``batch`` other than 2 to
    exercise the dynamic batch axis (the export traced batch 2).
    """
    return _compare(model, path, image_size, batch, atol, rtol, seed)[0]


def _compare(model: nn.Module, path: str | os.PathLike, image_size: int, batch: int,
             atol: float, rtol: float, seed: int) -> tuple[float, float]:
    """(max |onnx - torch|, max |torch|); raises on mismatch (see :func:`check_onnx`)."""
    import numpy as np
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
    device = next(model.parameters()).device
    with _eval_mode(model), torch.no_grad():
        expected = model(x.to(device)).float().cpu().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise OnnxMismatchError(f"{path}: ONNX output shape {got.shape}, PyTorch {expected.shape}")
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        raise OnnxMismatchError(f"{path}: non-finite embeddings (ONNX or PyTorch)")
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    if diff > atol + rtol * scale:
        raise OnnxMismatchError(f"{path}: max |onnx - torch| = {diff:.3g} exceeds "
                                f"{atol:g} + {rtol:g}·{scale:.3g} (max |embedding|)")
    return diff, scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pm_dist.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, type=Path,
                        help="pm_dist encoder file, a bare state dict with --arch (insightface "
                             "backbone.pth), or a checkpoint directory (step_N/, or a run's "
                             "checkpoints/: the newest)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--arch", help="architecture of a bare state dict (e.g. insightface backbone.pth); "
                                       "insightface names r18, r34, r50, r100, mbf accepted")
    parser.add_argument("--embedding-size", type=int, default=512, help="for a bare state dict (default 512)")
    parser.add_argument("--image-size", type=int, default=112, help="for a bare state dict (default 112)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError
    from .models.loading import load_any_encoder

    try:
        model, meta = load_any_encoder(args.encoder, arch=args.arch, embedding_size=args.embedding_size,
                                       image_size=args.image_size)
    except (EncoderFileError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = meta["image_size"]
    state_path = atomic_torch_save(model.state_dict(), args.out / "backbone.pth")
    onnx_path = export_onnx(model, args.out / "encoder.onnx", size, opset=args.opset, metadata={
        "pm_dist.arch": meta["arch"],
        "pm_dist.embedding_size": str(meta["embedding_size"]),
        "pm_dist.image_size": str(size),
        "pm_dist.input": "float32 NCHW RGB, (pixel/255 - 0.5)/0.5",
        "pm_dist.output": "unnormalised embedding; L2-normalise before cosine comparison",
    })
    try:
        diff, scale = _compare(model, onnx_path, size, batch=4, atol=args.atol, rtol=args.rtol, seed=0)
    except OnnxMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    origin = f" (checkpoint {meta['checkpoint']}, step {meta['step']})" if "step" in meta else ""
    print(f"{meta['arch']} D={meta['embedding_size']} S={size}{origin}")
    print(f"wrote {state_path}")
    print(f"wrote {onnx_path} (opset {args.opset}, dynamic batch)")
    print(f"onnxruntime vs torch on 4 random inputs: max |diff| = {diff:.3g}, max |embedding| = {scale:.3g}, "
          f"tolerance {args.atol:g} + {args.rtol:g}·max|embedding|")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embed face images: ``python -m pm_dist.embed --model M --images DIR|LIST --out emb.npy``.

The inference step arcface_torch users script by hand. ``--images`` is a folder (every image file
under it, recursively, in sorted path order) or a text list (one image path per line, relative to
the list's folder or ``--root``; blank lines and ``#`` comments skipped). Images must be aligned face
crops, as for training (insightface's 112×112 alignment): each is resized to the model's input size
if it differs (shorter side, bicubic, centre crop) and normalized as in training
(``pm_dist.data.transforms.normalize``). ``--flip`` adds the embedding of the mirrored image (the
"flip-sum" of the evaluation protocol).

Writes ``emb.npy`` (float32 [N, D], L2-normalized unless ``--raw``, rows in input order) and
``emb.paths.txt`` (the N image paths, in the same order). Under ``torchrun --nproc_per_node=W`` every
rank embeds a share of the batches (``pm_dist.eval.embed``) and rank 0 writes the files. A missing
or undecodable image stops the run with an error naming the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(images: str, root: str | None = None) -> list[str]:
    """The image paths ``--images`` names (a folder, recursively and sorted, or a list file)."""
    path = Path(images)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--images {images}: no such folder or list file")
    base = Path(root) if root else path.parent
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line if os.path.isabs(line) else str(base / line))
    if not out:
        raise ValueError(f"{images}: the list names no image")
    return out


def paths_file(out: str | os.PathLike) -> Path:
    """``emb.npy`` → ``emb.paths.txt``."""
    out = Path(out)
    return out.with_name(out.stem + ".paths.txt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pm_dist.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="pm_dist encoder file, insightface backbone.pth (with --arch), .onnx, or a "
                        "checkpoint directory (step_N/, or a run's checkpoints/: the newest)")
    p.add_argument("--images", required=True, help="a folder of face crops, or a list file of paths")
    p.add_argument("--out", required=True, help="output .npy (the paths go to <out stem>.paths.txt)")
    p.add_argument("--root", help="folder the list's relative paths start from (default: its folder)")
    p.add_argument("--arch", help="architecture of a bare state dict: iresnet50 / r50, mbf, ...")
    p.add_argument("--embedding-size", type=int, default=512, help="for a bare state dict (default 512)")
    p.add_argument("--image-size", type=int, help="input size; read from the model file when it says "
                                                  "(112 for a bare state dict)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass and rank")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (flip-sum)")
    p.add_argument("--raw", action="store_true", help="write the raw embeddings, not L2-normalized")
    p.add_argument("--device", help="default: this rank's GPU under torchrun, else cuda if available, else cpu")
    return p


def run(args: argparse.Namespace) -> tuple[np.ndarray, list[str]]:
    """(embeddings [N, D] float32, paths); the same on every rank."""
    from pm_dist.distributed import init_distributed
    from pm_dist.eval.embed import extract_embeddings
    from pm_dist.eval.images import FileSource
    from pm_dist.eval.protocol import l2_normalize
    from pm_dist.models.loading import load_model

    paths = list_images(args.images, args.root)
    env = init_distributed()
    device = args.device or env.device
    model, size = load_model(args.model, device, args.image_size, args.arch, args.embedding_size)
    emb = extract_embeddings(model, FileSource(paths, size), batch_size=args.batch_size,
                             device=device, flip=args.flip)
    out = emb.combined()
    if not args.raw:
        out = l2_normalize(out)
    return out.astype(np.float32), paths


def write(out: str | os.PathLike, embeddings: np.ndarray, paths: list[str]) -> None:
    from pm_dist.files import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, embeddings)
    os.replace(tmp, out)
    atomic_write_text(paths_file(out), "".join(p + "\n" for p in paths))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pm_dist.checkpoint import CheckpointError
    from pm_dist.distributed import exit_on_error, get_rank, shutdown_distributed
    from pm_dist.eval.embed import EmbeddingError
    from pm_dist.eval.images import ImageDecodeError

    failure = None
    try:
        embeddings, paths = run(args)
    except (ImageDecodeError, EmbeddingError, FileNotFoundError, ValueError, CheckpointError) as exc:
        failure = (f"error: {exc}", isinstance(exc, EmbeddingError))  # that one: every rank's
    if failure is not None:
        return exit_on_error(*failure)
    if get_rank() == 0:
        write(args.out, embeddings, paths)
        print(f"{len(paths)} images → {args.out} (float32 {list(embeddings.shape)}, "
              f"{'raw' if args.raw else 'L2-normalized'}{', flip-sum' if args.flip else ''}); "
              f"paths: {paths_file(args.out)}")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

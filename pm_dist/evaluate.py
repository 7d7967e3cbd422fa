"""Evaluate a trained encoder: ``python -m pm_dist.evaluate --model encoder.pt --bin lfw.bin ...``.

Runs any mix of: insightface ``.bin`` sets (10-fold protocol), a pair list (TAR@FAR; IJB-style template
pairs with ``--templates``), 1:N identification on gallery/probe subject lists, and the built-in
synthetic held-out identities. Under ``torchrun --nproc_per_node=W`` every rank embeds a share of the
images; rank 0 prints the table and writes ``eval.json`` and one ``roc_<name>.png`` per result to
``--out``. See docs/evaluation.md for the list formats and the exact protocol.
"""

from __future__ import annotations

import argparse
import sys

from .distributed import init_distributed, is_distributed
from .eval.binfile import BinFormatError
from .eval.embed import EmbeddingError
from .eval.images import ImageDecodeError
from .eval.lists import ListFormatError
from .eval.roc import TAR_METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pm_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="pm_dist encoder file, insightface backbone.pth (with --arch), or .onnx")
    p.add_argument("--arch", help="architecture of a bare state dict (insightface backbone.pth)")
    p.add_argument("--embedding-size", type=int, default=512, help="for a bare state dict (default 512)")
    p.add_argument("--image-size", type=int, help="input size; read from the model file when it says")
    p.add_argument("--bin", nargs="+", default=[], metavar="FILE", help="insightface .bin verification sets")
    p.add_argument("--pairs", help="pair list 'a b label' (image paths, or template ids with --templates)")
    p.add_argument("--templates", help="template list 'image template [media]'")
    p.add_argument("--gallery", help="gallery subject list 'template subject' (needs --templates, --probes)")
    p.add_argument("--probes", help="probe subject list 'template subject'")
    p.add_argument("--root", help="folder image paths in lists are relative to (default: the list's folder)")
    p.add_argument("--synthetic", action="store_true", help="evaluate on the synthetic held-out identities")
    p.add_argument("--synthetic-seed", type=int, default=0, help="dataset seed (that of training)")
    p.add_argument("--synthetic-pairs", type=int, default=600)
    p.add_argument("--synthetic-identities", type=int, default=200, help="identities in the 1:N split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="embed images only once (no mirrored copy)")
    p.add_argument("--tar-method", choices=TAR_METHODS, default="nearest",
                   help="how TAR@FAR reads the ROC (default: nearest, insightface's IJB convention)")
    p.add_argument("--device", help="default: this rank's GPU under torchrun, else cuda if available, else cpu")
    p.add_argument("--out", default="eval_out", help="report folder (default eval_out)")
    return p


def run(args: argparse.Namespace) -> list[dict]:
    """Every requested evaluation, in order; the same list on every rank."""
    from .eval.loading import load_model
    from .eval.suites import evaluate_identification_lists, evaluate_pair_list
    from .eval.verification import evaluate_verification, load_bin

    env = init_distributed()
    device = args.device or env.device
    flip = not args.no_flip
    model, size = load_model(args.model, device, args.image_size, args.arch, args.embedding_size)
    results = []
    for path in args.bin:
        results.append(evaluate_verification(model, load_bin(path, size), args.batch_size, device, flip,
                                             tar_method=args.tar_method))
    if args.pairs:
        results.append(evaluate_pair_list(model, args.pairs, args.templates, args.root, size, args.batch_size,
                                          device, flip, args.tar_method))
    if args.gallery:
        results.append(evaluate_identification_lists(model, args.templates, args.gallery, args.probes, args.root,
                                                     size, args.batch_size, device, flip))
    if args.synthetic:
        from .data.synthetic import SyntheticIdentities
        from .eval.synthetic import evaluate_synthetic

        # held-out identities do not depend on the training-set size: 1 identity is enough here
        data = SyntheticIdentities(1, image_size=size, seed=args.synthetic_seed,
                                   heldout_identities=max(1000, args.synthetic_identities))
        results += evaluate_synthetic(model, data, args.synthetic_pairs, args.synthetic_identities,
                                      seed=args.synthetic_seed, batch_size=args.batch_size, device=device,
                                      flip=flip, tar_method=args.tar_method)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gallery and not (args.probes and args.templates):
        parser.error("--gallery needs --probes and --templates")
    if args.probes and not args.gallery:
        parser.error("--probes needs --gallery")
    if not (args.bin or args.pairs or args.gallery or args.synthetic):
        parser.error("nothing to evaluate: give --bin, --pairs, --gallery/--probes or --synthetic")

    from .eval.report import write_report

    try:
        results = run(args)
    except (BinFormatError, ListFormatError, ImageDecodeError, EmbeddingError, FileNotFoundError,
            ValueError) as exc:  # bad input: one clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(results, args.out)
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

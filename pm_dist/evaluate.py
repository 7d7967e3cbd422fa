"""Evaluate a trained encoder: ``python -m pm_dist.evaluate --model encoder.pt --bin lfw.bin ...``.

Runs any mix of the registered evaluation suites (``pm_dist.eval.suites``): insightface ``.bin`` sets
(10-fold protocol), a pair list (TAR@FAR; IJB-style template pairs with ``--templates``), 1:N
identification on gallery/probe subject lists, the built-in synthetic held-out identities, and any
suite registered by the user (``--suite NAME key=value ...``). ``--config`` takes a run's
``config.yaml`` and runs exactly the suites training ran, built the same way (``suites_from_config``,
which the trainer calls too). Under ``torchrun --nproc_per_node=W`` every rank embeds a share of the
images; rank 0 prints the table and writes ``eval.json`` and one ``roc_<name>.png`` per result to
``--out``. See docs/evaluation.md for the list formats and the exact protocol.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config_io import ConfigError, parse_override
from .distributed import exit_on_error, init_distributed, shutdown_distributed
from .eval.binfile import BinFormatError
from .eval.embed import EmbeddingError
from .eval.images import ImageDecodeError
from .eval.lists import ListFormatError
from .eval.roc import TAR_METHODS
from .plugins import PluginError, load_plugins
from .eval.suites import (BinSuite, EvalContext, IdentificationListSuite, PairListSuite, Suite,
                          SyntheticSuite, parse_suite, run_suites)


def synthetic_dataset(data_cfg):
    """The synthetic identities of a run's ``data`` section (their held-out split is evaluated)."""
    from .data.synthetic import SyntheticIdentities

    return SyntheticIdentities(**data_cfg.synthetic_kwargs())


def suites_from_config(cfg) -> list[Suite]:
    """The suites a run config asks for (``eval`` section), in the order training runs them."""
    ev = cfg.eval
    suites: list[Suite] = []
    if cfg.data.source == "synthetic" and ev.synthetic_pairs > 0:
        suites.append(SyntheticSuite(
            synthetic_dataset(cfg.data), pairs=ev.synthetic_pairs,
            identities=min(ev.identification_identities, cfg.data.heldout_identities)))
    suites += [BinSuite(path) for path in ev.bin_files]
    suites += [parse_suite(entry, f"eval.suites[{i}]") for i, entry in enumerate(ev.suites)]
    return suites


def eval_context(cfg, device) -> EvalContext:
    """How training embeds images for its evaluations (the command line's defaults differ)."""
    return EvalContext(device=device, batch_size=cfg.eval.batch_size,
                       image_size=cfg.eval.image_size or cfg.data.image_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pm_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="pm_dist encoder file, insightface backbone.pth (with --arch), .onnx, or a "
                        "checkpoint directory (step_N/, or a run's checkpoints/: the newest)")
    p.add_argument("--arch", help="architecture of a bare state dict (insightface backbone.pth); "
                                  "insightface names r18, r34, r50, r100, mbf accepted")
    p.add_argument("--embedding-size", type=int, default=512, help="for a bare state dict (default 512)")
    p.add_argument("--image-size", type=int, help="input size; read from the model file when it says")
    p.add_argument("--bin", nargs="+", default=[], metavar="FILE", help="insightface .bin verification sets")
    p.add_argument("--pairs", help="pair list 'a b label' (image paths, or template ids with --templates)")
    p.add_argument("--templates", help="template list 'image template [media]'")
    p.add_argument("--gallery", help="gallery subject list 'template subject' (needs --templates, --probes)")
    p.add_argument("--probes", help="probe subject list 'template subject'")
    p.add_argument("--root", help="folder image paths in lists are relative to (default: the list's folder)")
    p.add_argument("--synthetic", action="store_true",
                   help="evaluate on the synthetic held-out identities (settings of --config, else "
                        "the default synthetic data)")
    p.add_argument("--synthetic-seed", type=int, help="dataset seed (default: --config's, else 0)")
    p.add_argument("--synthetic-pairs", type=int, default=600)
    p.add_argument("--synthetic-identities", type=int, default=200, help="identities in the 1:N split")
    p.add_argument("--config", help="a run's config.yaml: run the suites its training ran, built "
                                    "from the same settings (and its synthetic data for --synthetic)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers your evaluation suites)")
    p.add_argument("--suite", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE]",
                   help="a registered suite and its options, e.g. --suite pairs pairs=p.txt")
    p.add_argument("--batch-size", type=int, help="default: --config's eval.batch_size, else 64")
    p.add_argument("--no-flip", action="store_true", help="embed images only once (no mirrored copy)")
    p.add_argument("--tar-method", choices=TAR_METHODS, default="nearest",
                   help="how TAR@FAR reads the ROC (default: nearest, insightface's IJB convention)")
    p.add_argument("--device", help="default: this rank's GPU under torchrun, else cuda if available, else cpu")
    p.add_argument("--out", default="eval_out", help="report folder (default eval_out)")
    return p


def suites_from_args(args: argparse.Namespace, image_size: int) -> list[Suite]:
    """The suites the command line asks for, in the order of the report (``image_size``: the
    model's input size, that of the synthetic images when no run config says otherwise)."""
    run_cfg = _load_run_config(args.config) if args.config else None
    suites: list[Suite] = suites_from_config(run_cfg) if run_cfg is not None else []
    suites += [BinSuite(path) for path in args.bin]
    if args.pairs:
        suites.append(PairListSuite(args.pairs, args.templates, args.root))
    if args.gallery:
        suites.append(IdentificationListSuite(args.templates, args.gallery, args.probes, args.root))
    if args.synthetic and not any(isinstance(s, SyntheticSuite) for s in suites):
        from .data.config import DataConfig

        data = run_cfg.data if run_cfg is not None else DataConfig(image_size=image_size)
        if args.synthetic_seed is not None:
            data.seed = args.synthetic_seed
        suites.append(SyntheticSuite(synthetic_dataset(data), pairs=args.synthetic_pairs,
                                     identities=min(args.synthetic_identities,
                                                    data.heldout_identities)))
    for i, (name, *options) in enumerate(args.suite):
        entry = {"name": name}
        for text in options:
            keys, value = parse_override(text)
            entry[".".join(keys)] = value
        suites.append(parse_suite(entry, f"--suite[{i}]"))
    return suites


def _load_run_config(path: str):
    from .config import load_config

    return load_config(path)


def run(args: argparse.Namespace) -> list[dict]:
    """Every requested evaluation, in order; the same list on every rank."""
    from .models.loading import load_model

    load_plugins(args.plugin)
    env = init_distributed()
    device = args.device or env.device
    model, size = load_model(args.model, device, args.image_size, args.arch, args.embedding_size)
    suites = suites_from_args(args, size)
    batch_size = args.batch_size or (_load_run_config(args.config).eval.batch_size if args.config
                                     else 64)
    ctx = EvalContext(device=device, batch_size=batch_size, image_size=size,
                      flip=not args.no_flip, tar_method=args.tar_method)
    return run_suites(model, suites, ctx)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gallery and not (args.probes and args.templates):
        parser.error("--gallery needs --probes and --templates")
    if args.probes and not args.gallery:
        parser.error("--probes needs --gallery")
    if not (args.bin or args.pairs or args.gallery or args.synthetic or args.config or args.suite):
        parser.error("nothing to evaluate: give --bin, --pairs, --gallery/--probes, --synthetic, "
                     "--suite or --config")

    from .eval.report import write_report

    failure = None
    try:
        results = run(args)
    except (BinFormatError, ListFormatError, ImageDecodeError, EmbeddingError, FileNotFoundError,
            ConfigError, PluginError, ValueError, CheckpointError) as exc:  # bad input: one clear line, not a traceback
        failure = (f"error: {exc}", isinstance(exc, EmbeddingError))  # that one: every rank's
    if failure is not None:
        return exit_on_error(*failure)
    write_report(results, args.out)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

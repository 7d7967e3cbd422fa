"""``python -m pm_dist.data.convert``: build an Arrow dataset, or verify one.

    python -m pm_dist.data.convert rec  /data/ms1m/train.rec --out /data/ms1m-arrow --workers 8
    python -m pm_dist.data.convert folder /data/faces --out /data/faces-arrow
    python -m pm_dist.data.convert synthetic --num-identities 10000 --image-size 112 --out /data/syn
    python -m pm_dist.data.convert verify /data/ms1m-arrow [--decode]

Rerunning an interrupted conversion with the same arguments continues it (see ``to_arrow.py``).
Exit status: 0 done, 1 verification found problems or bad input stopped the conversion, 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .to_arrow import convert_dataset
from .errors import DataError
from .raw_sources import FolderSource, RecSource, SyntheticSource
from .synthetic import SyntheticIdentities
from .verify import verify_dataset


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--shard-rows", type=int, default=10_000, help="images per shard")
    p.add_argument("--on-bad", choices=("error", "skip"), default="error",
                   help="bad input: stop with an error naming it, or leave it out and list it")
    p.add_argument("--no-decode-check", action="store_true",
                   help="parse image headers only instead of decoding every image once")
    p.add_argument("--max-shards", type=int, default=None,
                   help="write at most this many shards now (rerun to continue)")
    p.add_argument("--overwrite", action="store_true", help="discard what OUT holds and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pm_dist.data.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rec", help="insightface train.rec/train.idx (no mxnet needed)")
    p.add_argument("rec", help="path of train.rec")
    p.add_argument("--idx", default=None, help="path of train.idx (default: beside the .rec)")
    p.add_argument("--num-identities", type=int, default=None,
                   help="number of identities (default: the 'property' file, else the header)")
    _common(p)
    p = sub.add_parser("folder", help="one folder per identity, images inside")
    p.add_argument("root")
    _common(p)
    p = sub.add_parser("synthetic", help="the built-in synthetic identities")
    p.add_argument("--num-identities", type=int, required=True)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoding", choices=("png", "jpeg"), default="png")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    _common(p)
    p = sub.add_parser("verify", help="check a converted dataset (checksums, labels, optionally decoding)")
    p.add_argument("path")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--workers", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "verify":
        report = verify_dataset(args.path, decode=args.decode, workers=args.workers)
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        print(f"{args.path}: {report.shards_checked} shards, {report.rows_checked} rows checked, "
              f"{len(report.problems)} problems")
        return 0 if report.ok else 1
    try:
        if args.command == "rec":
            source = RecSource(args.rec, args.idx, args.num_identities)
        elif args.command == "folder":
            source = FolderSource(args.root)
        else:
            source = SyntheticSource(SyntheticIdentities(args.num_identities, args.image_size, args.seed),
                                     encoding=args.encoding, quality=args.quality)
        report = convert_dataset(
            source, args.out, workers=args.workers, shard_rows=args.shard_rows, policy=args.on_bad,
            decode_check=not args.no_decode_check, max_shards=args.max_shards,
            overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty(),
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "complete" if report.complete else "partial (rerun the same command to continue)"
    print(f"{report.out}: {state}; {report.num_identities} identities, {report.num_images} images, "
          f"{report.num_skipped} skipped, {report.shards_written}/{report.shards_total} shards written now")
    return 0


if __name__ == "__main__":
    sys.exit(main())

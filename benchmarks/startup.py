"""Start-up cost at many identities: opening the dataset, choosing and verifying the checkpoint,
and loading one rank's head shard, each next to what it cost before (the numbers go to
docs/launch.md, "Start-up cost"):

    python -m benchmarks.startup [--identities 10000000] [--world 8] [--dim 128]
        [--capacity-fraction 0.1] [--dir /tmp/pm_dist_startup] [--out startup.json]

* **dataset**: an Arrow dataset of N identities (its identity table; the image shard is a sparse
  file, never read at start-up) opened with ``ArrowDataset``: names stay in the memory-mapped
  Arrow column; the old way turned them into a Python list (``to_pylist``), timed beside it.
* **verify**: a Prototype Memory checkpoint of W shards (capacity = fraction × N slots of D fp32
  values), verified once (rank 0) with parallel hashing, against serial hashing (what every rank
  used to do, W times over).
* **head load**: one rank at the same world size loads its shard through the checkpoint's lazy
  ``ShardFiles`` (files opened counted) vs. reading every shard file (what every rank used to do).

Times are wall-clock seconds on this machine, RSS deltas in MiB (``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn):
    r0, t0 = rss_mib(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, rss_mib() - r0


def make_dataset(path: Path, n: int) -> None:
    import pyarrow as pa

    from pm_dist.data.arrow_format import IDENTITIES, MANIFEST, FORMAT, VERSION, write_identities

    path.mkdir(parents=True, exist_ok=True)
    counts = np.full(n, 2, np.int64)
    starts = np.arange(n, dtype=np.int64) * 2
    names = pa.array([f"n{i:09d}" for i in range(n)], pa.string())
    write_identities(str(path / IDENTITIES), counts, starts, names)
    shard_bytes = 1 << 30
    with open(path / "shard_00000.arrow", "wb") as f:  # sparse: start-up only checks its size
        f.truncate(shard_bytes)
    manifest = {"format": FORMAT, "version": VERSION, "num_identities": n, "num_images": 2 * n,
                "image_size": None, "source": {"kind": "benchmark"}, "skipped": [],
                "num_skipped": 0,
                "shards": [{"file": "shard_00000.arrow", "rows": 2 * n, "first_row": 0,
                            "bytes": shard_bytes, "sha256": ""}]}
    (path / MANIFEST).write_text(json.dumps(manifest))


def bench_dataset(path: Path) -> dict:
    import pyarrow as pa

    from pm_dist.data.arrow_format import IDENTITIES
    from pm_dist.data.datasets import ArrowDataset

    ds, t_open, rss_open = timed(lambda: ArrowDataset(str(path)))
    name = ds._identity_name(ds.num_classes - 1)
    del ds

    def old_way():
        with pa.memory_map(str(path / IDENTITIES), "r") as mm:
            return pa.ipc.open_file(mm).read_all().column("name").to_pylist()

    names, t_list, rss_list = timed(old_way)
    del names
    return {"open_s": t_open, "open_rss_mib": rss_open, "example": name,
            "names_to_list_s": t_list, "names_to_list_rss_mib": rss_list}


def _as_rank(rank: int, world: int):
    import pm_dist.heads.memory as mem
    mem.get_rank = lambda group=None: rank
    mem.get_world_size = lambda group=None: world


def make_checkpoint(path: Path, n: int, world: int, dim: int, capacity: int) -> dict:
    import torch

    from pm_dist.checkpoint import FORMAT, _hash_many
    from pm_dist.heads.margin import Margin
    from pm_dist.heads.memory import MemoryConfig, PrototypeMemory

    path.mkdir(parents=True, exist_ok=True)
    cfg = MemoryConfig(capacity=capacity, num_classes=n)
    for r in range(world):
        _as_rank(r, world)
        state = PrototypeMemory(dim, cfg, Margin()).shard_state()
        torch.save({"head": state, "checkpoint_id": "bench"}, path / f"head_rank{r}.pt")
        del state
    files = sorted(p.name for p in path.glob("head_rank*.pt"))
    digests = _hash_many([path / f for f in files])
    meta = {"format": FORMAT, "version": 2, "step": 1, "id": "bench", "parent": None,
            "world_size": world, "head": "prototype_memory",
            "files": {f: {"bytes": (path / f).stat().st_size, "sha256": h}
                      for f, h in zip(files, digests)}}
    (path / "meta.json").write_text(json.dumps(meta))
    return meta


def bench_checkpoint(path: Path, meta: dict, world: int, dim: int, capacity: int, n: int) -> dict:
    import pm_dist.training.checkpoints as manager_mod
    from pm_dist.checkpoint import load_file, read_meta
    from pm_dist.files import sha256_file
    from pm_dist.heads.margin import Margin
    from pm_dist.heads.memory import MemoryConfig, PrototypeMemory

    total = sum(f["bytes"] for f in meta["files"].values())
    _, t_parallel, _ = timed(lambda: read_meta(path, verify=True))
    _, t_serial, _ = timed(lambda: [sha256_file(path / f) for f in meta["files"]])

    opened = []
    real = manager_mod.load_file
    manager_mod.load_file = lambda p: (opened.append(Path(p).name), real(p))[1]
    rank = world // 2
    _as_rank(rank, world)
    head = PrototypeMemory(dim, MemoryConfig(capacity=capacity, num_classes=n), Margin())
    _, t_load, rss_load = timed(lambda: head.load_shards(
        manager_mod.CheckpointManager.head_shards(path, meta)))
    manager_mod.load_file = real
    del head

    def every_file():
        return [load_file(path / f"head_rank{r}.pt") for r in range(world)]

    states, t_all, rss_all = timed(every_file)
    del states
    return {"checkpoint_mib": total / 2**20, "files": len(meta["files"]),
            "verify_once_parallel_s": t_parallel, "verify_serial_s": t_serial,
            "verify_before_total_s": t_serial * world,
            "rank_load_s": t_load, "rank_load_rss_mib": rss_load, "rank_files_opened": opened,
            "before_every_file_s": t_all, "before_every_file_rss_mib": rss_all}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--identities", type=int, default=10_000_000)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--capacity-fraction", type=float, default=0.1)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="pm_dist_startup_"))
    n, world, dim = args.identities, args.world, args.dim
    capacity = int(n * args.capacity_fraction)
    t0 = time.perf_counter()
    make_dataset(scratch / "data", n)
    meta = make_checkpoint(scratch / "ckpt", n, world, dim, capacity)
    print(f"set-up ({n:,} identities, {world} shards of {capacity // world:,} × {dim}): "
          f"{time.perf_counter() - t0:.1f} s in {scratch}", flush=True)
    result = {"identities": n, "world": world, "dim": dim, "capacity": capacity,
              "cpus": os.cpu_count(), "dataset": bench_dataset(scratch / "data"),
              "checkpoint": bench_checkpoint(scratch / "ckpt", meta, world, dim, capacity, n)}
    d, c = result["dataset"], result["checkpoint"]
    print(f"dataset open: {d['open_s']:.2f} s, +{d['open_rss_mib']:.0f} MiB "
          f"(names as a Python list, before: {d['names_to_list_s']:.2f} s, "
          f"+{d['names_to_list_rss_mib']:.0f} MiB)")
    print(f"verify {c['checkpoint_mib']:.0f} MiB in {c['files']} files once: "
          f"{c['verify_once_parallel_s']:.2f} s parallel, {c['verify_serial_s']:.2f} s serial "
          f"(before: every rank, {world} × {c['verify_serial_s']:.2f} s of reads)")
    print(f"rank {world // 2} head load: {c['rank_load_s']:.2f} s, +{c['rank_load_rss_mib']:.0f} "
          f"MiB, files {c['rank_files_opened']} (before: every file, {c['before_every_file_s']:.2f}"
          f" s, +{c['before_every_file_rss_mib']:.0f} MiB)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

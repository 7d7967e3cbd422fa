"""End-to-end training throughput: images/s of the steps the trainer runs, and where the time goes.

Each case is a real run's parts (``pm_dist.train.Trainer``: loader, DeepSpeed encoder, gathered
head, optimizers) stepped by the same ``TrainStep`` the trainer calls, with a ``StepTimer`` around
its sections (loader, encoder forward, gather + head forward, backward, optimizer steps). Every
case runs under torchrun at its world size; the script launches them one after another and prints
one table, so the rows are measured on the same machine in one sitting:

    python -m benchmarks.train_throughput [--worlds 1 2] [--identities 10000 100000000]
        [--heads prototype_memory] [--steps 40] [--warmup 5] [--out train_throughput.json]
        [--full]                      # 200 timed steps, image size 56
        [--device cuda --precision bf16 --model r50 --image-size 112]   (on a GPU machine)

Besides images/s it records start-up time (building every part, the head's per-identity table
included) and each rank's peak RSS (CUDA: peak allocated), so a row at 10⁸ identities shows that the
whole system, not only the head, does not grow with N beyond the head's stated bytes per identity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("data", "encoder forward", "gather + head forward", "backward", "optimizer steps")


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(args) -> None:
    """One case, on every rank under torchrun; rank 0 writes the JSON line to ``args.result``."""
    import torch

    from pm_dist.config import load_config
    from pm_dist.distributed import all_reduce_, init_distributed
    from pm_dist.train import Trainer
    from pm_dist.training.timing import StepTimer

    torch.set_num_threads(args.threads)
    [identities] = args.identities  # one case: one N
    overrides = [
        f"run.out_dir={args.out_dir}", "run.progress=false", "run.log_every=0",
        f"model.name={args.model}", f"data.image_size={args.image_size}",
        f"data.num_identities={identities}", f"head.name={args.head}",
        f"batch.classes_per_batch={args.classes}", f"batch.images_per_class={args.per_class}",
        f"head.memory.capacity={args.capacity}", f"deepspeed.precision={args.precision}",
        f"run.steps={args.warmup + args.steps}", "eval.synthetic_pairs=0",
        f"data.num_workers={args.workers}", "run.checkpoint_every=0",
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s, single_process_group=True)
    trainer = Trainer(cfg, env)
    startup = time.perf_counter() - start
    timer = StepTimer(env.device)
    trainer.train_step.timer = timer
    batches = iter(trainer.loader)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timer.reset()
            began = time.perf_counter()
        with timer.section("data"):
            images, labels = next(batches)
        trainer.train_step(images, labels)
    elapsed = time.perf_counter() - began
    trainer.loader.close()
    per_rank = torch.tensor([elapsed, _peak_memory_mb(env.device)], dtype=torch.float64)
    all_reduce_(per_rank, torch.distributed.ReduceOp.MAX)
    if env.is_main:
        images_per_s = args.steps * cfg.batch.global_batch / float(per_rank[0])
        row = {"head": args.head, "world_size": env.world_size, "identities": identities,
               "images_per_s": images_per_s, "seconds_per_step": float(per_rank[0]) / args.steps,
               "startup_s": startup, "peak_memory_mb_max_rank": float(per_rank[1]),
               "share": {k: timer.seconds.get(k, 0.0) / elapsed for k in SECTIONS},
               "global_batch": cfg.batch.global_batch, "model": args.model,
               "image_size": args.image_size, "precision": args.precision,
               "device": str(env.device), "steps": args.steps}
        Path(args.result).write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def _launch(case: dict, common: argparse.Namespace, out_dir: str) -> dict:
    result = Path(out_dir) / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={case['world']}", "-m",
           "benchmarks.train_throughput", "--case", "--result", str(result),
           "--out-dir", out_dir, "--head", case["head"], "--identities", str(case["identities"])]
    for name in ("steps", "warmup", "model", "image_size", "classes", "per_class", "capacity",
                 "precision", "workers", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(common, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(common.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def _table(rows: list[dict]) -> str:
    lines = ["| head | W | identities | img/s | s/step | start-up s | peak MB/rank | "
             + " | ".join(SECTIONS) + " |",
             "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in SECTIONS) + " |"]
    for r in rows:
        shares = " | ".join(f"{100 * r['share'][k]:.0f} %" for k in SECTIONS)
        lines.append(f"| {r['head']} | {r['world_size']} | {r['identities']:.0e} | "
                     f"{r['images_per_s']:.0f} | {r['seconds_per_step']:.3f} | {r['startup_s']:.1f} | "
                     f"{r['peak_memory_mb_max_rank']:.0f} | {shares} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--identities", type=int, nargs="+", default=[10_000, 100_000_000])
    p.add_argument("--heads", nargs="+", default=["prototype_memory"])
    p.add_argument("--head", default="prototype_memory", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--model", default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=64, help="identities per global batch (P)")
    p.add_argument("--per-class", type=int, default=2, help="images per identity (K)")
    p.add_argument("--capacity", type=int, default=4096, help="memory capacity (prototypes)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--workers", type=int, default=1, help="loader worker processes per rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--full", action="store_true", help="200 timed steps at image size 56")
    p.add_argument("--out", default="train_throughput.json")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        run_case(args)
        return 0
    if args.full:
        args.steps, args.image_size = 200, 56
    rows = []
    for head in args.heads:
        for n in args.identities:
            for world in args.worlds:
                with tempfile.TemporaryDirectory() as tmp:
                    row = _launch({"head": head, "identities": n, "world": world}, args, tmp)
                rows.append(row)
                print(f"{head} W={world} N={n:.0e}: {row['images_per_s']:.0f} img/s, "
                      f"start-up {row['startup_s']:.1f} s, peak {row['peak_memory_mb_max_rank']:.0f} MB",
                      flush=True)
    # side by side: each row against the same head and world size at the smallest N
    for r in rows:
        base = min((b for b in rows if b["head"] == r["head"] and b["world_size"] == r["world_size"]),
                   key=lambda b: b["identities"])
        r["time_vs_smallest_n"] = r["seconds_per_step"] / base["seconds_per_step"]
        r["memory_vs_smallest_n_mb"] = r["peak_memory_mb_max_rank"] - base["peak_memory_mb_max_rank"]
    print(_table(rows))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version()}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

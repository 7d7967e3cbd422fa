"""Doppelganger mining off vs on at equal steps: held-out verification accuracy per head and seed.

Each run is the real trainer (``pm_dist.train.Trainer``) in one process (a one-rank gloo group) on
synthetic identities with planted look-alike pairs; evaluation is the synthetic held-out pairs
suite, whose held-out identities carry planted look-alikes too. Reports, per head and seed,
accuracy with mining off and on (f = ``--fraction``), the table's planted-pair recovery and the last
steps' mined share and loss, then the mean per head. Every number is printed, whichever way it goes.

    python -m benchmarks.mining_accuracy                       # all heads, seeds 0 1 (CPU: minutes)
    python -m benchmarks.mining_accuracy --heads prototype_memory --steps 300 \
        --out bench_out/mining.json
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _overrides(args, head: str, seed: int, mining: bool, out_dir: str) -> list[str]:
    return [
        f"run.out_dir={out_dir}", f"run.seed={seed}", f"data.seed={seed}",
        f"run.steps={args.steps}",
        "run.progress=false", "run.log_every=0", "run.checkpoint_every=0",
        "data.num_workers=0", f"data.image_size={args.image_size}",
        f"data.num_identities={args.identities}", "data.heldout_identities=300",
        "data.count_median=8", f"data.doppelganger_fraction={args.doppelganger_fraction}",
        "model.embedding_size=64", f"batch.classes_per_batch={args.P}", "batch.images_per_class=2",
        f"head.name={head}", f"head.memory.capacity={args.capacity}",
        "head.partial_fc.sample_rate=0.3", "optim.lr=0.2", "optim.warmup_steps=10",
        f"eval.synthetic_pairs={args.pairs}", "eval.identification_identities=100",
        f"mining.enabled={mining}", f"mining.fraction={args.fraction}", "mining.delay=0",
    ]


def run_one(args, head: str, seed: int, mining: bool) -> dict:
    from pm_dist.config import load_config
    from pm_dist.distributed import init_distributed
    from pm_dist.mining import planted_recovery
    from pm_dist.train import Trainer

    out_dir = os.path.join(args.work, f"{head}-s{seed}-{'on' if mining else 'off'}")
    cfg = load_config(None, _overrides(args, head, seed, mining, out_dir))
    tick = time.perf_counter()
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    result = trainer.fit()
    res = {"head": head, "seed": seed, "mining": mining, "seconds": time.perf_counter() - tick}
    for r in result["eval"]:
        if r.get("kind") == "verification":
            res["accuracy"] = r["accuracy"]
    late = trainer.history[-max(1, args.steps // 4):]
    res["loss_late"] = sum(h["loss"] for h in late) / len(late)
    if trainer.miner is not None:
        pairs = trainer.loader.dataset.generator.doppelganger_pairs()
        res["recovery"] = planted_recovery(trainer.miner.table, pairs)["recovered"]
        res["share_mined"] = sum(h["mining/share_mined"] for h in late) / len(late)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", nargs="+", default=["prototype_memory", "full_fc", "partial_fc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--P", type=int, default=32)
    p.add_argument("--identities", type=int, default=400)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--doppelganger-fraction", type=float, default=0.5)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--work", default="bench_out/mining_runs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    for head in args.heads:
        for seed in args.seeds:
            for mining in (False, True):
                r = run_one(args, head, seed, mining)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'head':<18}{'seed':>5}{'acc off':>9}{'acc on':>9}{'Δ':>8}{'loss off':>10}"
          f"{'loss on':>9}{'recovered':>10}{'mined':>7}")
    for head in args.heads:
        deltas = []
        for seed in args.seeds:
            off, on = (next(r for r in rows if (r["head"], r["seed"], r["mining"]) == (head, seed, m))
                       for m in (False, True))
            d = on["accuracy"] - off["accuracy"]
            deltas.append(d)
            print(f"{head:<18}{seed:>5}{off['accuracy']:>9.4f}{on['accuracy']:>9.4f}{d:>+8.4f}"
                  f"{off['loss_late']:>10.3f}{on['loss_late']:>9.3f}{on['recovery']:>10.3f}"
                  f"{on['share_mined']:>7.2f}")
        print(f"{head:<18}{'mean':>5}{'':>18}{sum(deltas) / len(deltas):>+8.4f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

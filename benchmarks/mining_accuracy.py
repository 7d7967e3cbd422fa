"""Doppelganger mining off vs on at equal steps: held-out verification accuracy per head and seed.

Each run is the real trainer (``pm_dist.train.Trainer``) in one process (a one-rank gloo group) on
synthetic identities with planted look-alike pairs. Evaluated on held-out identities (disjoint from
training; half of them in planted look-alike pairs too):

* ``acc``: the run's synthetic verification suite (``eval.synthetic_pairs`` pairs, negatives drawn
  at random), 10-fold accuracy;
* ``twins``: the same protocol on ``--pairs`` pairs whose negatives are all planted look-alikes
  (``verification_pairs(hard_fraction=1)``): what mining is meant to help;
* ``rank1``: the suite's 1:N identification rank-1.

Per head and seed: mining off (f = 0, no miner) and on at each fraction of ``--fractions`` (and, for
Prototype Memory only, of ``--pm-fractions``), at equal steps; the table's planted-pair recovery,
the last quarter's mined share and training loss, and each run's time. Then the mean difference per
head and f, next to the spread between seeds. Every number is printed, whichever way it goes.

    python -m benchmarks.mining_accuracy                       # all heads, seeds 0 1 (CPU: minutes)
    python -m benchmarks.mining_accuracy --heads prototype_memory --steps 300 \
        --out bench_out/mining.json
    python -m benchmarks.mining_accuracy --heads prototype_memory --identities 120 --capacity 128 \
        --steps 300 --extra data.doppelganger_distance=0.05 data.nuisance=0.25   # any config key

One torch thread per run by default (``--threads``): on a small shared CPU, more threads than free
cores made these tiny steps 10–40× slower (OpenMP threads waiting on each other).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.common import eval_scores, machine


def _overrides(args, head: str, seed: int, fraction: float, out_dir: str) -> list[str]:
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
        f"mining.enabled={fraction > 0}", f"mining.fraction={fraction or 0.5}", "mining.delay=0",
        *args.extra,
    ]


def _twins_accuracy(args, trainer) -> float:
    """Verification accuracy on held-out pairs whose negatives are all planted look-alikes."""
    import torch

    from pm_dist.eval.verification import VerificationSet, evaluate_verification

    gen = trainer.loader.dataset.generator
    images, issame = gen.verification_pairs(args.pairs, seed=1, hard_fraction=1.0)
    model = trainer.engine.module
    model.eval()
    with torch.no_grad():
        r = evaluate_verification(model, VerificationSet.from_arrays("synthetic-twins", images,
                                                                     issame))
    return r["accuracy"]


def run_one(args, head: str, seed: int, fraction: float) -> dict:
    """One run; ``fraction`` 0: mining off (no miner at all)."""
    from pm_dist.config import load_config
    from pm_dist.distributed import init_distributed
    from pm_dist.mining import encoder_recovery, planted_recovery
    from pm_dist.train import Trainer

    out_dir = os.path.join(args.work, f"{head}-s{seed}-f{fraction:g}")
    cfg = load_config(None, _overrides(args, head, seed, fraction, out_dir))
    tick = time.perf_counter()
    trainer = Trainer(cfg, init_distributed(), record_history=True)
    result = trainer.fit()
    res = {"head": head, "seed": seed, "fraction": fraction, "mining": fraction > 0,
           "train_eval_seconds": time.perf_counter() - tick,
           # what the head ran with, so a result file stays readable after a default changes
           "head_options": _head_options(cfg)}
    res.update(eval_scores(result["eval"]))
    res["twins"] = _twins_accuracy(args, trainer)
    res["seconds"] = time.perf_counter() - tick
    late = trainer.history[-max(1, args.steps // 4):]
    res["loss_late"] = sum(h["loss"] for h in late) / len(late)
    if trainer.miner is not None:
        gen = trainer.loader.dataset.generator
        pairs = gen.doppelganger_pairs()
        res["recovery"] = planted_recovery(trainer.miner.table, pairs)["recovered"]
        # the reference: twins the final encoder finds by nearest class mean
        res["encoder_recovery"] = encoder_recovery(trainer.engine.module, gen, pairs)["recovered"]
        res["share_mined"] = sum(h["mining/share_mined"] for h in late) / len(late)
    return res


def _head_options(cfg) -> dict:
    """The margin, the head learning-rate scale and the head's own options, as plain values."""
    import dataclasses

    options = cfg.head.options
    return {"margin": dataclasses.asdict(cfg.head.margin), "lr_scale": cfg.head.lr_scale,
            **(dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {})}


def _write(args, rows, seconds):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": machine(), "seconds": seconds, "runs": rows}, f,
                  indent=1)


def summary(rows, heads, seeds) -> str:
    """Per run, then per (head, f): mean on − off per metric and the seed spread (max − min) of
    the off runs' value, to compare the difference with."""
    keys = ("accuracy", "twins", "rank1")
    rows = sorted(rows, key=lambda r: (heads.index(r["head"]), r["seed"], r["fraction"]))
    lines = [f"{'head':<18}{'seed':>5}{'f':>6}{'acc':>8}{'twins':>8}{'rank1':>8}{'loss':>8}"
             f"{'recov':>7}{'enc':>7}{'mined':>7}{'s':>6}"]
    for r in rows:
        lines.append(f"{r['head']:<18}{r['seed']:>5}{r['fraction']:>6g}{r['accuracy']:>8.4f}"
                     f"{r['twins']:>8.4f}{r.get('rank1', float('nan')):>8.2f}{r['loss_late']:>8.2f}"
                     f"{r.get('recovery', float('nan')):>7.3f}"
                     f"{r.get('encoder_recovery', float('nan')):>7.3f}"
                     f"{r.get('share_mined', float('nan')):>7.2f}"
                     f"{r['seconds']:>6.0f}")
    lines.append("")
    lines.append(f"{'head':<18}{'f':>6}" + "".join(f"{'Δ' + k:>10}{'spread':>8}" for k in keys))
    for head in heads:
        fs = sorted({r["fraction"] for r in rows if r["head"] == head and r["fraction"] > 0})
        off = {r["seed"]: r for r in rows if r["head"] == head and r["fraction"] == 0}
        for f in fs:
            on = {r["seed"]: r for r in rows if r["head"] == head and r["fraction"] == f}
            both = [s for s in seeds if s in on and s in off]
            if not both:
                continue
            line = f"{head:<18}{f:>6g}"
            for k in keys:
                d = [on[s].get(k, float("nan")) - off[s].get(k, float("nan")) for s in both]
                base = [off[s].get(k, float("nan")) for s in both]
                line += f"{sum(d) / len(d):>+10.4f}{max(base) - min(base):>8.4f}"
            lines.append(line)
    return "\n".join(lines)


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
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5],
                   help="mining fractions f to run (each against the same mining-off run)")
    p.add_argument("--pm-fractions", nargs="*", type=float, default=[],
                   help="further fractions for prototype_memory only")
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run (e.g. data.doppelganger_distance=0.05)")
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
    torch.set_num_threads(args.threads)

    # the comparison of every head first, the further Prototype Memory fractions last
    plan = [(h, s, f) for h in args.heads for s in args.seeds
            for f in [0.0] + [f for f in dict.fromkeys(args.fractions) if f > 0]]
    if "prototype_memory" in args.heads:
        plan += [("prototype_memory", s, f) for f in dict.fromkeys(args.pm_fractions)
                 if f > 0 and f not in args.fractions for s in args.seeds]

    rows, begin = [], time.perf_counter()
    for head, seed, f in plan:
        r = run_one(args, head, seed, f)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.out:  # partial results survive an interrupted sweep
            _write(args, rows, time.perf_counter() - begin)
    total = time.perf_counter() - begin
    print(f"\nall runs: {total:.0f} s")
    print(summary(rows, args.heads, args.seeds))
    if args.out:
        _write(args, rows, total)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

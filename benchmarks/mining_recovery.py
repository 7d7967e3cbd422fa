"""How much of what the embeddings say about look-alikes the doppelganger table recovers.

One process, the synthetic identities of ``tests/test_mining.py``'s recovery test (120 training
identities, half in planted look-alike pairs at 0.1 of their independent distance, nuisance 0.25,
a memory of 128 for every identity, 16 × 2 per batch), for each ``--steps`` × ``--fractions`` ×
``--seeds``. After training it reports, for the planted identities:

* ``table``: share whose table partner is the twin (``pm_dist.mining.planted_recovery``);
* ``image_vs_memory``: share of their training images whose nearest *other* prototype in the
  final memory is the twin: the per-row signal the table is built from (one step's hardest
  non-target is the same computation against the memory of that step);
* ``image_vs_means``: the same against fresh class means of the final encoder;
* ``class_means``: share whose nearest other class mean is the twin
  (``pm_dist.mining.encoder_recovery``): what the encoder knows, with all its images averaged.

Chance is 1/(N − 1) = 0.0084. ``--extra key=value …`` overrides the setting (e.g. closer twins:
``data.doppelganger_distance=0.05``). ``--out`` writes the rows as JSON.

    PYTHONPATH=$PWD python -m benchmarks.mining_recovery --steps 100 300 --fractions 0 0.5 \
        --seeds 0 1 --out bench_out/mining_recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks.common import machine

CONFIG = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=120",
    "data.heldout_identities=100", "data.count_median=6", "data.nuisance=0.25",
    "data.doppelganger_fraction=0.5", "data.doppelganger_distance=0.1",
    "model.embedding_size=32", "batch.classes_per_batch=16", "batch.images_per_class=2",
    "head.memory.capacity=128", "run.progress=false", "run.log_every=0",
    "run.checkpoint_every=0", "optim.warmup_steps=5", "eval.synthetic_pairs=0",
    "mining.enabled=true", "mining.delay=0",
]


def image_shares(trainer, images_per_identity: int = 8) -> dict:
    """Per training image of a planted identity: is its nearest other prototype (final memory)
    and its nearest other class mean (final encoder) the twin?"""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pm_dist.mining import class_means, embed_identities

    gen = trainer.loader.dataset.generator
    pairs = gen.doppelganger_pairs()
    twin = np.full(gen.num_classes, -1)
    twin[pairs[:, 0]], twin[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    emb, owner = embed_identities(trainer.engine.module, gen, images_per_identity)
    emb = F.normalize(emb)
    classes, class_mean = class_means(emb, owner)
    means = torch.full((gen.num_classes, emb.shape[1]), float("nan"))
    means[torch.from_numpy(classes)] = torch.from_numpy(class_mean).float()
    head = trainer.head
    live = head.slot_class >= 0
    protos = torch.full_like(means, float("nan"))
    protos[head.slot_class[live]] = F.normalize(head.protos[live].float())
    planted = np.flatnonzero(twin[owner.numpy()] >= 0)
    out = {}
    for name, ref in (("image_vs_memory", protos), ("image_vs_means", means)):
        sim = torch.nan_to_num(emb @ ref.t(), nan=-2.0)
        sim[torch.arange(len(emb)), owner] = -2.0  # its own class is no candidate
        nearest = sim.argmax(1).numpy()
        out[name] = float((nearest[planted] == twin[owner.numpy()[planted]]).mean())
    return out


def overrides(steps: int, fraction: float, seed: int, extra=()) -> list[str]:
    """The run's config overrides; ``extra`` last, so it wins over the setting."""
    return CONFIG + [f"run.steps={steps}", f"run.seed={seed}", f"data.seed={seed}",
                     f"mining.fraction={fraction}", *extra]


def run_one(steps: int, fraction: float, seed: int, extra=()) -> dict:
    from pm_dist.config import load_config
    from pm_dist.distributed import init_distributed
    from pm_dist.mining import encoder_recovery, planted_recovery
    from pm_dist.train import Trainer

    out_dir = tempfile.mkdtemp(prefix="pm_recovery_")
    cfg = load_config(None, overrides(steps, fraction, seed, extra) + [f"run.out_dir={out_dir}"])
    trainer = Trainer(cfg, init_distributed(single_process_group=True))
    trainer.fit()
    gen = trainer.loader.dataset.generator
    pairs = gen.doppelganger_pairs()
    table = planted_recovery(trainer.miner.table, pairs)
    return {"steps": steps, "fraction": fraction, "seed": seed, "table": table["recovered"],
            "chance": table["chance"], "planted_identities": 2 * table["pairs"],
            **image_shares(trainer),
            "class_means": encoder_recovery(trainer.engine.module, gen, pairs)["recovered"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5],
                   help="mining.fraction (0: the table is kept but no batch is mined)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29641")
    rows = []
    print(f"{'steps':>6}{'f':>6}{'seed':>5}{'table':>8}{'img/mem':>9}{'img/means':>10}{'means':>8}")
    for steps in args.steps:
        for fraction in args.fractions:
            for seed in args.seeds:
                r = run_one(steps, fraction, seed, args.extra)
                rows.append(r)
                print(f"{steps:>6}{fraction:>6g}{seed:>5}{r['table']:>8.3f}{r['image_vs_memory']:>9.3f}"
                      f"{r['image_vs_means']:>10.3f}{r['class_means']:>8.3f}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

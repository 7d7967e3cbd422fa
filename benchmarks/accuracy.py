"""Held-out accuracy of Prototype Memory, Full FC and Partial FC as the number of identities grows.

Every run is the real trainer (``pm_dist.train.Trainer``, one rank) on the synthetic long-tailed
identities, with the same encoder, batch (P × K), steps and optimizer for every head. Compute per
step is held fixed as N grows: Partial FC samples ``--columns`` classes per step (sample rate
columns / N) and Prototype Memory holds ``--columns`` prototypes; Full FC uses all N columns, the
reference while it fits. Each run reports held-out verification accuracy (10-fold), TAR at FAR 1e-3
and 1e-4, rank-1 identification and the **staleness** of the classifier columns when they are used:

* targets: steps since the row's class column was last pulled towards that class (the class's last
  batch). Prototype Memory's targets are the batch's own prototypes: 0 by construction.
* negatives, "since update": steps since the column last changed. Full FC updates every column
  every step (dense gradient): 0. Partial FC: since the column was last sampled. Prototype Memory:
  since the prototype was last written (its class's last batch).
* negatives, "since positive": steps since the column's class was last in a batch, for all heads.

each split by identity frequency (images per identity: the rarest third, the middle, the most
frequent third).

    python -m benchmarks.accuracy grid   --identities 1e3 1e4 --seeds 0 1     # the comparison
    python -m benchmarks.accuracy tune   --identities 1e3                     # learned heads' sweep
    python -m benchmarks.accuracy report bench_out/accuracy/results.jsonl     # tables, plots

``grid`` and ``tune`` run ``--jobs`` trainings at a time (one process each) and append one JSON line
per finished run to ``--out-dir``/results.jsonl; ``report`` turns such a file into Markdown tables
and PNG plots (accuracy vs N per head; staleness vs frequency per head) with matplotlib.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import eval_scores, machine, pyplot

HEADS = ("prototype_memory", "full_fc", "partial_fc")
LABELS = {"prototype_memory": "Prototype Memory", "full_fc": "Full FC", "partial_fc": "Partial FC"}
BUCKETS = ("rare", "middle", "frequent")


# ---------------------------------------------------------------------------------- one run
def overrides(case: dict) -> list[str]:
    """The trainer's config for one run: the demo's settings at ``identities`` N, plus the
    case's own ``extra`` overrides (tuning knobs, options under test)."""
    n, columns, head = case["identities"], case["columns"], case["head"]
    out = [
        f"run.out_dir={case['out_dir']}", f"run.seed={case['seed']}", f"data.seed={case['seed']}",
        f"run.steps={case['steps']}", "run.progress=false", "run.log_every=0",
        "run.checkpoint_every=0", f"data.num_workers={case['workers']}",
        f"data.num_identities={n}", f"batch.classes_per_batch={case['P']}",
        "batch.images_per_class=2", f"head.name={head}",
        f"eval.synthetic_pairs={case['pairs']}", "eval.identification_identities=200",
    ]
    if head == "prototype_memory":
        out.append(f"head.memory.capacity={min(columns, n)}")
    elif head == "partial_fc":
        out.append(f"head.partial_fc.sample_rate={min(1.0, columns / n):.6g}")
    return out + list(case.get("extra", []))


class Staleness:
    """Per step, the age of the classifier columns the softmax used (see the module docstring),
    accumulated per identity-frequency bucket. Runs as the train step's head observer."""

    def __init__(self, head, counts, chain=None):
        import numpy as np

        self.np, self.head, self.chain = np, head, chain
        n = counts.shape[0]
        edges = np.quantile(counts, [1 / 3, 2 / 3])
        self.bucket = np.digitize(counts, edges, right=True)  # 0 rare, 1 middle, 2 frequent
        self.last_positive = np.full(n, -1, dtype=np.int64)
        self.last_sampled = np.full(n, -1, dtype=np.int64)  # Partial FC's column updates
        self.step = 0
        self.sums = {k: np.zeros((3, 2)) for k in ("target", "negative_update", "negative_positive")}
        self.sampled = None
        if head.__class__.__name__ == "PartialFC":  # which columns each step draws
            original = head._columns

            def columns(labels, local_target):
                weight, ids, target = original(labels, local_target)
                self.sampled = ids.cpu().numpy()
                return weight, ids, target
            head._columns = columns

    def _add(self, key, ages, classes):
        np = self.np
        seen = ages >= 0
        b = self.bucket[classes[seen]]
        self.sums[key][:, 0] += np.bincount(b, weights=ages[seen], minlength=3)
        self.sums[key][:, 1] += np.bincount(b, minlength=3)

    def __call__(self, embeddings, labels, out):
        np, s = self.np, self.step
        lab = labels.cpu().numpy()
        kind = self.head.__class__.__name__
        if kind == "PrototypeMemory":
            self._add("target", np.zeros(lab.shape[0]), lab)
            occupied = self.head.slot_class[self.head.slot_class >= 0].cpu().numpy()
            cols = np.setdiff1d(occupied, lab)  # the memory's other classes: this step's negatives
            ages = np.where(self.last_positive[cols] >= 0, s - self.last_positive[cols], -1)
            self._add("negative_update", ages, cols)
            self._add("negative_positive", ages, cols)
        else:
            pos = self.last_positive[lab]
            self._add("target", np.where(pos >= 0, s - pos, -1), lab)
            cols = (np.arange(self.last_positive.shape[0]) if self.sampled is None
                    else np.setdiff1d(self.sampled, lab))
            if kind == "PartialFC":
                upd = self.last_sampled[cols]
                self._add("negative_update", np.where(upd >= 0, s - upd, -1), cols)
                self.last_sampled[self.sampled] = s
            else:
                self._add("negative_update", np.zeros(cols.shape[0]), cols)
            pos = self.last_positive[cols]
            self._add("negative_positive", np.where(pos >= 0, s - pos, -1), cols)
        self.last_positive[lab] = s
        self.step += 1
        if self.chain is not None:
            self.chain(embeddings, labels, out)

    def result(self) -> dict:
        return {k: {BUCKETS[i]: (v[i, 0] / v[i, 1] if v[i, 1] else None) for i in range(3)}
                for k, v in self.sums.items()}


def run_case(case: dict) -> dict:
    import numpy as np

    from pm_dist.config import load_config
    from pm_dist.distributed import init_distributed
    from pm_dist.train import Trainer

    cfg = load_config(None, overrides(case))
    tick = time.perf_counter()
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s, single_process_group=True)
    trainer = Trainer(cfg, env, record_history=True)
    counts = trainer.loader.dataset.generator.counts(np.arange(case["identities"]))
    step = trainer.train_step
    tracker = Staleness(trainer.head, np.asarray(counts), chain=step.head_observer)
    step.head_observer = tracker
    curve = []  # with run.eval_every (--extra): every evaluation on the way, the last included
    evaluate = trainer.evaluate

    def evaluate_and_record():
        results = evaluate()
        curve.append({"step": trainer.step, **eval_scores(results)})
        return results

    trainer.evaluate = evaluate_and_record
    result = trainer.fit()
    res = {k: case[k] for k in ("head", "identities", "seed", "columns", "steps", "P", "tag",
                                 "extra", "variant")}
    res["seconds"] = time.perf_counter() - tick
    res["device"] = str(env.device)
    res.update(eval_scores(result["eval"]))
    if len(curve) > 1:
        res["curve"] = curve
    late = trainer.history[-max(1, case["steps"] // 10):]
    res["loss_first"] = trainer.history[0]["loss"]
    res["loss_late"] = statistics.fmean(h["loss"] for h in late)
    res["staleness"] = tracker.result()
    return res


# ----------------------------------------------------------------------------------- driver
def launch(cases: list[dict], jobs: int, threads: int, out: Path) -> list[dict]:
    """Run ``cases`` ``jobs`` at a time, one process each; append each result to ``out``."""
    pending, running, done = list(cases), [], []
    tmp = Path(tempfile.mkdtemp(prefix="pm_accuracy_"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # a driver stopped by a time limit (SIGTERM) takes its runs with it; finished ones are kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped: {len(done)} runs finished"))
    try:
        _drive(pending, running, done, jobs, tmp, env, out)
    finally:
        for proc, *_ in running:
            proc.kill()
    return done


def _drive(pending, running, done, jobs, tmp, env, out) -> None:
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            spec = tmp / f"case{id(case)}.json"
            spec.write_text(json.dumps(case))
            log = open(tmp / f"case{id(case)}.log", "w")
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.accuracy", "_case", str(spec)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, case, spec, log))
        time.sleep(0.5)
        for item in list(running):
            proc, case, spec, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            result_path = spec.with_suffix(".result.json")
            if proc.returncode != 0 or not result_path.exists():
                tail = Path(log.name).read_text()[-3000:]
                print(f"FAILED {case['tag']} (exit {proc.returncode}):\n{tail}", flush=True)
                continue
            row = json.loads(result_path.read_text())
            done.append(row)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['tag']}: accuracy {row.get('accuracy', float('nan')):.4f}, "
                  f"rank-1 {row.get('rank1') or float('nan'):.3f}, loss {row['loss_first']:.1f} → "
                  f"{row['loss_late']:.1f}, {row['seconds']:.0f} s", flush=True)


def _head_extra(args, head: str) -> list[str]:
    """``--head-extra HEAD:key=value`` overrides that apply to ``head`` only (e.g. its tuning)."""
    out = []
    for item in args.head_extra:
        name, sep, override = item.partition(":")
        if not sep or name not in HEADS or "=" not in override:
            raise SystemExit(f"--head-extra {item!r}: expected HEAD:key=value, HEAD one of {HEADS}")
        if name == head:
            out.append(override)
    return out


def _cases(args, heads, identities, seeds, variants) -> list[dict]:
    """One case per (seed, N, head, variant), seeds outermost: a run cut short still has seed 0."""
    cases = []
    for seed, n, head in itertools.product(seeds, identities, heads):
        for name, extra in variants(head):
            tag = (f"{head}-N{n:.0e}-s{seed}-t{args.steps}" + (f"-{name}" if name else ""))
            cases.append(dict(head=head, identities=int(n), seed=seed, columns=args.columns,
                              variant=name,
                              steps=args.steps, P=args.P, pairs=args.pairs, workers=args.workers,
                              extra=list(args.extra) + _head_extra(args, head) + list(extra),
                              tag=tag, out_dir=str(Path(args.out_dir) / "runs" / tag)))
    return cases


TUNING = {  # what decides a learned head: its learning-rate scale, its initialization, warm-up
    "lr_scale": ("head.lr_scale", [1.0, 10.0, 100.0]),
    "init_std": ("head.{section}.init_std", [0.01, 1.0]),
    "warmup": ("optim.warmup_steps", [20, 100]),
}


# Prototype Memory's options that matter, one at a time against the defaults (``sweep``)
PM_OPTIONS = [
    ("default", []),
    ("overwrite", ["head.memory.refresh=overwrite"]),
    ("ema0.25", ["head.memory.ema_alpha=0.25"]),
    ("ema0.75", ["head.memory.ema_alpha=0.75"]),
    ("fresh", ["head.memory.positive=fresh"]),
    ("cap1%", ["head.memory.capacity={n1}"]),
    ("cap2.5%", ["head.memory.capacity={n2_5}"]),
    ("cap10%", ["head.memory.capacity={n10}"]),
    ("cap20%", ["head.memory.capacity={n20}"]),
    ("cosface0.25", ["head.margin.m=0.25"]),
    ("cosface0.45", ["head.margin.m=0.45"]),
    ("arcface0.5", ["head.margin.kind=arcface", "head.margin.m=0.5"]),
]


def pm_option_variants(n: int, only: list[str] | None = None):
    shares = {"n1": n // 100, "n2_5": n // 40, "n10": n // 10, "n20": n // 5}
    return lambda head: [(name, [o.format(**shares) for o in opts]) for name, opts in PM_OPTIONS
                         if only is None or name in only]


def tuning_variants(head: str):
    if head == "prototype_memory":
        return [("", [])]
    section = head
    names, values = zip(*[(k.format(section=section), v) for k, v in
                          (TUNING["lr_scale"], TUNING["init_std"], TUNING["warmup"])])
    out = []
    for combo in itertools.product(*values):
        tag = "lr{:g}-init{:g}-wu{:d}".format(*combo)
        out.append((tag, [f"{k}={v}" for k, v in zip(names, combo)]))
    return out


# ----------------------------------------------------------------------------------- report
def _mean_spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _fmt(m, s, digits=3):
    return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _columns(row: dict) -> int:
    """Columns per step: an option that sets the memory's capacity overrides the case's."""
    for opt in row.get("extra") or []:
        if opt.startswith("head.memory.capacity="):
            return int(opt.split("=", 1)[1])
    return row["columns"]


def report(rows: list[dict], machine_line: str = "") -> str:
    """Markdown: per (head, N, variant) the mean over seeds ± half the range; staleness table."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        extra = tuple(([f"base: {r['base']}"] if r.get("base") else []) + list(r.get("extra") or []))
        groups.setdefault((r["head"], r["identities"], r["steps"], r.get("variant") or "", extra),
                          []).append(r)
    lines = [f"Machine: {machine_line}" if machine_line else "",
             "| head | N | steps | columns/step | options | seeds | verification acc. | TAR@FAR=1e-3 | "
             "TAR@FAR=1e-4 | rank-1 | loss first → last | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = sorted(groups.items(), key=lambda kv: (kv[0][3] != "", kv[0][1], kv[0][2], kv[0][0],
                                                   kv[0][3], kv[0][4]))
    for (head, n, steps, variant, extra), rs in order:
        cols = n if head == "full_fc" else min(_columns(rs[0]), n)
        acc = _mean_spread([r.get("accuracy") for r in rs])
        tar3 = _mean_spread([_tar(r, 1e-3) for r in rs])
        tar4 = _mean_spread([_tar(r, 1e-4) for r in rs])
        r1 = _mean_spread([r.get("rank1") for r in rs])
        loss = (statistics.fmean(r["loss_first"] for r in rs), statistics.fmean(r["loss_late"] for r in rs))
        secs = statistics.fmean(r["seconds"] for r in rs)
        lines.append(f"| {LABELS[head]} | {n:.0e} | {steps} | {cols} | {_options(variant, extra)} | "
                     f"{len(rs)} | {_fmt(*acc)} | {_fmt(*tar3)} | {_fmt(*tar4)} | {_fmt(*r1)} | "
                     f"{loss[0]:.1f} → {loss[1]:.1f} | {secs:.0f} |")
    lines += ["", "Staleness of the columns when used (steps; mean over seeds; rare / middle / "
              "frequent identities):", "",
              "| head | N | steps | options | targets | negatives since update | negatives since positive |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for (head, n, steps, variant, extra), rs in order:
        cells = []
        for key in ("target", "negative_update", "negative_positive"):
            per = []
            for b in BUCKETS:
                v = [r["staleness"][key][b] for r in rs if r["staleness"][key][b] is not None]
                per.append(f"{statistics.fmean(v):.0f}" if v else "–")
            cells.append(" / ".join(per))
        lines.append(f"| {LABELS[head]} | {n:.0e} | {steps} | {_options(variant, extra)} | "
                     + " | ".join(cells) + " |")
    curves = [(key, rs) for key, rs in order if any(r.get("curve") for r in rs)]
    if curves:  # runs with evaluations on the way (run.eval_every)
        all_steps = sorted({c["step"] for _, rs in curves for r in rs for c in r.get("curve", [])})
        lines += ["", "Held-out verification accuracy on the way (mean over seeds; rank-1 after /):", "",
                  "| head | N | options | " + " | ".join(f"step {s}" for s in all_steps) + " |",
                  "| --- | --- | --- |" + " --- |" * len(all_steps)]
        for (head, n, steps, variant, extra), rs in curves:
            cells = []
            for s in all_steps:
                at = [c for r in rs for c in r.get("curve", []) if c["step"] == s]
                acc = [c["accuracy"] for c in at if c.get("accuracy") is not None]
                r1 = [c["rank1"] for c in at if c.get("rank1") is not None]
                cells.append(f"{statistics.fmean(acc):.3f} / {statistics.fmean(r1):.2f}"
                             if acc and r1 else "–")
            lines.append(f"| {LABELS[head]} | {n:.0e} | {_options(variant, extra)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _options(variant: str, extra) -> str:
    text = " ".join(f"`{e}`" for e in extra) or "defaults"
    return f"**{variant}**: {text}" if variant else text


def _tar(r, far):
    tar = r.get("tar_at_far") or {}
    for k, v in tar.items():
        if abs(float(k) - far) < far * 1e-6:
            return v
    return None


def plots(rows: list[dict], out_dir: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    written = []
    if not rows:
        return written
    rows = [r for r in rows if not r.get("variant")]  # the grid's runs, not a sweep's
    if not rows:
        return written
    steps = statistics.mode(r["steps"] for r in rows)  # not longer schedules
    rows = [r for r in rows if r["steps"] == steps]
    fig, ax = plt.subplots(figsize=(6, 4))
    for head in HEADS:
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if r["head"] == head and r.get("accuracy") is not None:
                by_n.setdefault(r["identities"], []).append(r["accuracy"])
        if by_n:
            ns = sorted(by_n)
            means = [statistics.fmean(by_n[n]) for n in ns]
            lo = [m - min(by_n[n]) for m, n in zip(means, ns)]
            hi = [max(by_n[n]) - m for m, n in zip(means, ns)]
            ax.errorbar(ns, means, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[head])
    ax.set_xscale("log")
    ax.set_xlabel("identities N")
    ax.set_ylabel("held-out verification accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "accuracy_vs_n.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(str(path))
    ns = sorted({r["identities"] for r in rows})
    if ns:
        n = ns[-1]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
        for ax, key, title in ((axes[0], "target", "targets"),
                               (axes[1], "negative_update", "negatives, since last update")):
            for head in HEADS:
                rs = [r for r in rows if r["head"] == head and r["identities"] == n]
                if not rs:
                    continue
                ys = []
                for b in BUCKETS:
                    v = [r["staleness"][key][b] for r in rs if r["staleness"][key][b] is not None]
                    ys.append(statistics.fmean(v) if v else float("nan"))
                ax.plot(BUCKETS, ys, marker="o", label=LABELS[head])
            ax.set_title(f"{title} (N = {n:.0e})", fontsize=10)
            ax.set_xlabel("identity frequency")
            ax.set_ylabel("steps")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "staleness_vs_frequency.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def machine_text() -> str:
    m = machine()
    return (f"{m['gpu'] + ', ' if m['gpu'] else ''}{m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}")


def _write_report(rows, out_dir: Path, command: str, machine_line: str) -> None:
    table = report(rows, machine_line)
    text = f"`{command}`\n\n{table}\n"
    (out_dir / "accuracy.md").write_text(text)
    print(text)
    for path in plots(rows, out_dir):
        print(f"wrote {path}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_case"]:  # one run, in its own process
        case = json.loads(Path(argv[1]).read_text())
        Path(argv[1]).with_suffix(".result.json").write_text(json.dumps(run_case(case)))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("grid", "tune", "sweep"):
        q = sub.add_parser(mode)
        q.add_argument("--heads", nargs="+", choices=HEADS,
                       default=["prototype_memory"] if mode == "sweep" else list(HEADS))
        q.add_argument("--identities", type=float, nargs="+",
                       default={"grid": [1e3, 1e4, 1e5, 1e6], "tune": [1e3], "sweep": [1e4]}[mode])
        q.add_argument("--seeds", type=int, nargs="+", default=[0] if mode == "tune" else [0, 1])
        q.add_argument("--steps", type=int, default=400)
        q.add_argument("--P", type=int, default=64, help="identities per batch (K = 2 images each)")
        q.add_argument("--columns", type=int, default=500,
                       help="Partial FC's sampled classes and Prototype Memory's capacity")
        q.add_argument("--pairs", type=int, default=3000, help="held-out verification pairs")
        q.add_argument("--workers", type=int, default=0, help="loader processes per run")
        q.add_argument("--jobs", type=int, default=1, help="runs at a time")
        q.add_argument("--threads", type=int, default=1, help="torch threads per run")
        q.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every run")
        q.add_argument("--head-extra", nargs="*", default=[],
                       help="HEAD:key=value overrides for one head's runs (its tuned settings)")
        q.add_argument("--out-dir", default=f"bench_out/accuracy_{mode}")
        if mode == "sweep":
            q.add_argument("--variants", nargs="+", choices=[name for name, _ in PM_OPTIONS],
                           default=None, help="run only these options (default: all)")
        if mode == "grid":
            q.add_argument("--pm-sweep-at", type=float, default=None, metavar="N",
                           help="queue the Prototype Memory option sweep at N after the grid "
                                "(one queue: what matters most runs first)")
    q = sub.add_parser("report")
    q.add_argument("results", nargs="+", help="results.jsonl files")
    q.add_argument("--out-dir", default=None)
    q.add_argument("--machine", default="")
    args = p.parse_args(argv)
    command = "python -m benchmarks.accuracy " + " ".join(argv)
    if args.mode == "report":
        rows = [json.loads(line) for path in args.results for line in Path(path).read_text().splitlines()
                if line.strip()]
        out_dir = Path(args.out_dir or Path(args.results[0]).parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_report(rows, out_dir, command, args.machine)
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "sweep" and len(args.identities) != 1:
        raise SystemExit("sweep: one --identities value (the capacity shares are of it)")
    variants = {"tune": tuning_variants, "grid": lambda head: [("", [])],
                "sweep": pm_option_variants(int(args.identities[0]), getattr(args, "variants", None))
                }[args.mode]
    cases = _cases(args, args.heads, args.identities, args.seeds, variants)
    if args.mode == "grid" and args.pm_sweep_at:
        n = int(args.pm_sweep_at)
        cases += _cases(args, ["prototype_memory"], [n], args.seeds,
                        lambda head: [v for v in pm_option_variants(n)(head) if v[0] != "default"])
    print(f"{len(cases)} runs, {args.jobs} at a time, on {machine_text()}", flush=True)
    tick = time.perf_counter()
    rows = launch(cases, args.jobs, args.threads, out_dir / "results.jsonl")
    print(f"{len(rows)}/{len(cases)} runs in {time.perf_counter() - tick:.0f} s", flush=True)
    _write_report(rows, out_dir, command, machine_text())
    return 0 if len(rows) == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Head step cost against the number of identities N, with its matrix-product floor in the same run.

Each case is one head (Prototype Memory, Full FC, Partial FC) at one N and one world size W, run
under torchrun (one process per rank, gloo on CPU / NCCL on CUDA, ``--threads`` torch threads each)
and timed as the training loop runs the head:

    local embeddings [B/W, D] → gather_embeddings (backward: one reduce-scatter) → head forward
    → loss.backward() → the optimizer step (learned heads; SGD with momentum, as the trainer's
    default) or nothing more (Prototype Memory: its update is part of its forward)

In the same processes, interleaved with the head steps (so machine noise hits both alike), the
bare matrix products that step cannot avoid at the same shapes: two for Prototype Memory (logits
E·W_rᵀ and dE = dlogits·W_r; prototypes take no gradient), three plus the same SGD update for the
learned heads (dW_r = dlogitsᵀ·E). Every row carries its ratio to that floor. The products write
into buffers allocated once, so the floor is the arithmetic alone. Three ratios per row: of the
medians, of the best step to the best floor, and the median of the interleaved (step, floor)
pairs; on a busy machine they differ, and the spread is the noise. A fourth uses CPU seconds
(process time of the busiest rank), which other processes on a shared machine do not inflate.

Prototype Memory starts full (every slot holds a class, as in a long run) and keeps its capacity M
whatever N is; Full FC holds N/W columns per rank, Partial FC ``--sample-rate`` of them per step.
A case whose estimated memory does not fit the machine is not run: its row says how many bytes it
would need per rank.

    python -m benchmarks.head_scaling                     # CPU-sized: a few minutes
    python -m benchmarks.head_scaling --full              # B=512, D=512, N up to 10⁷ (10⁸ for PM)
    python -m benchmarks.head_scaling --heads prototype_memory full_fc --identities 262144 \\
        --worlds 2 --batch 512 --dim 512 --capacity 262144     # the floor-ratio case

Writes ``--out-dir``/head_scaling.json, head_scaling.md and, when matplotlib is importable
(``pip install -e .[bench]``), head_scaling_time.png and head_scaling_memory.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, pyplot

HEADS = ("prototype_memory", "full_fc", "partial_fc")
LABELS = {"prototype_memory": "Prototype Memory", "full_fc": "Full FC", "partial_fc": "Partial FC"}


# ------------------------------------------------------------------------------------ one case
def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fill_memory(head, torch):
    """Every slot of this rank's shard holds a class it owns, spread evenly over them."""
    world, rank = head.world_size, head.rank
    m_r = head.protos.shape[0]
    owned = (head.config.num_classes - rank + world - 1) // world  # classes c ≡ rank (mod W)
    k = min(m_r, owned)
    index = torch.arange(k, dtype=torch.int64) * (owned // k)  # index c // W of the classes
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        head.protos[:k] = torch.nn.functional.normalize(torch.randn(k, head.dim, generator=g))
        head.slot_class[:k] = index * world + rank
        head.refreshed[:k] = 0
        head.inserted[:k] = 0
        head.table[index.to(head.table.device)] = torch.arange(k, dtype=torch.int32,
                                                              device=head.table.device)
    head.step = 1


def run_case(args) -> None:
    """Every rank under torchrun; rank 0 writes the case's JSON to ``args.result``."""
    import torch
    import torch.distributed as dist

    from pm_dist.distributed import all_gather_rows, all_reduce_, gather_embeddings, init_distributed
    from pm_dist.heads.fc import FullFC, PartialFC
    from pm_dist.heads.margin import Margin
    from pm_dist.heads.memory import MemoryConfig, PrototypeMemory

    torch.set_num_threads(args.threads)
    rss_start = _rss_now_bytes()
    env = init_distributed()
    device, world, rank = env.device, env.world_size, env.rank
    cuda = device.type == "cuda"
    n, b, d = args.identities, args.batch, args.dim
    margin = Margin()
    head_bytes = {}
    if args.head == "prototype_memory":
        head = PrototypeMemory(d, MemoryConfig(capacity=args.capacity, num_classes=n,
                                               dtype=args.dtype), margin, device=device)
        _fill_memory(head, torch)
        head_bytes = {name: getattr(head, name).nbytes
                      for name in ("protos", "slot_class", "refreshed", "inserted", "table")}
        optimizer = None
    else:
        cls = FullFC if args.head == "full_fc" else PartialFC
        kwargs = {"sample_rate": args.sample_rate} if args.head == "partial_fc" else {}
        head = cls(d, n, margin, **kwargs).to(device)
        head_bytes = {"weight": head.weight.nbytes}
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    # columns this rank's softmax uses per step
    if args.head == "prototype_memory":
        columns = head.protos.shape[0]
    elif args.head == "partial_fc":
        columns = max(int(args.sample_rate * (head.end - head.start)), 1)
    else:
        columns = head.end - head.start
    local_b = b // world + (1 if rank < b % world else 0)
    per_class = args.per_class

    sizes = [b // world + (1 if r < b % world else 0) for r in range(world)]
    start = sum(sizes[:rank])

    def batch(step):
        """This rank's rows of the global batch of ``step``: ``per_class`` images per identity."""
        g = torch.Generator().manual_seed(step)
        classes = torch.randint(0, n, (b // per_class + 1,), generator=g)
        labels = classes.repeat_interleave(per_class)[:b]
        emb = torch.randn(b, d, generator=g)
        return emb[start:start + local_b].to(device), labels[start:start + local_b].to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    def head_step(step):
        emb, labels = batch(step)
        local = emb.requires_grad_(True)  # stands for the encoder's output
        sync()
        t, c = time.perf_counter(), time.process_time()
        embeddings = gather_embeddings(local, sizes=sizes)
        out = head(embeddings, all_gather_rows(labels, sizes=sizes))
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, time.process_time() - c

    # the floor: the same products at the same shapes, into buffers allocated once
    g = torch.Generator().manual_seed(7 + rank)
    # the products run in the head's matmul dtype: the prototypes' (``--dtype``) or fp32 weights
    mm_dtype = head.protos.dtype if args.head == "prototype_memory" else torch.float32
    fe = torch.nn.functional.normalize(torch.randn(b, d, generator=g)).to(device, mm_dtype)
    fw = torch.nn.functional.normalize(torch.randn(columns, d, generator=g)).to(device, mm_dtype)
    logits = torch.empty(b, columns, device=device, dtype=mm_dtype)
    grad_e = torch.empty(b, d, device=device, dtype=mm_dtype)
    learned = optimizer is not None
    if learned:
        fparam = torch.nn.Parameter(fw.clone())
        fparam.grad = torch.empty_like(fw)
        fopt = torch.optim.SGD([fparam], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def floor_step():
        sync()
        t, c = time.perf_counter(), time.process_time()
        torch.mm(fe, fw.t(), out=logits)
        torch.mm(logits, fw, out=grad_e)
        if learned:
            torch.mm(logits.t(), fe, out=fparam.grad)
            fopt.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, time.process_time() - c

    for s in range(args.warmup):
        head_step(s)
    head_peak = (torch.cuda.max_memory_allocated(device) if cuda else _rss_peak_bytes())
    for _ in range(args.warmup):
        floor_step()
    heads, floors, heads_cpu, floors_cpu = [], [], [], []
    for s in range(args.repeats):  # interleaved
        wall, cpu = head_step(args.warmup + s)
        heads.append(wall)
        heads_cpu.append(cpu)
        wall, cpu = floor_step()
        floors.append(wall)
        floors_cpu.append(cpu)
    # a step lasts as long as its slowest rank
    t = torch.tensor(heads + floors + heads_cpu + floors_cpu
                     + [float(head_peak), float(_rss_peak_bytes())], dtype=torch.float64)
    all_reduce_(t, dist.ReduceOp.MAX)
    r = args.repeats
    heads, floors = t[:r].tolist(), t[r:2 * r].tolist()
    heads_cpu, floors_cpu = t[2 * r:3 * r].tolist(), t[3 * r:4 * r].tolist()
    if rank == 0:
        row = {
            "head": args.head, "world_size": world, "identities": n, "batch": b, "dim": d,
            "capacity": args.capacity if args.head == "prototype_memory" else None,
            "dtype": args.dtype if args.head == "prototype_memory" else "float32",
            "sample_rate": args.sample_rate if args.head == "partial_fc" else None,
            "columns_per_rank": columns, "threads": args.threads, "device": str(device),
            "step_s": statistics.median(heads), "floor_s": statistics.median(floors),
            "step_all_s": heads, "floor_all_s": floors,
            "peak_memory_bytes": t[-2].item(), "peak_rss_bytes_with_floor": t[-1].item(),
            "rss_at_start_bytes": rss_start, "head_state_bytes_rank0": head_bytes,
            "peak_kind": "max_memory_allocated" if cuda else "peak RSS",
        }
        row["ratio"] = row["step_s"] / row["floor_s"]
        # robust to a busy machine: the best of each, and the median of the interleaved pairs
        row["ratio_min"] = min(heads) / min(floors)
        row["ratio_pairs"] = statistics.median(h / f for h, f in zip(heads, floors))
        # CPU seconds of the busiest rank (process time: what other processes on the machine
        # take does not count; waiting in a collective does not either)
        row.update(step_cpu_all_s=heads_cpu, floor_cpu_all_s=floors_cpu,
                   step_cpu_s=statistics.median(heads_cpu), floor_cpu_s=statistics.median(floors_cpu))
        row["ratio_cpu"] = row["step_cpu_s"] / row["floor_cpu_s"]
        Path(args.result).write_text(json.dumps(row))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------- driver
def estimate_bytes(head: str, n: int, world: int, b: int, d: int, capacity: int,
                   sample_rate: float) -> int:
    """Rough peak bytes per rank (fp32): what a case needs before it is started."""
    if head == "prototype_memory":
        m_r = -(-capacity // world)
        columns = m_r
        state = m_r * d * 4 + 3 * 8 * m_r + 4 * -(-n // world)
        extra = 0
    else:
        c_r = -(-n // world)
        columns = c_r if head == "full_fc" else max(int(sample_rate * c_r), 1)
        # weight, its gradient and momentum; the normalized (or sampled) copy and its gradient
        state = 3 * c_r * d * 4
        extra = 2 * columns * d * 4
    # the [B, C_r] buffer, the floor's logits, buffers and weight copy (+ its SGD state)
    floor = b * columns * 4 + (3 if head != "prototype_memory" else 1) * columns * d * 4
    return state + extra + b * columns * 4 + floor + 600 * 2**20  # + the interpreter and torch


def available_bytes() -> int:
    """Free memory of the device the cases will run on: the GPU's when CUDA is there."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


def launch(case: dict, args, tmp: str) -> dict:
    result = Path(tmp) / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={case['world']}", "-m", "benchmarks.head_scaling", "--case",
           "--result", str(result), "--head", case["head"], "--identities", str(case["identities"])]
    for name in ("batch", "dim", "capacity", "sample_rate", "per_class", "warmup", "repeats",
                 "threads", "dtype"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.src:  # another checkout's pm_dist (before/after comparisons)
        env["PYTHONPATH"] = os.pathsep.join([args.src, str(Path(__file__).resolve().parents[1])])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def _si(x: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def markdown(rows: list[dict]) -> str:
    lines = ["| head | W | N | columns/rank | s/step | floor s | × floor (medians) | × floor (best) | "
             "× floor (pairs) | × floor (CPU s) | peak memory/rank | per-identity table/rank | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        table = r.get("head_state_bytes_rank0", {}).get("table")
        table = _si(table) if table is not None else "–"
        if r.get("skipped"):
            lines.append(f"| {LABELS[r['head']]} | {r['world_size']} | {r['identities']:.0e} | "
                         f"{r['columns_per_rank']} | – | – | – | – | – | – | – | {table} | "
                         f"{r['skipped']} |")
            continue
        lines.append(f"| {LABELS[r['head']]} | {r['world_size']} | {r['identities']:.0e} | "
                     f"{r['columns_per_rank']} | {r['step_s']:.3f} | {r['floor_s']:.3f} | "
                     f"**{r['ratio']:.2f}** | {r.get('ratio_min', float('nan')):.2f} | "
                     f"{r.get('ratio_pairs', float('nan')):.2f} | "
                     f"{r.get('ratio_cpu', float('nan')):.2f} | {_si(r['peak_memory_bytes'])} | {table} | "
                     f"{r.get('label', '')} |")
    return "\n".join(lines)


def plots(rows: list[dict], out_dir: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for key, ylabel, name in (("step_s", "seconds per head step", "time"),
                              ("peak_memory_bytes", "peak memory per rank (bytes)", "memory")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for head in HEADS:
            for world in sorted({r["world_size"] for r in rows}):
                pts = sorted((r["identities"], r[key]) for r in rows if r["head"] == head
                             and r["world_size"] == world and not r.get("skipped"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{LABELS[head]}, W={world}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("identities N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"head_scaling_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_scaling",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--identities", type=float, nargs="+",
                   help="N for every head (default: 1e4 1e5 1e6; --full: 1e4 … 1e7)")
    p.add_argument("--pm-identities", type=float, nargs="*",
                   help="extra N for Prototype Memory alone (default 1e7 1e8; --full: 1e8)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=256, help="global batch B")
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--capacity", type=int, default=16384, help="Prototype Memory capacity M")
    p.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="Prototype Memory's storage and matmul dtype (the learned heads' weights "
                        "stay fp32, as in training)")
    p.add_argument("--per-class", type=int, default=4, help="images per identity in a batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--full", action="store_true",
                   help="B=512, D=512, M=262144, N 1e4…1e7 for all heads, 1e8 for PM")
    p.add_argument("--src", help="import pm_dist from this checkout instead (old vs new)")
    p.add_argument("--label", default="", help="a note for every row (e.g. the commit)")
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="skip cases whose estimate exceeds this share of available memory")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--head", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        args.identities = int(args.identities[0])
        run_case(args)
        return 0
    if args.full:
        args.batch, args.dim, args.capacity = 512, 512, 262144
    identities = args.identities or ([1e4, 1e5, 1e6, 1e7] if args.full else [1e4, 1e5, 1e6])
    pm_extra = args.pm_identities if args.pm_identities is not None else \
        ([1e8] if args.full else [1e7, 1e8])
    cases = [(h, int(n), w) for h in args.heads for n in identities for w in args.worlds]
    if "prototype_memory" in args.heads:
        cases += [("prototype_memory", int(n), w) for n in pm_extra for w in args.worlds
                  if int(n) not in {int(x) for x in identities}]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for head, n, world in cases:
        need = estimate_bytes(head, n, world, args.batch, args.dim, args.capacity,
                              args.sample_rate)
        have = available_bytes() * args.memory_fraction / world
        if head == "prototype_memory":
            columns = -(-args.capacity // world)
        else:
            c_r = -(-n // world)
            columns = c_r if head == "full_fc" else max(int(args.sample_rate * c_r), 1)
        if need > have:
            row = {"head": head, "world_size": world, "identities": n, "columns_per_rank": columns,
                   "skipped": f"cannot allocate: needs ≈ {_si(need)} per rank "
                              f"({need} bytes), {_si(have)} available per rank",
                   "estimated_bytes_per_rank": need}
            print(f"{head} W={world} N={n:.0e}: {row['skipped']}", flush=True)
            rows.append(row)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = launch({"head": head, "identities": n, "world": world}, args, tmp)
        row["estimated_bytes_per_rank"] = need
        row["label"] = args.label
        rows.append(row)
        print(f"{head} W={world} N={n:.0e}: {row['step_s']:.3f} s/step, floor {row['floor_s']:.3f} s, "
              f"×{row['ratio']:.2f}, peak {_si(row['peak_memory_bytes'])}/rank", flush=True)
    report = {"machine": machine(), "command": " ".join(["python -m benchmarks.head_scaling"]
                                                        + (argv if argv is not None else sys.argv[1:])),
              "settings": {k: getattr(args, k) for k in ("batch", "dim", "capacity", "sample_rate", "dtype",
                                                          "per_class", "warmup", "repeats",
                                                          "threads", "src")},
              "rows": rows}
    table = markdown(rows)
    print(table)
    (out_dir / "head_scaling.json").write_text(json.dumps(report, indent=1))
    (out_dir / "head_scaling.md").write_text(
        f"`{report['command']}` on {report['machine']['gpu'] or report['machine']['cpu']} "
        f"({report['machine']['cpu']}, {report['machine']['cores']} cores), "
        f"torch {report['machine']['torch']}\n\n{table}\n")
    for path in plots(rows, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / 'head_scaling.json'} and {out_dir / 'head_scaling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the data pipeline: the synthetic generator, JPEG decoding, Arrow reads and the
whole training loader, at 112×112 and a small size, beside what a small encoder consumes.

    python -m benchmarks.data_throughput --out data_throughput.json [--seconds 3] [--sizes 112 32]

Single-process numbers (generator, decode, arrow_load, convert) run on one core with one torch
thread: they are images/s *per core*. ``loader_*`` numbers are end-to-end ``build_train_loader``
batches (P=32 × K=4) with 0, 1, 2 worker processes, on the whole machine. ``encoder_tiny_train`` is
the consumer: forward + backward of the ``tiny`` encoder with 2 torch threads, so "does the data keep
up" reads as loader ≥ encoder. Prints a table and writes everything as JSON to ``--out``.

With ``--gpu-model iresnet50`` (on a CUDA machine) it also trains that encoder (bf16 autocast) on
random tensors already on the GPU (the GPU's own speed) and then fed by the loader with each of
``--gpu-workers`` worker processes: where the fed rate falls short of the GPU's own, data starves it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import PIL
import PIL.features
import torch
from PIL import Image

from pm_dist.data.config import DataConfig
from pm_dist.data.to_arrow import convert_dataset
from pm_dist.data.datasets import ArrowDataset
from pm_dist.data.loader import build_train_loader
from pm_dist.data.raw_sources import SyntheticSource
from pm_dist.data.synthetic import SyntheticIdentities
from pm_dist.data.transforms import decode, normalize

P, K = 32, 4


def rate(fn, seconds: float, min_items: int = 20) -> float:
    """Items per second of ``fn`` (which processes some items and returns how many)."""
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= min_items:
            return done / elapsed


def bench_generator(size: int, seconds: float, k: int) -> float:
    """Images/s rendering P×K-style batches: each identity drawn once, K images of it."""
    gen = SyntheticIdentities(10**7, size)
    rng = np.random.default_rng(0)

    def batch():
        for c in rng.integers(0, 10**7, 8):
            for j in range(k):
                gen.render(int(c), j)
        return 8 * k

    return rate(batch, seconds)


def jpeg_bytes(size: int, n: int) -> list[bytes]:
    gen = SyntheticIdentities(1000, size)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(gen.render(i % 1000, i)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def bench_decode(size: int, seconds: float) -> float:
    blobs = jpeg_bytes(size, 64)

    def batch():
        for b in blobs:
            decode(b)
        return len(blobs)

    return rate(batch, seconds)


def make_arrow(size: int, root: str) -> tuple[str, float]:
    gen = SyntheticIdentities(300, size, count_median=10, count_sigma=0.5)
    out = os.path.join(root, f"arrow{size}")
    start = time.perf_counter()
    report = convert_dataset(SyntheticSource(gen, encoding="jpeg", quality=95), out, shard_rows=2000)
    return out, report.num_images / (time.perf_counter() - start)


def bench_arrow_load(path: str, size: int, seconds: float) -> float:
    ds = ArrowDataset(path, image_size=size)
    rng = np.random.default_rng(0)
    counts = ds.count_array()

    def batch():
        classes = rng.integers(0, ds.num_classes, 8)
        imgs = []
        for c in classes:
            for k in rng.integers(0, counts[c], K):
                imgs.append(ds.load(int(ds.sample_index([c], [k])[0]), int(c)))
        normalize(np.stack(imgs), rng.random(len(imgs)) < 0.5)
        return len(imgs)

    return rate(batch, seconds)


def bench_loader(cfg: DataConfig, seconds: float) -> float:
    loader = build_train_loader(cfg, P, K, 0, 1)

    def batch():
        return len(next(loader)[1])

    result = rate(batch, seconds, min_items=4 * P * K)
    loader.close()
    return result


def bench_encoder(size: int, seconds: float) -> float | None:
    try:
        from pm_dist.models import build_model
    except ImportError:  # the encoders live in another part of pm_dist; report without them
        return None
    torch.set_num_threads(2)
    model = build_model("tiny", 512, size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(P * K, 3, size, size)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return len(x)

    result = rate(step, seconds)
    torch.set_num_threads(1)
    return result


def bench_gpu(name: str, size: int, seconds: float, loaders: dict) -> dict:
    """Training img/s of encoder ``name`` on CUDA: on resident random data, then fed by each loader."""
    from pm_dist.models import build_model

    dev = torch.device("cuda")
    model = build_model(name, 512, size).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    resident = torch.randn(P * K, 3, size, size, device=dev)

    def step_resident():
        train(resident)
        torch.cuda.synchronize()
        return P * K

    out = {f"gpu_{name}_resident": rate(step_resident, seconds, min_items=20 * P * K)}
    for label, cfg in loaders.items():
        loader = build_train_loader(cfg, P, K, 0, 1)

        def step_fed():
            x, _ = next(loader)
            train(x.to(dev, non_blocking=True))
            torch.cuda.synchronize()
            return len(x)

        out[f"gpu_{name}_fed_by_{label}"] = rate(step_fed, seconds, min_items=20 * P * K)
        loader.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per number")
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 32])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--gpu-model", default=None, help="also train this encoder on CUDA (e.g. iresnet50)")
    ap.add_argument("--gpu-workers", type=int, nargs="+", default=[4, 8, 14])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__, "pillow": PIL.__version__,
                    "libjpeg_turbo": bool(PIL.features.check_feature("libjpeg_turbo")),
                    "load_average_at_start": os.getloadavg()},
        "unit": "images per second",
        "batch": {"P": P, "K": K},
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = results["results"][str(size)] = {}
            r["generator_per_core"] = bench_generator(size, args.seconds, k=K)
            r["generator_per_core_uncached"] = bench_generator(size, args.seconds, k=1)
            r["jpeg_decode_per_core"] = bench_decode(size, args.seconds)
            path, r["convert_synthetic_jpeg_per_core"] = make_arrow(size, tmp)
            r["arrow_load_per_core"] = bench_arrow_load(path, size, args.seconds)
            for w in args.workers:
                syn = DataConfig(num_identities=10**6, image_size=size, num_workers=w)
                arr = DataConfig(source="arrow", path=path, image_size=size, num_workers=w)
                r[f"loader_synthetic_workers{w}"] = bench_loader(syn, args.seconds)
                r[f"loader_arrow_workers{w}"] = bench_loader(arr, args.seconds)
            r["encoder_tiny_train_2threads"] = bench_encoder(size, args.seconds)
            if args.gpu_model:
                loaders = {}
                for w in args.gpu_workers:
                    loaders[f"synthetic_workers{w}"] = DataConfig(num_identities=10**6, image_size=size,
                                                                  num_workers=w)
                    loaders[f"arrow_workers{w}"] = DataConfig(source="arrow", path=path, image_size=size,
                                                              num_workers=w)
                r.update(bench_gpu(args.gpu_model, size, args.seconds, loaders))
            for name, value in r.items():
                shown = "n/a" if value is None else f"{value:9.0f}"
                print(f"{size:4d}px  {name:34s} {shown} img/s", flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

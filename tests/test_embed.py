"""``python -m pm_dist.embed``: embeddings of a folder or a list of face crops, in input order, the
same at any world size; a bad image named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pm_dist.data.transforms import normalize
from pm_dist.embed import build_parser, main, run
from pm_dist.models import build_model, save_encoder

SIZE = 16
REPO = Path(__file__).resolve().parents[1]


def _setup(tmp_path, n=7):
    torch.manual_seed(0)
    model = build_model("tiny", 24, SIZE)
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE) * 2 - 1)  # BN statistics
    model.eval()
    save_encoder(tmp_path / "enc.pt", model, "tiny", 24, SIZE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    folder = tmp_path / "faces" / "sub"
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return model, images


def _expected(model, images, flip=False):
    with torch.no_grad():
        x = normalize(images)
        out = model(x).double()
        if flip:
            out = out + model(torch.flip(x, dims=[3])).double()
    out = out.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_folder_in_sorted_order(tmp_path, capsys):
    model, images = _setup(tmp_path)
    out = tmp_path / "emb.npy"
    assert main(["--model", str(tmp_path / "enc.pt"), "--images", str(tmp_path / "faces"),
                 "--out", str(out), "--batch-size", "3"]) == 0
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (7, 24)
    np.testing.assert_allclose(emb, _expected(model, images), rtol=1e-4, atol=1e-5)
    paths = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"{i:02d}.png" for i in range(7)]
    assert "7 images" in capsys.readouterr().out


def test_list_with_flip_and_a_bad_image(tmp_path, capsys):
    model, images = _setup(tmp_path)
    order = [4, 0, 6, 2]
    (tmp_path / "list.txt").write_text("# crops\n" + "".join(f"faces/sub/{i:02d}.png\n" for i in order))
    out = tmp_path / "o" / "emb.npy"
    assert main(["--model", str(tmp_path / "enc.pt"), "--images", str(tmp_path / "list.txt"),
                 "--out", str(out), "--flip"]) == 0
    np.testing.assert_allclose(np.load(out), _expected(model, images[order], flip=True),
                               rtol=1e-4, atol=1e-5)
    (tmp_path / "faces" / "sub" / "03.png").write_bytes(b"not an image")
    assert main(["--model", str(tmp_path / "enc.pt"), "--images", str(tmp_path / "faces"),
                 "--out", str(tmp_path / "bad.npy")]) == 2
    assert "03.png cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "bad.npy").exists()


def _run_args(argv):
    emb, paths = run(build_parser().parse_args(argv))
    return emb, paths


def test_every_rank_embeds_a_share_with_the_same_result(dist_pool, tmp_path):
    _setup(tmp_path, n=11)
    argv = ["--model", str(tmp_path / "enc.pt"), "--images", str(tmp_path / "faces"),
            "--out", str(tmp_path / "unused.npy"), "--batch-size", "2"]
    single, paths = _run_args(argv)
    results = dist_pool(2).run(_run_args, argv)
    for emb, rank_paths in results:
        assert rank_paths == paths
        np.testing.assert_allclose(emb, single, rtol=1e-5, atol=1e-6)


def test_a_bad_image_on_one_rank_ends_every_rank_with_its_name(tmp_path):
    """Under torchrun, the rank that cannot decode an image tells the others: every rank exits 2
    naming the file (not one with a traceback, nor with a SIGABRT at exit, nor hanging)."""
    _setup(tmp_path, n=8)
    (tmp_path / "faces" / "sub" / "06.png").write_bytes(b"not an image")  # in rank 1's share
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--tee=3", "-m", "pm_dist.embed", "--model", str(tmp_path / "enc.pt"),
           "--images", str(tmp_path / "faces"), "--out", str(tmp_path / "bad.npy"),
           "--batch-size", "2"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    for rank in range(2):
        assert f"[default{rank}]:error: embedding extraction failed on rank 1" in out, out[-3000:]
    assert out.count("06.png cannot be decoded") >= 2, out[-3000:]
    assert "exitcode  : 2" in out and "exitcode  : -6" not in out, out[-3000:]
    assert not (tmp_path / "bad.npy").exists()

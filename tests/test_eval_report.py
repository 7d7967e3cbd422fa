"""The report (rich table, strict JSON, ROC PNG) and ``python -m pm_dist.evaluate`` end to end on
an encoder file and on its ONNX export."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from pm_dist.eval.binfile import write_bin
from pm_dist.eval.report import write_report
from pm_dist.eval.roc import roc_metrics
from pm_dist.eval.verification import evaluate_verification, load_bin
from pm_dist.evaluate import main


def verification_result():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2 == 0
    scores = rng.normal(labels * 2.0, 1.0)
    roc = roc_metrics(labels, scores)
    return {"name": "lfw", "kind": "verification", "num_pairs": 200, "accuracy": 0.99817,
            "accuracy_std": 0.00229, "val": float("nan"), "val_std": float("nan"), "xnorm": 21.5,
            "tar_at_far": roc["tar_at_far"], "curve": roc["curve"], "seconds": 1.0,
            "insightface_line": "[lfw]Accuracy-Flip: 0.99817+-0.00229", "fold": np.arange(3)}


def test_write_report_table_json_png(tmp_path):
    console = Console(record=True, width=200)
    out = write_report([verification_result()], tmp_path / "rep", step=1200, console=console)
    text = console.export_text()
    assert "0.99817 ± 0.00229" in text and "[lfw]Accuracy-Flip: 0.99817+-0.00229" in text
    assert "TAR@FAR=1e-02 %" in text and "1e-06" not in text  # unmeasurable FARs get no column

    assert out["json"].endswith("eval_step0001200.json")
    with open(out["json"]) as f:
        data = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    r = data["results"][0]
    assert data["step"] == 1200 and r["val"] is None and r["fold"] == [0, 1, 2]
    assert r["tar_at_far"]["1e-06"] is None and 0 < r["tar_at_far"]["1e-01"] <= 1

    (png,) = out["plots"]
    assert png.endswith("roc_lfw_step0001200.png")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (540, 720, 3)
    assert (np.abs(img.astype(int) - (31, 119, 180)).sum(axis=2) == 0).sum() > 200  # the curve is drawn


def test_a_kind_without_its_own_table_gets_a_generic_one(tmp_path):
    console = Console(record=True, width=200)
    plugin = {"name": "toy-norms", "kind": "norms", "headline": ["mean_norm"], "mean_norm": 0.61234,
              "images": 24, "seconds": 0.5, "per_image": [1.0, 2.0], "flag": True}
    write_report([verification_result(), plugin], tmp_path / "rep", console=console)
    text = console.export_text()
    assert "norms results" in text and "toy-norms" in text and "0.61234" in text
    header = next(line for line in text.splitlines() if "mean_norm" in line)
    assert header.index("mean_norm") < header.index("images")  # the headline first
    assert "per_image" not in text and "flag" not in text  # only scalars
    assert "0.99817 ± 0.00229" in text  # the known kind keeps its own table


def test_write_report_does_nothing_off_rank_0(tmp_path, monkeypatch):
    monkeypatch.setattr("pm_dist.eval.report.get_rank", lambda: 1)
    assert write_report([verification_result()], tmp_path / "r1") is None
    assert not (tmp_path / "r1").exists()


@pytest.fixture(scope="module")
def encoder_and_bin(tmp_path_factory):
    from pm_dist.models import build_model, save_encoder

    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_model("tiny", 16, 16).eval()
    save_encoder(d / "encoder.pt", model, "tiny", 16, 16)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (10, 16, 16, 3))
    first = rng.integers(0, 10, 20)
    second = np.where(np.arange(20) % 2 == 0, first, (first + rng.integers(1, 10, 20)) % 10)  # 10 same pairs
    ids = np.stack([first, second], 1).ravel()
    imgs = np.clip(base[ids] + rng.integers(-60, 61, (40, 16, 16, 3)), 0, 255).astype(np.uint8)
    write_bin(d / "toy.bin", imgs, first == second)
    return d, model


def test_cli_on_encoder_file_matches_library_call(encoder_and_bin, capsys):
    d, model = encoder_and_bin
    assert main(["--model", str(d / "encoder.pt"), "--bin", str(d / "toy.bin"), "--out", str(d / "out"),
                 "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    (r,) = json.loads((d / "out" / "eval.json").read_text())["results"]
    expected = evaluate_verification(model, load_bin(d / "toy.bin", 16), batch_size=7)
    assert r["insightface_line"] == expected["insightface_line"] and r["insightface_line"] in printed
    assert r["fold_accuracy"] == expected["fold_accuracy"]
    assert (d / "out" / "roc_toy.png").is_file()


def test_cli_on_onnx_export_gives_the_same_accuracy(encoder_and_bin):
    pytest.importorskip("onnxruntime")
    from pm_dist.export import export_onnx

    d, model = encoder_and_bin
    export_onnx(model, d / "encoder.onnx", 16, metadata={"pm_dist.image_size": "16"})
    assert main(["--model", str(d / "encoder.onnx"), "--bin", str(d / "toy.bin"), "--out", str(d / "onnx")]) == 0
    (r,) = json.loads((d / "onnx" / "eval.json").read_text())["results"]
    expected = evaluate_verification(model, load_bin(d / "toy.bin", 16))
    assert r["fold_accuracy"] == expected["fold_accuracy"]
    assert math.isclose(r["xnorm"], expected["xnorm"], rel_tol=1e-4)


def test_cli_pairs_and_synthetic_together(encoder_and_bin, tmp_path):
    d, _ = encoder_and_bin
    imgs = load_bin(d / "toy.bin", 16).images
    for i in range(4):
        Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.txt").write_text("0.png 1.png 1\n2.png 3.png 0\n0.png 3.png 0\n")
    assert main(["--model", str(d / "encoder.pt"), "--pairs", str(tmp_path / "pairs.txt"), "--synthetic",
                 "--synthetic-pairs", "20", "--synthetic-identities", "8", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
    assert [(r["name"], r["kind"]) for r in results] == [
        ("pairs", "pairs"), ("synthetic-pairs", "verification"), ("synthetic-1n", "identification")]
    assert results[2]["num_mated_probes"] == 8 and results[2]["num_nonmated_probes"] == 8
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "roc_pairs.png", "roc_synthetic-1n.png", "roc_synthetic-pairs.png"]


def test_cli_reports_a_broken_bin_and_exits_2(tmp_path, encoder_and_bin, capsys):
    d, _ = encoder_and_bin
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x80\x04]\x94.")  # a pickled empty list
    assert main(["--model", str(d / "encoder.pt"), "--bin", str(bad)]) == 2
    assert f"error: {bad}: expected a pickled pair" in capsys.readouterr().err

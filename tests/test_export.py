"""ONNX export: the exported graph must compute the same embeddings as the PyTorch encoder."""

import onnx
import onnxruntime as ort
import pytest
import torch

from pm_dist.export import OnnxMismatchError, check_onnx, export_onnx, main
from pm_dist.models import build_model, load_encoder, save_encoder

SIZE = 32


def _trained_like(name, size=SIZE, d=64):
    model = build_model(name, d, size)
    with torch.no_grad():  # non-trivial BN running statistics
        for i in range(2):
            model(torch.rand(4, 3, size, size) * 2 - 1)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet"])
def test_export_and_check(tmp_path, name):
    model = _trained_like(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", SIZE, opset=17, metadata={"pm_dist.arch": name})
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    assert {p.key: p.value for p in proto.metadata_props} == {"pm_dist.arch": name}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    diff = check_onnx(model, path, SIZE, batch=3)
    assert 0.0 <= diff < 1e-4
    # Dynamic batch axis: sizes other than the traced 2 run and match row by row.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    (out,) = session.run(["embedding"], {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_export_restores_training_mode(tmp_path):
    model = build_model("tiny", 64, SIZE).train()
    path = export_onnx(model, tmp_path / "m.onnx", SIZE)
    assert model.training
    check_onnx(model, path, SIZE)
    assert model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_check_detects_a_diverged_model(tmp_path):
    model = _trained_like("tiny")
    path = export_onnx(model, tmp_path / "m.onnx", SIZE)
    with torch.no_grad():
        model.fc.weight.mul_(1.01)  # the ONNX file now holds different weights
    with pytest.raises(OnnxMismatchError, match="exceeds"):
        check_onnx(model, path, SIZE)


def test_cli_end_to_end(tmp_path, capsys):
    model = _trained_like("tiny")
    encoder = save_encoder(tmp_path / "enc.pt", model, "tiny", 64, SIZE)
    out = tmp_path / "exported"
    assert main(["--encoder", str(encoder), "--out", str(out), "--opset", "17"]) == 0
    report = capsys.readouterr().out
    assert "opset 17" in report and "max |diff|" in report
    # The plain state dict loads as an insightface-style backbone.pth.
    plain, meta = load_encoder(out / "backbone.pth", arch="tiny", embedding_size=64, image_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    props = {p.key: p.value for p in onnx.load(str(out / "encoder.onnx")).metadata_props}
    assert props["pm_dist.arch"] == "tiny" and props["pm_dist.image_size"] == str(SIZE)


def test_cli_rejects_damaged_encoder(tmp_path, capsys):
    bad = tmp_path / "enc.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["--encoder", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

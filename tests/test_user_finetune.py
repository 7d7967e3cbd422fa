"""The arcface_torch user's path: insightface names, ``model.init_from`` (fine-tuning from an encoder
file or a ``backbone.pth``), and models taken from checkpoint directories by export and evaluate."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from pm_dist.config import load_config
from pm_dist.config_io import ConfigError
from pm_dist.distributed import init_distributed
from pm_dist.models import build_model, canonical_name, load_encoder, save_encoder
from pm_dist.train import Trainer

BASE = [
    "data.num_workers=0", "data.image_size=16", "data.num_identities=60",
    "data.heldout_identities=40", "data.count_median=4", "model.embedding_size=32",
    "batch.classes_per_batch=8", "batch.images_per_class=2", "head.memory.capacity=32",
    "run.progress=false", "run.log_every=0", "run.checkpoint_every=0", "optim.warmup_steps=1",
    "eval.synthetic_pairs=0",
]


def _build(out_dir, overrides, resume="none", fit=False):
    """A Trainer on this rank; its stdout and the encoder's weights (before or after fit)."""
    cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + overrides)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Trainer(cfg, init_distributed(), resume=resume)
        if fit:
            trainer.fit()
        else:
            trainer.loader.close()
            trainer.metrics.close()
    weights = {k: v.detach().float().clone() for k, v in trainer.engine.module.state_dict().items()}
    head = {k: v.detach().cpu().clone() for k, v in trainer.head.state_dict().items()}
    return {"stdout": out.getvalue(), "weights": weights, "name": cfg.model.name, "head": head}


# --- insightface names ------------------------------------------------------------------------
@pytest.mark.parametrize("alias,name", [("r18", "iresnet18"), ("r34", "iresnet34"),
                                        ("r50", "iresnet50"), ("r100", "iresnet100"),
                                        ("mbf", "mobilefacenet")])
def test_insightface_names_in_config(alias, name):
    assert canonical_name(alias) == name
    assert load_config(None, [f"model.name={alias}"]).model.name == name


def test_unknown_arch_suggests_in_config():
    with pytest.raises(ConfigError, match="did you mean 'r50'"):
        load_config(None, ["model.name=r5O"])


def test_encoder_speed_benchmark_takes_insightface_arch(capsys):
    """``python -m benchmarks.encoder_speed --arch r50``: the alias resolves; a typo is refused."""
    from benchmarks import encoder_speed

    for alias, name in (("r50", "iresnet50"), ("mbf", "mobilefacenet"), ("iresnet18", "iresnet18")):
        assert encoder_speed.build_parser().parse_args(["--arch", alias]).arch == name
    with pytest.raises(SystemExit) as exit_:
        encoder_speed.build_parser().parse_args(["--arch", "r5O"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown encoder 'r5O'" in err and "did you mean 'r50'" in err
    encoder_speed.main(["--arch", "r18", "--image-size", "16", "--batch", "2", "--steps", "1"])
    assert capsys.readouterr().out.startswith("iresnet18 S=16 batch=2 ")


def test_evaluate_and_export_take_insightface_arch(tmp_path, capsys):
    from pm_dist.evaluate import main as evaluate
    from pm_dist.export import main as export

    model = build_model("r18", 64, 16).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")  # insightface's file: a state dict
    assert evaluate(["--model", str(tmp_path / "backbone.pth"), "--arch", "r18",
                     "--embedding-size", "64", "--image-size", "16", "--synthetic",
                     "--synthetic-pairs", "40", "--synthetic-identities", "20",
                     "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert export(["--encoder", str(tmp_path / "backbone.pth"), "--arch", "r18",
                   "--embedding-size", "64", "--image-size", "16", "--out", str(tmp_path / "x")]) == 0
    assert "iresnet18 D=64 S=16" in capsys.readouterr().out
    assert export(["--encoder", str(tmp_path / "backbone.pth"), "--arch", "r5O",
                   "--out", str(tmp_path / "y")]) == 2
    assert "did you mean 'r50'" in capsys.readouterr().err


# --- model.init_from ----------------------------------------------------------------------------
def test_init_from_insightface_backbone_and_encoder_file(dist_pool, tmp_path):
    source = build_model("r18", 32, 16)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-0.1, 0.1)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    [r] = dist_pool(1).run(_build, str(tmp_path / "a"),
                           ["model.name=r18", f"model.init_from={tmp_path / 'backbone.pth'}"])
    assert r["name"] == "iresnet18" and "encoder initialised from" in r["stdout"]
    for k, v in source.state_dict().items():
        assert torch.equal(r["weights"][k], v.float()), k
    # a pm_dist encoder file, then a short run from it: its encoder.pt differs from the start
    save_encoder(tmp_path / "enc.pt", source, "iresnet18", 32, 16)
    [r] = dist_pool(1).run(_build, str(tmp_path / "b"),
                           ["model.name=iresnet18", f"model.init_from={tmp_path / 'enc.pt'}"])
    for k, v in source.state_dict().items():
        assert torch.equal(r["weights"][k], v.float()), k


def test_init_from_mismatch_names_file_and_key(dist_pool, tmp_path):
    torch.save(build_model("r18", 64, 16).state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(Exception) as err:  # embedding size 64 in the file, 32 in the config
        dist_pool(1).run(_build, str(tmp_path / "a"),
                         ["model.name=r18", f"model.init_from={tmp_path / 'backbone.pth'}"])
    assert "backbone.pth" in str(err.value) and "fc.weight" in str(err.value)
    save_encoder(tmp_path / "tiny.pt", build_model("tiny", 32, 16), "tiny", 32, 16)
    with pytest.raises(Exception, match="holds a tiny encoder, not iresnet18"):
        dist_pool(1).run(_build, str(tmp_path / "b"),
                         ["model.name=r18", f"model.init_from={tmp_path / 'tiny.pt'}"])
    with pytest.raises(ConfigError, match="model.init_from: .*missing.pt does not exist"):
        load_config(None, [f"model.init_from={tmp_path / 'missing.pt'}"]).preflight(1)


def test_init_from_refuses_another_embedding_or_image_size(dist_pool, tmp_path):
    """The right architecture is not enough: the embedding size and the image size (the encoders'
    last layers are sized by both) must be the run's, and the error names the file and the field."""
    from pm_dist.models.encoder_file import EncoderFileError
    from pm_dist.models.loading import init_from

    save_encoder(tmp_path / "d64.pt", build_model("tiny", 64, 16), "tiny", 64, 16)
    save_encoder(tmp_path / "s32.pt", build_model("tiny", 32, 32), "tiny", 32, 32)
    target = build_model("tiny", 32, 16)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(EncoderFileError) as err:
        init_from(target, tmp_path / "d64.pt", "tiny", 32, 16)
    assert str(err.value) == (f"{tmp_path / 'd64.pt'}: does not fit model.init_from's run: its "
                              "embedding_size 64 (the config has 32)")
    with pytest.raises(EncoderFileError) as err:
        init_from(target, tmp_path / "s32.pt", "tiny", 32, 16)
    assert str(err.value) == (f"{tmp_path / 's32.pt'}: does not fit model.init_from's run: its "
                              "image_size 32 (the config has 16)")
    for k, v in target.state_dict().items():  # refused: nothing copied
        assert torch.equal(v, before[k]), k
    # through the run: the same refusal, before any step
    with pytest.raises(Exception) as err:
        dist_pool(1).run(_build, str(tmp_path / "a"), [f"model.init_from={tmp_path / 'd64.pt'}"])
    assert "d64.pt: does not fit model.init_from's run: its embedding_size 64 (the config has 32)" \
        in str(err.value)
    # a checkpoint directory: its config's sizes are compared the same way
    run = tmp_path / "run"
    dist_pool(1).run(_build, str(run), ["run.steps=2", "run.checkpoint_every=2"], fit=True)
    with pytest.raises(EncoderFileError) as err:
        init_from(build_model("tiny", 64, 16), run / "checkpoints", "tiny", 64, 16)
    assert str(err.value) == (f"{run / 'checkpoints'}: does not fit model.init_from's run: its "
                              "embedding_size 32 (the config has 64)")


def test_init_from_a_checkpoint_starts_the_head_fresh(dist_pool, tmp_path):
    """model.init_from takes the encoder only: after a run whose Full FC head was trained, a run
    started from its checkpoint has the head of a fresh run (same seed), not the trained one."""
    run = tmp_path / "run"
    [trained] = dist_pool(1).run(_build, str(run), ["head.name=full_fc", "run.steps=2",
                                                    "run.checkpoint_every=2"], fit=True)
    [started] = dist_pool(1).run(_build, str(tmp_path / "b"),
                                 ["head.name=full_fc", f"model.init_from={run / 'checkpoints'}"])
    [fresh] = dist_pool(1).run(_build, str(tmp_path / "c"), ["head.name=full_fc"])
    assert "encoder initialised from" in started["stdout"]
    for k, v in trained["weights"].items():  # the encoder is the trained one ...
        assert torch.equal(started["weights"][k], v), k
    assert started["head"].keys() == fresh["head"].keys() and started["head"]
    for k, v in fresh["head"].items():  # ... the head is a fresh one
        assert torch.equal(started["head"][k], v), k
    assert any(not torch.equal(trained["head"][k], v) for k, v in fresh["head"].items()), \
        "the trained head equals a fresh one: the test shows nothing"


def test_init_from_is_ignored_on_resume(dist_pool, tmp_path):
    run = tmp_path / "run"
    dist_pool(1).run(_build, str(run), ["run.steps=2"], fit=True)
    other = build_model("tiny", 32, 16)
    save_encoder(tmp_path / "other.pt", other, "tiny", 32, 16)
    [r] = dist_pool(1).run(_build, str(run), ["run.steps=4", f"model.init_from={tmp_path / 'other.pt'}"],
                           "auto")
    assert "model.init_from=" in r["stdout"] and "ignored: resuming" in r["stdout"]
    trained, _ = load_encoder(run / "encoder.pt")
    for k, v in trained.state_dict().items():  # the checkpoint's weights, not other.pt's
        assert torch.equal(r["weights"][k], v.float()), k


# --- models from checkpoint directories ---------------------------------------------------------
def test_export_and_evaluate_take_a_checkpoint_directory(dist_pool, tmp_path, capsys):
    from pm_dist.evaluate import main as evaluate
    from pm_dist.export import main as export

    run = tmp_path / "run"
    dist_pool(1).run(_build, str(run), ["run.steps=4", "run.checkpoint_every=2",
                                        "run.keep_checkpoints=3"], fit=True)
    final, _ = load_encoder(run / "encoder.pt")
    # the run's checkpoints/ means its newest: step 4, the same weights as encoder.pt
    assert export(["--encoder", str(run / "checkpoints"), "--out", str(tmp_path / "x")]) == 0
    assert "step 4" in capsys.readouterr().out
    exported, _ = load_encoder(tmp_path / "x" / "backbone.pth", arch="tiny", embedding_size=32,
                               image_size=16)
    for k, v in final.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    step2 = run / "checkpoints" / "step_00000002"
    assert evaluate(["--model", str(step2), "--synthetic", "--synthetic-pairs", "40",
                     "--synthetic-identities", "20", "--out", str(tmp_path / "ev")]) == 0
    assert evaluate(["--model", str(tmp_path), "--synthetic", "--out", str(tmp_path / "ev2")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_embed_and_init_from_take_a_checkpoint_directory(dist_pool, tmp_path):
    import numpy as np
    from PIL import Image

    from pm_dist.data.transforms import normalize
    from pm_dist.embed import main as embed

    run = tmp_path / "run"
    dist_pool(1).run(_build, str(run), ["run.steps=2", "run.checkpoint_every=2"], fit=True)
    final, _ = load_encoder(run / "encoder.pt")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "faces").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "faces" / f"{i}.png")
    assert embed(["--model", str(run / "checkpoints"), "--images", str(tmp_path / "faces"),
                  "--out", str(tmp_path / "emb.npy"), "--raw"]) == 0
    with torch.no_grad():
        expected = final(normalize(images)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=1e-4, atol=1e-5)
    # model.init_from=<run>/checkpoints: the newest checkpoint's encoder starts the new run
    [r] = dist_pool(1).run(_build, str(tmp_path / "b"), [f"model.init_from={run / 'checkpoints'}"])
    for k, v in final.state_dict().items():
        assert torch.equal(r["weights"][k], v.float()), k


def test_embed_takes_an_insightface_backbone_with_its_arch_name(tmp_path):
    """``python -m pm_dist.embed --model backbone.pth --arch r18``; a 24 px crop is resized to 16."""
    import numpy as np
    from PIL import Image

    from pm_dist.data.transforms import normalize
    from pm_dist.embed import main as embed
    from pm_dist.eval.images import fit_square

    model = build_model("r18", 32, 16).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    crop = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(crop).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\n")
    assert embed(["--model", str(tmp_path / "backbone.pth"), "--arch", "r18", "--embedding-size", "32",
                  "--image-size", "16", "--images", str(tmp_path / "list.txt"),
                  "--out", str(tmp_path / "e.npy")]) == 0
    resized = np.array(fit_square(Image.fromarray(crop), 16))[None]
    with torch.no_grad():
        raw = model(normalize(resized)).double().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), raw / np.linalg.norm(raw, axis=1,
                                                                                  keepdims=True),
                               rtol=1e-4, atol=1e-5)

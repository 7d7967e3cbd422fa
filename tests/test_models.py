"""Encoders: shapes, insightface weight compatibility, determinism, and the encoder file."""

import hashlib
import os

import pytest
import torch

from pm_dist.models import (
    ENCODER_FORMAT,
    MODEL_NAMES,
    EncoderFileError,
    build_model,
    load_encoder,
    save_encoder,
)

SMALL = 32  # every encoder accepts multiples of 16; 32 keeps the big IResNets cheap


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # insightface range [-1, 1]


def _calibrate(model, size, steps=2):
    """A few train-mode passes so BN running stats are not the trivial 0/1 (makes comparisons bite)."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(_images(4, size, seed=100 + i))
    return model.eval()


def test_model_names():
    assert MODEL_NAMES == ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet", "tiny")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_train_and_eval(name):
    model = build_model(name, embedding_size=128, image_size=SMALL)
    x = _images(2, SMALL)
    assert model.train()(x).shape == (2, 128)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 128) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_iresnet_at_112_batch_1():
    model = build_model("iresnet50").eval()
    with torch.no_grad():
        out = model(_images(1, 112))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
@pytest.mark.parametrize("size", [48, 64])
def test_other_sizes(name, size):
    out = build_model(name, 64, size).train()(_images(2, size))
    assert out.shape == (2, 64)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [0, 40, 100, 113])
def test_size_not_multiple_of_16_rejected(name, size):
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model(name, 64, size)


def test_unknown_name_lists_names_and_suggests():
    with pytest.raises(ValueError) as err:
        build_model("iresnet5O")
    message = str(err.value)
    assert all(name in message for name in MODEL_NAMES)
    assert "did you mean 'iresnet50'?" in message
    with pytest.raises(ValueError, match="did you mean 'mobilefacenet'"):
        build_model("mobilefacenett")


def test_bad_embedding_size_and_dropout_rejected():
    with pytest.raises(ValueError, match="embedding_size"):
        build_model("tiny", 0, 32)
    with pytest.raises(ValueError, match="dropout"):
        build_model("tiny", 64, 32, dropout=1.0)


# --- insightface compatibility ---------------------------------------------------------------
# Derived from insightface recognition/arcface_torch/backbones/{iresnet,mobilefacenet}.py
# (get_model "r18".."r100" and "mbf" at num_features=512, 112 px): number of state-dict
# entries, number of parameters, and sha256 of "key:shape" lines in state-dict order, computed
# by instantiating that reference code. Equal fingerprints mean equal key names, order and
# shapes, so insightface's backbone.pth loads with strict=True.
INSIGHTFACE = {
    "iresnet18": (187, 24_025_600, "dc8bc15b11464dbd04bc1181fa82edd49ca51b877efa1ba98d3cf55c6e78eaa9"),
    "iresnet34": (331, 34_139_328, "ffb8c3eca78a61f94e60407901a9efedf399a98b380f5bd699f701103f170091"),
    "iresnet50": (475, 43_590_848, "a7874a3b20e3ccdb4ad32d35ccd395133a64a3d1091e7368f0e9d8403d7154c6"),
    "iresnet100": (925, 65_156_160, "c131b1e80ba72607e51b858de83c27983778b5f1142679db776d08e32a477dcf"),
    "mobilefacenet": (333, 2_059_520, "229ce022dd988d5a354f136fc0e260155a42905c6e5f8c8618b4dc9bcdde781f"),
}

# Spot checks readable without the fingerprint: a few well-known keys and shapes.
KNOWN_KEYS = {
    "iresnet50": {
        "conv1.weight": (64, 3, 3, 3),
        "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer3.13.prelu.weight": (256,),
        "layer4.2.bn3.running_var": (512,),
        "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "fc.bias": (512,),
        "features.weight": (512,),
        "features.running_mean": (512,),
    },
    "mobilefacenet": {
        "layers.0.layers.0.weight": (128, 3, 3, 3),
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # groups=64 over 128 channels
        "layers.3.layers.0.layers.1.layers.0.weight": (128, 1, 3, 3),
        "conv_sep.layers.0.weight": (512, 256, 1, 1),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),
        "features.layers.2.weight": (512, 512),
        "features.layers.3.running_var": (512,),
    },
}


def _fingerprint(state_dict):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("name", list(INSIGHTFACE))
def test_insightface_state_dict_layout(name):
    entries, params, digest = INSIGHTFACE[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(name, 512, 112)
    state = model.state_dict()
    for key, shape in KNOWN_KEYS.get(name, {}).items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert _fingerprint(state) == digest


def test_published_parameter_counts():
    # The figures quoted for insightface r50 / r100 at D=512: 43.6 M and 65.2 M.
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build_model(n).parameters()) for n in ("iresnet50", "iresnet100")}
    assert round(counts["iresnet50"] / 1e6, 1) == 43.6
    assert round(counts["iresnet100"] / 1e6, 1) == 65.2


def test_iresnet_freezes_embedding_bn_scale_like_insightface():
    model = build_model("iresnet18", 64, SMALL)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["features.weight"]
    assert torch.equal(model.features.weight, torch.ones(64))


def test_fc_input_tracks_image_size():
    with torch.device("meta"):
        assert build_model("iresnet18", 256, 64).fc.weight.shape == (256, 512 * 4 * 4)
        gdc = build_model("mobilefacenet", 256, 64).state_dict()["features.layers.0.layers.0.weight"]
    assert gdc.shape == (512, 1, 4, 4)


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
def test_every_trainable_parameter_gets_a_gradient(name):
    # An unused parameter stalls DDP/DeepSpeed gradient reduction; catch it here.
    model = build_model(name, 64, SMALL).train()
    model(_images(4, SMALL)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet34"])
def test_eval_is_deterministic_and_batch_independent(name):
    model = _calibrate(build_model(name, 64, SMALL), SMALL)
    x = _images(3, SMALL)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.equal(a, b)
    # Compared as the head sees them (L2-normalised): a randomly initialised IResNet's raw
    # outputs reach ~1e6, so only relative agreement is meaningful.
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(norm(single), norm(a), rtol=0, atol=1e-5)


def test_same_seed_same_weights():
    torch.manual_seed(7)
    a = build_model("mobilefacenet", 64, SMALL).state_dict()
    torch.manual_seed(7)
    b = build_model("mobilefacenet", 64, SMALL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
def test_dropout_only_in_training(name):
    model = build_model(name, 64, SMALL, dropout=0.5)
    x = _images(2, SMALL)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        second = model(x)
        model.eval()
        assert torch.equal(model(x), model(x))
    assert not torch.equal(first, second)


# --- encoder file ----------------------------------------------------------------------------


@pytest.fixture
def saved_tiny(tmp_path):
    model = _calibrate(build_model("tiny", 64, SMALL), SMALL)
    path = save_encoder(tmp_path / "enc.pt", model, "tiny", 64, SMALL)
    return model, path


def test_save_load_round_trip_is_bit_exact(saved_tiny):
    model, path = saved_tiny
    loaded, meta = load_encoder(path)
    assert meta == {"format": ENCODER_FORMAT, "version": 1, "arch": "tiny", "embedding_size": 64, "image_size": SMALL}
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = _images(5, SMALL)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_file_is_a_plain_weights_only_dict(saved_tiny):
    _, path = saved_tiny
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "version", "arch", "embedding_size", "image_size", "state_dict"}
    assert payload["format"] == "pm_dist.encoder" and payload["version"] == 1
    assert os.listdir(path.parent) == ["enc.pt"]  # no temp file left behind


def test_save_overwrites_atomically_and_refuses_mismatched_model(tmp_path):
    path = tmp_path / "enc.pt"
    first = build_model("tiny", 64, SMALL)
    save_encoder(path, first, "tiny", 64, SMALL)
    before = path.read_bytes()
    with pytest.raises(EncoderFileError, match="does not match mobilefacenet"):
        save_encoder(path, first, "mobilefacenet", 64, SMALL)
    with pytest.raises(EncoderFileError, match="expected"):
        save_encoder(path, first, "tiny", 128, SMALL)  # wrong D: shape mismatch
    assert path.read_bytes() == before
    second = build_model("tiny", 64, SMALL)
    save_encoder(path, second, "tiny", 64, SMALL)
    assert torch.equal(load_encoder(path)[0].fc.weight, second.fc.weight)
    assert os.listdir(tmp_path) == ["enc.pt"]


def test_truncated_file_names_the_file(saved_tiny):
    _, path = saved_tiny
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EncoderFileError, match="cannot be read as PyTorch weights") as err:
        load_encoder(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"garbage, not a torch file", "cannot be read as PyTorch weights"),
        ([1, 2, 3], "expected a dict"),
        ({"format": "something.else", "state_dict": {}}, "is not 'pm_dist.encoder'"),
        ({"format": "pm_dist.encoder", "version": 2}, "version 2"),
        ({"format": "pm_dist.encoder", "version": 1, "arch": "resnet", "embedding_size": 8, "image_size": 32},
         "unknown arch 'resnet'"),
        ({"format": "pm_dist.encoder", "version": 1, "arch": "tiny", "embedding_size": 8, "image_size": 32},
         "no state_dict"),
        ({"weights": [1.0]}, "neither a pm_dist encoder file nor a state dict"),
        ({"fc.weight": torch.zeros(2, 2)}, "bare state dict; pass arch="),
    ],
)
def test_wrong_files_raise_clear_errors(tmp_path, payload, message):
    path = tmp_path / "bad.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(EncoderFileError, match=message) as err:
        load_encoder(path)
    assert str(path) in str(err.value)


def test_weights_that_do_not_fit_name_the_key(saved_tiny):
    _, path = saved_tiny
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["fc.weight"]
    torch.save(payload, path)
    with pytest.raises(EncoderFileError, match="missing fc.weight"):
        load_encoder(path)


def test_arch_must_agree_with_file(saved_tiny):
    _, path = saved_tiny
    with pytest.raises(EncoderFileError, match="holds a tiny encoder, not iresnet18"):
        load_encoder(path, arch="iresnet18")
    assert load_encoder(path, arch="tiny")[1]["arch"] == "tiny"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_encoder(tmp_path / "nope.pt")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_insightface_state_dict_loads_with_arch(tmp_path, prefix):
    # insightface saves backbone.module.state_dict(); DDP-wrapped saves add "module.".
    reference = _calibrate(build_model("mobilefacenet", 128, SMALL), SMALL)
    path = tmp_path / "backbone.pth"
    torch.save({prefix + k: v for k, v in reference.state_dict().items()}, path)
    loaded, meta = load_encoder(path, arch="mobilefacenet", embedding_size=128, image_size=SMALL)
    assert meta["format"] == "state_dict" and meta["arch"] == "mobilefacenet"
    x = _images(2, SMALL)
    with torch.no_grad():
        assert torch.equal(reference(x), loaded(x))
    with pytest.raises(EncoderFileError, match="do not fit mobilefacenet"):
        load_encoder(path, arch="mobilefacenet", embedding_size=128, image_size=64)

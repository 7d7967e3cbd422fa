"""Embedding extraction: insightface's input normalization and flip, eval mode, and W = 2 ranks giving
the same embeddings and results as one process (a failure on one rank surfacing on all)."""

import math

import numpy as np
import pytest
import torch

from pm_dist.eval.embed import EmbeddingError, batch_range, extract_embeddings, to_input
from pm_dist.eval.images import ArraySource
from pm_dist.eval.verification import VerificationSet, evaluate_verification


class SmallNet(torch.nn.Module):
    """Conv + BatchNorm + Linear: BatchNorm makes train vs eval mode matter."""

    def __init__(self, d=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, d)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():  # non-trivial running statistics, so eval mode is visible
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def make_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_input_normalization_is_insightfaces():
    batch = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = to_input(batch, "cpu")
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    ref = ((torch.from_numpy(batch).permute(0, 3, 1, 2) / 255) - 0.5) / 0.5
    assert torch.equal(x, ref)
    assert x.min() == -1 and x.max() == 1


class LeftColumn(torch.nn.Module):
    """Embedding = the leftmost pixel column of channel 0: shows which image the model saw."""

    def forward(self, x):
        return x[:, 0, :, 0]


def test_flip_embeds_the_mirrored_image():
    imgs = make_images(3)
    emb = extract_embeddings(LeftColumn(), imgs, batch_size=2)
    x = to_input(imgs, "cpu")
    assert np.array_equal(emb.plain, x[:, 0, :, 0].numpy())
    assert np.array_equal(emb.flipped, x[:, 0, :, -1].numpy())  # the right column, mirrored in
    np.testing.assert_array_equal(emb.combined(), emb.plain.astype(np.float64) + emb.flipped.astype(np.float64))
    assert extract_embeddings(LeftColumn(), imgs, flip=False).flipped is None


def test_eval_mode_during_extraction_and_mode_restored():
    model = make_model()
    imgs = make_images(6)
    model.train()
    emb = extract_embeddings(model, imgs, batch_size=4)
    assert model.training  # restored
    with torch.no_grad():
        expected = model.eval()(to_input(imgs, "cpu")).numpy()
    np.testing.assert_allclose(emb.plain, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,bs,world", [(10, 4, 2), (3, 4, 2), (17, 2, 3), (64, 8, 4)])
def test_batch_ranges_partition_the_batches(n, bs, world):
    ranges = [batch_range(n, bs, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == -(-n // bs)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# --- two ranks ---------------------------------------------------------------------------------


class CountingNet(SmallNet):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _extract_on_rank(state, images, batch_size):
    """On each rank: distributed extraction, and the same batches embedded directly in this process."""
    model = CountingNet()
    model.load_state_dict(state)
    emb = extract_embeddings(model, images, batch_size)
    calls = model.calls
    model.eval()
    direct = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = to_input(images[s : s + batch_size], "cpu")
            direct.append(np.concatenate([model(x).numpy(), model(torch.flip(x, dims=[3])).numpy()], 1))
    direct = np.concatenate(direct)
    d = emb.plain.shape[1]
    return emb.plain, emb.flipped, bool(np.array_equal(emb.plain, direct[:, :d]) and
                                        np.array_equal(emb.flipped, direct[:, d:])), calls


@pytest.mark.parametrize("n,batch_size", [(10, 4), (3, 4)])  # (3, 4): rank 1 has no batch at all
def test_two_ranks_same_embeddings_as_one_process(dist_pool, n, batch_size):
    model = make_model()
    images = make_images(n)
    single = extract_embeddings(model, images, batch_size)
    results = dist_pool(2).run(_extract_on_rank, model.state_dict(), images, batch_size)
    # both ranks call the model equally often (ZeRO-3 needs it), even one without a batch
    steps = math.ceil(math.ceil(n / batch_size) / 2)
    assert results[0][3] == results[1][3] == 2 * steps  # plain + flipped per step
    for plain, flipped, bitwise_same_as_direct, _ in results:
        assert plain.shape == (n, 8)
        assert bitwise_same_as_direct
        np.testing.assert_array_equal(plain, results[0][0])  # every rank holds the same
        np.testing.assert_allclose(plain, single.plain, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(flipped, single.flipped, rtol=1e-6, atol=1e-6)


class FailingSource(ArraySource):
    def read(self, start, stop):
        if start <= 7 < stop:
            raise ValueError("image 7 is corrupt")
        return super().read(start, stop)


def _extract_failing(images):
    try:
        extract_embeddings(SmallNet(), FailingSource(images), batch_size=2)
    except EmbeddingError as exc:
        return str(exc)
    return None


def test_failure_on_one_rank_raises_on_every_rank(dist_pool):
    # image 7 is in batch 3, which rank 1 embeds; rank 0 must not be left waiting
    messages = dist_pool(2).run(_extract_failing, make_images(10))
    assert messages[0] == messages[1] == "embedding extraction failed on rank 1: ValueError: image 7 is corrupt"
    with pytest.raises(EmbeddingError, match="image 7 is corrupt"):
        extract_embeddings(SmallNet(), FailingSource(make_images(10)), batch_size=2)


def _evaluate_on_rank(state, images, issame):
    model = SmallNet()
    model.load_state_dict(state)
    return evaluate_verification(model, VerificationSet("rand", images, issame), batch_size=6)


def test_evaluate_verification_same_dict_on_every_rank_and_as_single(dist_pool):
    model = make_model()
    images = make_images(60, seed=1)
    issame = np.arange(30) % 2 == 0
    single = evaluate_verification(model, VerificationSet("rand", images, issame), batch_size=6)
    r0, r1 = dist_pool(2).run(_evaluate_on_rank, model.state_dict(), images, issame)
    assert r0 == r1
    for key in ("fold_accuracy", "fold_threshold", "insightface_line", "tar_at_far", "num_pairs"):
        assert r0[key] == single[key], key
    assert r0["xnorm"] == pytest.approx(single["xnorm"], rel=1e-6)


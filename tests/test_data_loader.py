"""The training loader: normalisation, bit-identical resumption, world-size invariance, bad samples,
and a failure on one rank surfacing on every rank."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pm_dist.data.config import DataConfig
from pm_dist.data.to_arrow import convert_dataset
from pm_dist.data.errors import BadSampleError, DataError, PeerDataError
from pm_dist.data.loader import build_train_loader, flips_for
from pm_dist.data.sampler import PKSampler
from pm_dist.data.datasets import ArrowDataset
from pm_dist.data.raw_sources import FolderSource, SyntheticSource
from pm_dist.data.synthetic import SyntheticIdentities

SYN = dict(num_identities=40, image_size=16, count_median=6, count_sigma=0.6, seed=11)


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_normalised_like_insightface():
    cfg = DataConfig(**SYN, num_workers=0)
    x, y = next(build_train_loader(cfg, P=4, K=3, rank=0, world_size=1))
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    gen = SyntheticIdentities(**cfg.synthetic_kwargs())
    batch = PKSampler(build_train_loader(cfg, 4, 3, 0, 1).dataset, 4, 3, seed=cfg.seed).global_batch(0)
    flips = flips_for(cfg.seed, 0, 12)
    assert 0 < flips.sum() < 12
    for j, (i, label) in enumerate(zip(batch.indices, batch.labels)):
        img = gen.render(*divmod(int(i), 1 << 20))
        if flips[j]:
            img = img[:, ::-1]
        ref = (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert torch.equal(x[j], ref) and y[j] == label
    plain, _ = next(build_train_loader(DataConfig(**SYN, num_workers=0, augment=False), 4, 3, 0, 1))
    assert torch.equal(plain[~torch.from_numpy(flips)], x[~torch.from_numpy(flips)])


def test_resumed_loader_is_bit_identical_whatever_the_workers():
    cfg = DataConfig(**SYN, num_workers=2)
    straight = build_train_loader(cfg, P=4, K=2, rank=1, world_size=2)
    first = batches(straight, 5)
    assert straight.step == 5
    resumed = build_train_loader(DataConfig(**SYN, num_workers=0), 4, 2, 1, 2, start_step=3)
    assert_same(first[3:], batches(resumed, 2))


def test_loader_leaves_the_global_torch_rng_alone():
    """Dropout and initialisation draw from the global RNG: a loader that consumed from it (as a
    DataLoader iterator does for its base seed by default) would make a resumed run drift."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = build_train_loader(DataConfig(**SYN, num_workers=1), 4, 2, 0, 1)
    next(loader)
    loader.close()
    assert torch.equal(torch.rand(3), expected)


def test_arrow_copy_of_synthetic_data_gives_the_same_batches(tmp_path):
    gen = SyntheticIdentities(**SYN)
    convert_dataset(SyntheticSource(gen), str(tmp_path / "syn"), shard_rows=50)
    syn = build_train_loader(DataConfig(**SYN, num_workers=0), 6, 2, 0, 1)
    arrow = build_train_loader(DataConfig(source="arrow", path=str(tmp_path / "syn"), image_size=16,
                                          seed=SYN["seed"], num_workers=1), 6, 2, 0, 1)
    assert_same(batches(syn, 3), batches(arrow, 3))


def folder_with_bad_image(root, bad: str = "c/001.png") -> str:
    for name in "abcd":
        os.makedirs(os.path.join(root, name))
        for k in range(3):
            rel = f"{name}/{k:03d}.png"
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * k + ord(name) % 50, np.uint8)).save(buf, "PNG")
            data = buf.getvalue()[:-30] if rel == bad else buf.getvalue()  # truncated PNG
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
    out = os.path.join(os.path.dirname(root), "arrow")
    convert_dataset(FolderSource(root), out, decode_check=False)  # let the bad image through
    return out


def test_bad_sample_is_skipped_and_counted_or_named_in_the_error(tmp_path):
    path = folder_with_bad_image(str(tmp_path / "src"))
    cfg = DataConfig(source="arrow", path=path, image_size=16, bad_sample="skip", num_workers=0)
    loader = build_train_loader(cfg, P=4, K=3, rank=0, world_size=1)  # every identity, every image
    x, y = next(loader)
    assert x.shape[0] == 11 and (y == 2).sum() == 2
    assert loader.bad_count == 1 and loader.bad_sources == ["c/001.png"]
    strict = build_train_loader(DataConfig(**{**cfg.__dict__, "bad_sample": "error"}), 4, 3, 0, 1)
    with pytest.raises(BadSampleError, match=r"shard-00000\.arrow row 7, sample index 7, source 'c/001\.png'"
                                             r": image does not decode"):
        next(strict)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"DataConfig.sampling = 'often'"):
        DataConfig(sampling="often").validate()
    with pytest.raises(ValueError, match=r"DataConfig.path"):
        DataConfig(source="arrow").validate()
    with pytest.raises(ValueError, match="unknown data config field"):
        DataConfig.from_dict({"num_identity": 3})
    assert DataConfig.from_dict({"num_identities": 3, "image_size": 24}).image_size == 24


# -- several ranks ---------------------------------------------------------------------------------
def _rank_batches(cfg_dict, P, K, steps):
    import torch.distributed as dist

    cfg = DataConfig(**cfg_dict)
    loader = build_train_loader(cfg, P, K, dist.get_rank(), dist.get_world_size())
    return batches(loader, steps)


def _rank_outcome(cfg_dicts, P, K, steps):
    """Run ``steps`` batches on this rank; report how it ended (never hangs the test)."""
    import torch.distributed as dist

    cfg = DataConfig(**cfg_dicts[dist.get_rank()])
    try:
        loader = build_train_loader(cfg, P, K, dist.get_rank(), dist.get_world_size())
        batches(loader, steps)
        return ("ok", "")
    except Exception as e:  # noqa: BLE001 - the outcome is the test's subject
        return (type(e).__name__, str(e))


def test_union_of_rank_batches_is_the_single_process_batch(dist_pool):
    cfg = dict(SYN, num_workers=0)
    reference = batches(build_train_loader(DataConfig(**cfg), 4, 3, 0, 1), 3)
    per_rank = dist_pool(2).run(_rank_batches, cfg, 4, 3, 3)
    joined = [(torch.cat([r[s][0] for r in per_rank]), torch.cat([r[s][1] for r in per_rank]))
              for s in range(3)]
    assert_same(reference, joined)


def test_a_bad_sample_on_one_rank_stops_every_rank(tmp_path, dist_pool):
    path = folder_with_bad_image(str(tmp_path / "src"), bad="b/000.png")
    ds = ArrowDataset(path)
    bad_row = 3  # rows: a/000..a/002 (0-2), b/000 (3)
    assert ds.read(bad_row)[2] == "b/000.png"

    def first_draw(seed):  # (step, ranks holding it) of the first batch that draws the bad image
        halves = [PKSampler(ds, 4, 2, 2, r, seed=seed) for r in (0, 1)]
        for s in range(100):
            ranks = [r for r in (0, 1) if bad_row in halves[r].local_batch(s).indices.tolist()]
            if ranks:
                return s, ranks

    # a seed under which rank 1 alone meets it first, so rank 0's own batches are all fine
    seed, (step, _) = next((seed, d) for seed in range(100) if (d := first_draw(seed))[1] == [1])
    cfg = dict(source="arrow", path=path, image_size=16, num_workers=0, seed=seed)
    outcomes = dist_pool(2).run(_rank_outcome, [cfg, cfg], 4, 2, step + 1)
    assert outcomes[1][0] == "BadSampleError" and "b/000.png" in outcomes[1][1]
    assert outcomes[0][0] == "PeerDataError"
    assert f"rank 1 failed to load its batch of step {step}" in outcomes[0][1] and "b/000.png" in outcomes[0][1]


def test_a_dataset_missing_on_one_rank_stops_every_rank(tmp_path, dist_pool):
    good = dict(SYN, num_workers=0)
    bad = dict(source="arrow", path=str(tmp_path / "nowhere"), image_size=16, num_workers=0)
    outcomes = dist_pool(2).run(_rank_outcome, [good, bad], 4, 2, 1)
    assert outcomes[1][0] == "DataError" and "no manifest" in outcomes[1][1]
    assert outcomes[0][0] == "PeerDataError" and "rank 1 failed to open the training data" in outcomes[0][1]
    assert issubclass(PeerDataError, DataError)


@pytest.mark.cuda
def test_failure_agreement_works_in_an_nccl_group(tmp_path):
    """NCCL groups take CUDA tensors only: the per-step agreement must put its flag there."""
    import torch.distributed as dist

    from pm_dist.data.loader import _agree_on_failure

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _agree_on_failure(None, "to load")  # nothing failed: returns
        with pytest.raises(BadSampleError, match="broken"):
            _agree_on_failure(BadSampleError("here", 1, "x.jpg", "broken"), "to load")
    finally:
        dist.destroy_process_group()

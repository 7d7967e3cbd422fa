import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import test modules by name

from dist_pool import DistPool  # noqa: E402

_pools: dict[int, DistPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(W)``: a shared gloo group of W ranks, started once per session."""

    def get(world_size: int) -> DistPool:
        pool = _pools.get(world_size)
        if pool is None or not pool.alive:
            pool = _pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in _pools.values():
        pool.close()
    _pools.clear()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

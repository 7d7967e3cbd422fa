"""The mining benchmarks' settings: ``--extra`` overrides reach the run's config and win over the
benchmark's own setting (docs/mining.md quotes runs made that way)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import mining_accuracy, mining_recovery
from pm_dist.config import load_config
from pm_dist.config_io import ConfigError


def test_recovery_extra_overrides_the_setting():
    cfg = load_config(None, mining_recovery.overrides(
        300, 0.5, 3, ["batch.classes_per_batch=32", "data.doppelganger_distance=0.05"]))
    assert cfg.batch.classes_per_batch == 32 and cfg.data.doppelganger_distance == 0.05
    assert (cfg.run.steps, cfg.run.seed, cfg.data.seed, cfg.mining.fraction) == (300, 3, 3, 0.5)
    plain = load_config(None, mining_recovery.overrides(300, 0.5, 3))
    assert plain.batch.classes_per_batch == 16 and plain.data.doppelganger_distance == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'data.doppelganger_distanse'"):
        load_config(None, mining_recovery.overrides(300, 0.5, 3, ["data.doppelganger_distanse=1"]))


def _accuracy_args(extra):
    return argparse.Namespace(steps=300, image_size=16, identities=120, doppelganger_fraction=0.5,
                              P=32, capacity=128, pairs=2000, extra=extra)


def test_accuracy_extra_overrides_the_setting(tmp_path):
    args = _accuracy_args(["data.doppelganger_distance=0.05", "data.nuisance=0.25"])
    cfg = load_config(None, mining_accuracy._overrides(args, "prototype_memory", 1, 0.5,
                                                       str(tmp_path)))
    assert cfg.data.doppelganger_distance == 0.05 and cfg.data.nuisance == 0.25
    assert cfg.data.num_identities == 120 and cfg.mining.enabled and cfg.head.sections["memory"].capacity == 128
    off = load_config(None, mining_accuracy._overrides(_accuracy_args([]), "full_fc", 1, 0.0,
                                                       str(tmp_path)))
    assert not off.mining.enabled and off.data.doppelganger_distance == 0.3

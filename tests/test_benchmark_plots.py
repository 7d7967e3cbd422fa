"""The benchmarks' PNG plots (matplotlib, an optional extra in ``bench`` and ``test``): drawn from a
few fabricated result rows with the keys the benchmarks write, they are real images; without
matplotlib the benchmarks say so and write none."""

from __future__ import annotations

import builtins
import sys

import pytest

from benchmarks import accuracy, common, head_scaling


def _head_scaling_rows() -> list[dict]:
    rows = []
    for head, scale in (("prototype_memory", 1.0), ("full_fc", 3.0), ("partial_fc", 2.0)):
        for world in (1, 2):
            for n in (1e3, 1e4):
                rows.append({"head": head, "world_size": world, "identities": int(n),
                             "step_s": scale * n * 1e-6 / world,
                             "peak_memory_bytes": int(scale * n * 512 * 4 / world)})
    rows.append({"head": "full_fc", "world_size": 1, "identities": 10**8, "skipped": "too big",
                 "step_s": None, "peak_memory_bytes": None})  # a skipped case is left out
    return rows


def _accuracy_rows() -> list[dict]:
    rows = []
    for head, acc in (("prototype_memory", 0.9), ("full_fc", 0.85), ("partial_fc", 0.8)):
        for n in (1000, 10000):
            for seed in (0, 1):
                rows.append({"head": head, "identities": n, "seed": seed, "steps": 400,
                             "accuracy": acc - 0.01 * seed,
                             "staleness": {"target": {"rare": 30.0, "middle": 10.0, "frequent": 2.0},
                                           "negative_update": {"rare": 50.0, "middle": None,
                                                               "frequent": 5.0}}})
    rows.append({**rows[0], "variant": "cap1%"})  # a sweep's run: not in the grid's plots
    rows.append({**rows[0], "steps": 1000})  # a longer schedule: not in the plots either
    return rows


def _check_pngs(paths: list[str], names: list[str]) -> None:
    from PIL import Image

    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(names)
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100, path
            low, high = image.convert("L").getextrema()
            assert high > low, f"{path} is blank"


def test_pyplot_uses_the_file_only_backend():
    pytest.importorskip("matplotlib")
    plt = common.pyplot()
    assert plt is not None and plt.get_backend().lower() == "agg"


def test_head_scaling_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    paths = head_scaling.plots(_head_scaling_rows(), tmp_path)
    _check_pngs(paths, ["head_scaling_time.png", "head_scaling_memory.png"])


def test_accuracy_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    paths = accuracy.plots(_accuracy_rows(), tmp_path)
    _check_pngs(paths, ["accuracy_vs_n.png", "staleness_vs_frequency.png"])
    assert accuracy.plots([], tmp_path / "none") == []  # nothing to draw: no file, no error
    assert accuracy.plots([{**_accuracy_rows()[0], "variant": "x"}], tmp_path / "none") == []


@pytest.fixture
def no_matplotlib(monkeypatch):
    """``import matplotlib`` fails, as on an install without the bench/test extras."""
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_without_matplotlib_the_benchmarks_say_so_and_write_nothing(no_matplotlib, tmp_path, capsys):
    assert common.pyplot() is None
    assert "matplotlib is not importable" in capsys.readouterr().out
    assert head_scaling.plots(_head_scaling_rows(), tmp_path) == []
    assert accuracy.plots(_accuracy_rows(), tmp_path) == []
    out = capsys.readouterr().out
    assert out.count("matplotlib is not importable") == 2 and "no PNG plots" in out
    assert list(tmp_path.iterdir()) == []

"""The accuracy benchmark's bookkeeping (benchmarks/accuracy.py): which runs a sweep queues and how
the report aggregates seeds. The runs themselves are benchmarks, not tests."""

from __future__ import annotations

from benchmarks.accuracy import pm_option_variants, report

STALE = {key: {"rare": 1.0, "middle": 2.0, "frequent": None}
         for key in ("target", "negative_update", "negative_positive")}


def _row(seed, accuracy, extra=(), variant="", **kw):
    return dict(head="prototype_memory", identities=10_000, seed=seed, columns=500, steps=400,
                variant=variant, extra=list(extra), accuracy=accuracy, rank1=0.2,
                tar_at_far={"1e-03": 0.05, "1e-04": None}, loss_first=40.0, loss_late=27.0,
                seconds=90.0 + 20 * seed, staleness=STALE, **kw)


def test_sweep_variants_scale_capacity_with_n_and_can_be_narrowed():
    every = dict(pm_option_variants(10_000)("prototype_memory"))
    assert every["cap1%"] == ["head.memory.capacity=100"]
    assert every["cap20%"] == ["head.memory.capacity=2000"]
    assert every["default"] == [] and every["fresh"] == ["head.memory.positive=fresh"]
    only = pm_option_variants(10_000, ["default", "cap10%"])("prototype_memory")
    assert only == [("default", []), ("cap10%", ["head.memory.capacity=1000"])]


def test_report_mean_and_half_range_over_seeds_per_variant():
    rows = [_row(0, 0.80), _row(1, 0.86),
            _row(0, 0.70, ["head.memory.capacity=100"], "cap1%", base="positive=fresh")]
    lines = report(rows).splitlines()
    default = next(line for line in lines if line.startswith("| Prototype Memory") and "defaults" in line)
    cells = [c.strip() for c in default.split("|")[1:-1]]
    assert cells[3] == "500" and cells[5] == "2"  # columns, seeds
    assert cells[6] == "0.830 ± 0.030"  # mean, half the range
    assert cells[8] == "–"  # TAR@FAR=1e-4 missing in every seed
    assert cells[11] == "100"  # mean seconds
    cap = next(line for line in lines if "**cap1%**" in line and "0.700" in line)
    assert "| 100 |" in cap and "`base: positive=fresh`" in cap  # the override sets the columns
    staleness = [line for line in lines if "1 / 2 / –" in line]
    assert len(staleness) == 2 and all(line.count("1 / 2 / –") == 3 for line in staleness)


def test_report_shows_the_evaluations_on_the_way_averaged_over_seeds():
    curve = lambda acc: [dict(step=500, accuracy=acc, rank1=0.1), dict(step=1000, accuracy=acc + 0.1,
                                                                          rank1=0.3)]
    rows = [_row(0, 0.80, curve=curve(0.60)), _row(1, 0.86, curve=curve(0.70)), _row(2, 0.9)]
    lines = report(rows).splitlines()
    header = next(line for line in lines if line.startswith("| head | N | options | step"))
    assert header.endswith("| step 500 | step 1000 |")
    row = lines[lines.index(header) + 2]
    assert row.endswith("| 0.650 / 0.10 | 0.750 / 0.30 |")  # the seeds that have a curve
    assert "on the way" not in report([_row(0, 0.8)])

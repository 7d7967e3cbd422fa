"""The evaluation report: a rich table on the console, a JSON file and one ROC plot (PNG) per result.

Only rank 0 writes (the results are identical on every rank); other ranks return ``None``. Files
are ``eval.json`` and ``roc_<name>.png``, or with ``step`` (periodic evaluation during training)
``eval_step<step>.json`` and ``roc_<name>_step<step>.png``, so earlier reports are kept.

Number formats follow the tools users compare against: verification accuracy as insightface logs it
(``0.99817 ± 0.00229``, and its literal ``[lfw]Accuracy-Flip: ...`` line under the table), TAR/TPIR in
percent with two decimals as insightface's IJB tables. A value the data cannot measure is "—".
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from rich.console import Console
from rich.table import Table

from pm_dist.distributed import get_rank
from pm_dist.files import atomic_write_json

from .plot import plot_curves


def _clean(obj):
    """JSON-safe copy: numpy → Python, NaN/inf → None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pct(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _suffix(step) -> str:
    return "" if step is None else f"_step{int(step):07d}"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "result"


def _measured_keys(results: list[dict], field: str) -> list[str]:
    """The keys of ``field`` (FARs, FPIRs, ranks) with a value on at least one result, in order."""
    keys = []
    for r in results:
        keys += [k for k, v in r.get(field, {}).items() if v is not None and k not in keys]
    return keys


def _pm(value, std) -> str:
    return "—" if value is None or not math.isfinite(value) else "%1.5f ± %1.5f" % (value, std)


def _verification_table(results):
    fars = _measured_keys(results, "tar_at_far")
    header = ["set", "pairs", "accuracy-flip", "VAL@FAR=1e-3", "XNorm"] + [f"TAR@FAR={k} %" for k in fars] + ["s"]
    rows = [[r["name"], str(r["num_pairs"]), _pm(r["accuracy"], r["accuracy_std"]), _pm(r["val"], r["val_std"]),
             f"{r['xnorm']:.3f}", *(_pct(r["tar_at_far"].get(k)) for k in fars), f"{r['seconds']:.1f}"]
            for r in results]
    return header, rows


def _pairs_table(results):
    fars = _measured_keys(results, "tar_at_far")
    header = ["list", "same / different"] + [f"TAR@FAR={k} %" for k in fars] + ["AUC %", "s"]
    rows = [[r["name"], f"{r['num_same']} / {r['num_different']}", *(_pct(r["tar_at_far"].get(k)) for k in fars),
             _pct(r["auc"]), f"{r['seconds']:.1f}"]
            for r in results]
    return header, rows


def _identification_table(results):
    ranks, fpirs = _measured_keys(results, "rank"), _measured_keys(results, "tpir_at_fpir")
    header = ["probes", "subjects", "mated / non-mated", *(f"rank-{k} %" for k in ranks),
              *(f"TPIR@FPIR={k} %" for k in fpirs), "s"]
    rows = [[r["name"], str(r["num_gallery_subjects"]), f"{r['num_mated_probes']} / {r['num_nonmated_probes']}",
             *(_pct(r["rank"].get(k)) for k in ranks), *(_pct(r["tpir_at_fpir"].get(k)) for k in fpirs),
             f"{r['seconds']:.1f}"]
            for r in results]
    return header, rows


_TABLES = {
    "verification": ("Verification, 10-fold insightface protocol", _verification_table),
    "pairs": ("Verification on pair lists", _pairs_table),
    "identification": ("1:N identification (TPIR at the threshold with FPIR <= target)", _identification_table),
}


def _scalar(value) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.5g}"
    return str(value)


def _generic_table(results):
    """Any other kind (a plugin suite's): its headline first, then its other scalar values."""
    keys = []
    for r in results:
        keys += [k for k in r.get("headline", []) if k not in keys]
    for r in results:
        keys += [k for k, v in r.items() if k not in keys and k not in ("name", "kind", "headline")
                 and isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    rows = [[r["name"], *(_scalar(r[k]) if k in r else "—" for k in keys)] for r in results]
    return ["set", *keys], rows


def print_report(results: list[dict], console: Console | None = None, step=None) -> None:
    """One table per kind of result (a generic one for kinds without their own, such as a plugin
    suite's), then insightface's own log line for each ``.bin`` set."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
            console = Console(width=160)
    tables = dict(_TABLES)
    for kind in dict.fromkeys(r["kind"] for r in results):
        if kind not in tables:
            tables[kind] = (f"{kind} results", _generic_table)
    for kind, (title, build) in tables.items():
        chosen = [r for r in results if r["kind"] == kind]
        if not chosen:
            continue
        header, rows = build(chosen)
        method = next((r["tar_method"] for r in chosen if r.get("tar_method")), None)
        if method:
            title += f"; TAR@FAR read: {method}"
        table = Table(title=title + ("" if step is None else f"; step {step}"))
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for r in results:
        if r.get("insightface_line"):
            console.print(r["insightface_line"], markup=False, highlight=False)


def write_report(results: list[dict] | dict, out_dir: str | os.PathLike, step: int | None = None,
                 console: Console | None = None) -> dict | None:
    """Print, save and plot ``results`` on rank 0; returns ``{"json": path, "plots": [paths]}``.

    Other ranks do nothing and return ``None``, so the training loop may call it on every rank.
    """
    if get_rank() != 0:
        return None
    results = [results] if isinstance(results, dict) else list(results)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    print_report(results, console, step)

    json_path = os.path.join(out_dir, f"eval{_suffix(step)}.json")
    atomic_write_json(json_path, {"step": step, "results": _clean(results)})

    plots = []
    for r in results:
        curve = r.get("curve")
        if not curve:
            continue
        path = os.path.join(out_dir, f"roc_{_file_name(r['name'])}{_suffix(step)}.png")
        label = r["name"]
        if r["kind"] == "verification":
            label += f" (acc {100 * r['accuracy']:.2f}%)"
        elif r.get("auc") is not None:
            label += f" (AUC {100 * r['auc']:.2f}%)"
        plot_curves(path, f"{r['name']} - {r['kind']}" + ("" if step is None else f", step {step}"),
                    [{"x": curve["x"], "y": curve["y"], "label": label}],
                    curve.get("xlabel", "FAR"), curve.get("ylabel", "TAR"), curve.get("xscale", "log"))
        plots.append(path)
    return {"json": json_path, "plots": plots}

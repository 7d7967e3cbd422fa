"""Evaluations read from list files (IJB style): pair lists (ROC, TAR@FAR) and template identification.

Each returns a result dict (``name``, ``kind``, metrics, ``curve``) that ``eval.report`` prints and
plots. Like ``evaluate_verification`` they run on every rank under torchrun (embedding shared out,
metrics computed everywhere) and return the same dict on every rank. List files are parsed on every
rank, so a malformed list fails on all ranks alike before any collective.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .embed import extract_embeddings, slowest_rank_seconds
from .identification import identification_metrics
from .images import FileSource
from .lists import read_pair_list, read_subject_list, read_template_list
from .roc import roc_metrics
from .templates import aggregate_templates


def _name(path: str, name: str | None) -> str:
    return name or os.path.splitext(os.path.basename(os.fspath(path)))[0]


def pair_scores(feats: np.ndarray, ia: np.ndarray, ib: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Cosine of rows ``ia[k]``, ``ib[k]`` of normalized ``feats``, in chunks (IJB-C has 15M pairs)."""
    out = np.empty(ia.size)
    for s in range(0, ia.size, chunk):
        out[s : s + chunk] = np.einsum("ij,ij->i", feats[ia[s : s + chunk]], feats[ib[s : s + chunk]])
    return out


def evaluate_pair_list(
    model, pairs_path: str, templates_path: str | None = None, root: str | None = None,
    image_size: int = 112, batch_size: int = 64, device="cpu", flip: bool = True,
    tar_method: str = "nearest", name: str | None = None,
) -> dict:
    """ROC and TAR@FAR of a pair list (image pairs, or template pairs with a template list)."""
    start = time.perf_counter()
    if templates_path is not None:
        tl = read_template_list(templates_path, root)
        pairs = read_pair_list(pairs_path, root, set(tl.templates))
        emb = extract_embeddings(model, FileSource(tl.images, image_size), batch_size, device, flip)
        keys, feats = aggregate_templates(emb.combined(), tl.templates, tl.medias)
        unit = "template"
    else:
        pairs = read_pair_list(pairs_path, root)
        keys = list(dict.fromkeys(pairs.a + pairs.b))  # each image embedded once
        emb = extract_embeddings(model, FileSource(keys, image_size), batch_size, device, flip)
        feats = emb.normalized()
        unit = "image"
    index = {k: i for i, k in enumerate(keys)}
    ia = np.fromiter((index[k] for k in pairs.a), dtype=np.int64, count=len(pairs.a))
    ib = np.fromiter((index[k] for k in pairs.b), dtype=np.int64, count=len(pairs.b))
    roc = roc_metrics(pairs.labels, pair_scores(feats, ia, ib), method=tar_method)
    return {
        "name": _name(pairs_path, name),
        "kind": "pairs",
        "protocol": f"{unit} pairs, cosine, flip={'on' if flip else 'off'}",
        **roc,
        "xnorm": emb.xnorm(),
        "seconds": slowest_rank_seconds(start),
    }


def evaluate_identification_lists(
    model, templates_path: str, gallery_path: str, probes_path: str, root: str | None = None,
    image_size: int = 112, batch_size: int = 64, device="cpu", flip: bool = True, name: str | None = None,
) -> dict:
    """1:N identification of probe templates against gallery templates (subject lists, see lists.py)."""
    start = time.perf_counter()
    tl = read_template_list(templates_path, root)
    known = set(tl.templates)
    gallery = read_subject_list(gallery_path, known)
    probes = read_subject_list(probes_path, known)
    used = [i for i, t in enumerate(tl.templates) if t in gallery or t in probes]
    emb = extract_embeddings(model, FileSource([tl.images[i] for i in used], image_size), batch_size, device, flip)
    keys, feats = aggregate_templates(
        emb.combined(), [tl.templates[i] for i in used], [tl.medias[i] for i in used]
    )
    index = {k: i for i, k in enumerate(keys)}
    g_keys, p_keys = list(gallery), list(probes)
    metrics = identification_metrics(
        feats[[index[k] for k in g_keys]], [gallery[k] for k in g_keys],
        feats[[index[k] for k in p_keys]], [probes[k] for k in p_keys],
    )
    return {
        "name": _name(probes_path, name),
        "kind": "identification",
        "protocol": f"templates, cosine, flip={'on' if flip else 'off'}",
        **metrics,
        "seconds": slowest_rank_seconds(start),
    }

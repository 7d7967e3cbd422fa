"""1:N identification: a probe searched against a gallery of enrolled subjects.

Scores are cosines of normalized templates. A subject with several gallery templates scores the best
of them. Definitions (those of NIST's FRVT 1:N reports and the IJB-B/C papers):

* **rank-k** (closed set, CMC): over *mated* probes (subject enrolled), the fraction whose subject is
  among the k best-scoring subjects (``None`` when k exceeds the number of gallery subjects). Ties count against the probe: rank = 1 + number of other subjects
  scoring at least as high as the mate.
* **FPIR(t)**: over *non-mated* probes (subject not enrolled), the fraction whose best score is ≥ t.
  **TPIR(t)**: over mated probes, the fraction whose mate is rank 1 with score ≥ t.
  **TPIR at FPIR = f**: at the lowest threshold whose FPIR does not exceed f (no interpolation: the
  operating point one can set). Undefined (``None``) without non-mated probes, or when f < 1 / (number
  of non-mated probes), which the list cannot measure.

insightface's ``ijb_1n.py`` reports something else under the name "far": recall at thresholds taken
from all non-mate *scores* (every probe mated); its numbers are not TPIR@FPIR.
"""

from __future__ import annotations

import time

import numpy as np

from .embed import extract_embeddings, slowest_rank_seconds
from .roc import far_key
from .templates import aggregate_templates

STANDARD_FPIRS = (1e-3, 1e-2, 1e-1)
STANDARD_RANKS = (1, 5, 10)


def subject_scores(probes: np.ndarray, gallery: np.ndarray, gallery_ids, chunk: int = 4096):
    """(subjects, scores [P, S]): each probe's best cosine against each gallery subject."""
    gallery_ids = np.asarray(gallery_ids)
    subjects, inverse = np.unique(gallery_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
    g = np.asarray(gallery, dtype=np.float64)[order]
    out = np.empty((probes.shape[0], subjects.size))
    for s in range(0, probes.shape[0], chunk):
        sim = np.asarray(probes[s : s + chunk], dtype=np.float64) @ g.T
        out[s : s + chunk] = sim if subjects.size == g.shape[0] else np.maximum.reduceat(sim, starts, axis=1)
    return subjects, out


def identification_metrics(
    gallery: np.ndarray, gallery_ids, probes: np.ndarray, probe_ids,
    ranks=STANDARD_RANKS, fpirs=STANDARD_FPIRS,
) -> dict:
    """Rank-k and TPIR@FPIR for normalized gallery/probe templates (see the module docstring)."""
    probe_ids = np.asarray(probe_ids)
    if probes.shape[0] != probe_ids.size or gallery.shape[0] != np.asarray(gallery_ids).size:
        raise ValueError("one subject id per template is needed")
    if gallery.shape[0] == 0 or probes.shape[0] == 0:
        raise ValueError("identification needs a non-empty gallery and probe set")
    subjects, scores = subject_scores(probes, gallery, gallery_ids)
    pos = np.searchsorted(subjects, probe_ids)
    pos = np.minimum(pos, subjects.size - 1)
    mated = subjects[pos] == probe_ids

    m_scores = scores[mated]
    mate = m_scores[np.arange(m_scores.shape[0]), pos[mated]]
    rank = np.sum(m_scores >= mate[:, None], axis=1)  # includes the mate itself, ties count against
    nonmated_top = np.sort(scores[~mated].max(axis=1))[::-1] if (~mated).any() else np.zeros(0)

    n_m, n_nm = int(mated.sum()), int(nonmated_top.size)
    result = {
        "num_gallery_subjects": int(subjects.size),
        "num_mated_probes": n_m,
        "num_nonmated_probes": n_nm,
        # rank k is meaningless beyond the gallery's size (always 1): None there
        "rank": {str(k): (float(np.mean(rank <= k)) if n_m and k <= subjects.size else None) for k in ranks},
        "tpir_at_fpir": {},
    }
    for f in fpirs:
        result["tpir_at_fpir"][far_key(f)] = (
            tpir_at_fpir(rank, mate, nonmated_top, f) if n_m and n_nm and f * n_nm >= 1.0 - 1e-9 else None
        )
    if n_m and n_nm:
        grid = np.logspace(np.log10(1.0 / n_nm), 0.0, 120)
        result["curve"] = {
            "x": grid.tolist(), "y": [tpir_at_fpir(rank, mate, nonmated_top, f) for f in grid],
            "xlabel": "FPIR", "ylabel": "TPIR",
        }
    elif n_m:  # closed set only: the CMC curve
        ks = np.arange(1, min(subjects.size, 100) + 1)
        result["curve"] = {"x": ks.tolist(), "y": [float(np.mean(rank <= k)) for k in ks],
                           "xlabel": "rank", "ylabel": "identification rate", "xscale": "linear"}
    return result


def tpir_at_fpir(rank: np.ndarray, mate: np.ndarray, nonmated_top_desc: np.ndarray, fpir: float) -> float:
    """TPIR at the lowest threshold with FPIR ≤ ``fpir``: accept scores strictly above the
    (k+1)-th best non-mated score, k = ⌊fpir · n⌋ false alarms allowed."""
    k = int(np.floor(fpir * nonmated_top_desc.size + 1e-9))
    hit = rank == 1
    if k < nonmated_top_desc.size:
        hit = hit & (mate > nonmated_top_desc[k])
    return float(np.mean(hit))


def evaluate_identification(
    model, gallery_images: np.ndarray, gallery_ids, probe_images: np.ndarray, probe_ids,
    name: str = "identification", batch_size: int = 64, device="cpu", flip: bool = True,
) -> dict:
    """1:N identification from arrays: the gallery images of each subject form one template, every
    probe image is searched on its own. Probes of subjects absent from the gallery are non-mated."""
    start = time.perf_counter()
    g = extract_embeddings(model, gallery_images, batch_size, device, flip)
    p = extract_embeddings(model, probe_images, batch_size, device, flip)
    g_keys, g_feats = aggregate_templates(g.combined(), [str(i) for i in np.asarray(gallery_ids)])
    metrics = identification_metrics(g_feats, g_keys, p.normalized(), [str(i) for i in np.asarray(probe_ids)])
    return {
        "name": name,
        "kind": "identification",
        "protocol": "one template per gallery subject, single-image probes, cosine, "
                    f"flip={'on' if flip else 'off'}",
        **metrics,
        "seconds": slowest_rank_seconds(start),
    }

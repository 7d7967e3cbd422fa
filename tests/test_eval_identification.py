"""1:N identification on a planted case, and IJB-style template aggregation."""

import numpy as np
import pytest
import torch

from pm_dist.eval.identification import identification_metrics
from pm_dist.eval.identification import evaluate_identification
from pm_dist.eval.templates import aggregate_templates


def unit(**coords):
    """A 5-d vector from named coordinates e1..e5 (normalized)."""
    v = np.zeros(5)
    for name, value in coords.items():
        v[int(name[1]) - 1] = value
    return v / np.linalg.norm(v)


# Gallery: subject A has two templates (e1 and e4), B is e2, C is e3; e5 is a direction no
# gallery template has, used to set each probe's best score exactly.
GALLERY = np.stack([unit(e1=1), unit(e4=1), unit(e2=1), unit(e3=1)])
GALLERY_IDS = ["A", "A", "B", "C"]
PROBES = np.stack([
    unit(e1=0.9, e5=np.sqrt(1 - 0.81)),    # A: rank 1, score 0.90
    unit(e2=0.6, e3=0.8),                  # B: C scores higher → rank 2
    unit(e3=0.8, e5=0.6),                  # C: rank 1, score 0.80
    unit(e4=1),                            # A through its second template: rank 1, score 1.0
    unit(e2=1, e3=1),                      # B ties with C at 0.707: ties count against → rank 2
    unit(e1=0.85, e5=np.sqrt(1 - 0.85**2)),  # X (not enrolled): best score 0.85
    unit(e2=0.3, e5=np.sqrt(1 - 0.09)),      # Y: best 0.30
    unit(e2=0.82, e5=np.sqrt(1 - 0.82**2)),  # Z: best 0.82
])
PROBE_IDS = ["A", "B", "C", "A", "B", "X", "Y", "Z"]


def test_planted_case():
    m = identification_metrics(GALLERY, GALLERY_IDS, PROBES, PROBE_IDS, ranks=(1, 2), fpirs=(0.1, 1 / 3, 2 / 3))
    assert (m["num_gallery_subjects"], m["num_mated_probes"], m["num_nonmated_probes"]) == (3, 5, 3)
    assert m["rank"] == {"1": 3 / 5, "2": 1.0}
    # non-mated best scores: 0.85, 0.82, 0.30.
    # FPIR 1/3 allows one false alarm → accept above 0.82: mated rank-1 probes at 0.90 and 1.0.
    # FPIR 2/3 → accept above 0.30: adds the C probe at 0.80. FPIR 0.1 < 1/3 cannot be measured.
    assert m["tpir_at_fpir"] == {"1e-01": None, "0.333333": 2 / 5, "0.666667": 3 / 5}
    assert m["curve"]["xlabel"] == "FPIR" and m["curve"]["x"][0] == pytest.approx(1 / 3)


def test_closed_set_has_no_tpir_and_plots_cmc():
    m = identification_metrics(GALLERY, GALLERY_IDS, PROBES[:5], PROBE_IDS[:5], ranks=(1, 2, 5))
    assert m["num_nonmated_probes"] == 0
    assert m["rank"] == {"1": 3 / 5, "2": 1.0, "5": None}  # 3 subjects: rank 5 says nothing
    assert all(v is None for v in m["tpir_at_fpir"].values())
    assert m["curve"]["xlabel"] == "rank" and m["curve"]["y"][:2] == [3 / 5, 1.0]


def test_template_aggregation_averages_media_then_sums():
    feats = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    keys, out = aggregate_templates(feats, ["t9", "t9", "t9", "t2"], ["m1", "m1", "m2", "m7"])
    assert keys == ["t9", "t2"]  # order of first appearance
    # t9: media m1 = mean of rows 0, 1 = (2, 2, 0); plus m2 = (0, 0, 1) → (2, 2, 1) / 3
    np.testing.assert_allclose(out[0], [2 / 3, 2 / 3, 1 / 3])
    np.testing.assert_allclose(out[1], [2 ** -0.5, 2 ** -0.5, 0])
    # without media ids each image is its own media: a plain sum
    _, summed = aggregate_templates(feats[:2], ["t", "t"])
    np.testing.assert_allclose(summed[0], [2 ** -0.5, 2 ** -0.5, 0])


class MeanColour(torch.nn.Module):
    """A 'model' whose embedding is the mean colour: identity is planted in the colour."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_evaluate_identification_end_to_end_on_planted_colours():
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, (6, 3))  # 6 subjects; 0-3 enrolled
    def imgs(ids):
        base = colours[ids][:, None, None, :] + rng.integers(-3, 4, (len(ids), 8, 8, 3))
        return base.astype(np.uint8)
    gallery_ids = np.array([0, 0, 1, 2, 3])
    probe_ids = np.array([0, 1, 2, 3, 4, 5])
    r = evaluate_identification(MeanColour(), imgs(gallery_ids), gallery_ids, imgs(probe_ids), probe_ids,
                                name="planted", batch_size=4)
    assert r["kind"] == "identification" and r["name"] == "planted"
    assert (r["num_gallery_subjects"], r["num_mated_probes"], r["num_nonmated_probes"]) == (4, 4, 2)
    assert r["rank"]["1"] == 1.0

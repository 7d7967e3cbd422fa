"""User-provided pair, template and subject lists: parsing, errors naming the line, and the
evaluations built on them (image pairs, IJB-style template pairs, 1:N identification)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pm_dist.eval.embed import EmbeddingError
from pm_dist.eval.lists import ListFormatError, read_pair_list, read_subject_list, read_template_list
from pm_dist.eval.from_lists import evaluate_identification_lists, evaluate_pair_list


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


COLOURS = {"ann": (200, 40, 40), "bob": (40, 200, 40), "cyd": (40, 40, 200), "dan": (200, 200, 40)}


@pytest.fixture
def faces(tmp_path):
    """Two 8×8 crops per person, coloured by identity (what MeanColour recognises)."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name, colour in COLOURS.items():
        for k in range(2):
            arr = np.clip(np.array(colour) + rng.integers(-5, 6, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / f"{name}_{k}.png")
    return tmp_path


def write(path, text):
    path.write_text(text)
    return str(path)


def test_image_pair_list(faces):
    lines = ["# same", "img/ann_0.png img/ann_1.png 1", "img/bob_0.png img/bob_1.png 1", "",
             "img/ann_0.png img/bob_0.png 0", "img/cyd_0.png img/dan_1.png 0", "img/ann_1.png img/cyd_1.png 0"]
    pairs = write(faces / "pairs.txt", "\n".join(lines))
    r = evaluate_pair_list(MeanColour(), pairs, image_size=8, batch_size=3)
    assert r["kind"] == "pairs" and r["name"] == "pairs"
    assert (r["num_same"], r["num_different"]) == (2, 3)
    assert r["auc"] == 1.0
    assert r["tar_at_far"]["1e-01"] is None  # 3 different pairs: 1/3 is the smallest FAR
    assert "image pairs" in r["protocol"]


def test_template_pairs_ijb_style(faces):
    templates = write(faces / "tid_mid.txt", "\n".join([
        "img/ann_0.png 1 10", "img/ann_1.png 1 11", "img/bob_0.png 2 20", "img/bob_1.png 3 21",
        "img/cyd_0.png 4 30", "img/cyd_1.png 4 30", "img/dan_0.png 5"]))
    pairs = write(faces / "template_pair_label.txt", "2 3 1\n1 2 0\n1 4 0\n4 5 0\n2 5 0\n")
    r = evaluate_pair_list(MeanColour(), pairs, templates, image_size=8, name="ijb-toy")
    assert r["name"] == "ijb-toy" and "template pairs" in r["protocol"]
    assert (r["num_same"], r["num_different"]) == (1, 4)
    assert r["auc"] == 1.0


def test_identification_lists_with_ijb_csv_header(faces):
    templates = write(faces / "templates.txt", "\n".join(
        f"img/{n}_{k}.png {n}{k}" for n in COLOURS for k in range(2)))
    gallery = write(faces / "gallery.csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME\nann0,ann,x\nbob0,bob,x\ncyd0,cyd,x\n")
    probes = write(faces / "probes.csv", "ann1 ann\nbob1 bob\ncyd1 cyd\ndan1 dan\ndan0 dan\n")
    r = evaluate_identification_lists(MeanColour(), templates, gallery, probes, image_size=8)
    assert (r["num_gallery_subjects"], r["num_mated_probes"], r["num_nonmated_probes"]) == (3, 3, 2)
    assert r["rank"]["1"] == 1.0
    assert r["tpir_at_fpir"]["1e-01"] is None  # 2 non-mated probes: FPIR 1/2 is the smallest


@pytest.mark.parametrize("text,message", [
    ("img/ann_0.png img/ann_1.png\n", r"pairs.txt:1: expected 'a b label', got 2 fields"),
    ("img/ann_0.png img/ann_1.png 1\nimg/ann_0.png img/bob_0.png same\n", r"pairs.txt:2: label must be 0 or 1"),
    ("# header\nimg/ann_0.png img/nobody.png 1\n",
     r"pairs.txt:2: image 'img/nobody.png' not found \(looked for .*img/nobody.png\)"),
    ("# only comments\n", r"pairs.txt: no pairs"),
])
def test_pair_list_errors_name_the_line(faces, text, message):
    with pytest.raises(ListFormatError, match=message):
        read_pair_list(write(faces / "pairs.txt", text))


def test_template_and_subject_list_errors(faces):
    with pytest.raises(ListFormatError, match=r"t.txt:2: image 'img/missing.png' not found"):
        read_template_list(write(faces / "t.txt", "img/ann_0.png 1\nimg/missing.png 2\n"))
    with pytest.raises(ListFormatError, match=r"p.txt:1: template '9' is not in the template list"):
        read_pair_list(write(faces / "p.txt", "1 9 0\n"), templates={"1", "2"})
    with pytest.raises(ListFormatError, match=r"s.txt:3: template 't1' is subject 'b' here but 'a' earlier"):
        read_subject_list(write(faces / "s.txt", "t1 a\nt2 b\nt1,b\n"))
    with pytest.raises(ListFormatError, match=r"s.txt:1: template 'zz' is not in the template list"):
        read_subject_list(write(faces / "s.txt", "zz a\n"), known_templates={"t1"})
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_pair_list(str(faces / "absent.txt"))


def test_root_option_and_absolute_paths(faces, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("lists")
    pairs = write(elsewhere / "pairs.txt", f"img/ann_0.png {faces}/img/ann_1.png 1\n")
    pl = read_pair_list(pairs, root=str(faces))
    assert pl.a == [str(faces / "img/ann_0.png")] and pl.b == [f"{faces}/img/ann_1.png"]
    assert pl.labels.tolist() == [True]


def test_undecodable_image_file_named(faces):
    (faces / "img" / "bad.png").write_bytes(b"not a png")
    pairs = write(faces / "pairs.txt", "img/ann_0.png img/bad.png 1\nimg/ann_0.png img/bob_0.png 0\n")
    with pytest.raises(EmbeddingError, match=r"image file .*img/bad.png cannot be decoded"):
        evaluate_pair_list(MeanColour(), pairs, image_size=8)

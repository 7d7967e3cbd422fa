"""The plain-text list formats for user-provided evaluations (documented in docs/evaluation.md).

One record per line, fields separated by whitespace (subject files also by commas); blank lines and
lines starting with ``#`` are ignored. Image paths are relative to ``root`` (default: the list
file's folder) unless absolute, and may not contain spaces.

* **pair list**    ``a b label``: label 1 = same identity, 0 = different. ``a``, ``b`` are image
  paths, or template ids when a template list is given (insightface's ``ijb*_template_pair_label.txt``).
* **template list** ``image template [media]``: the images making up each template, with an optional
  media id (images of one video); insightface's ``ijb*_face_tid_mid.txt`` has this layout.
* **subject list** ``template subject``: who each gallery or probe template is. A first line starting
  with ``TEMPLATE_ID`` is a header and skipped, and extra columns are ignored, so IJB's
  ``ijb*_1N_gallery_*.csv`` / ``ijb*_1N_probe_mixed.csv`` work unchanged.

Every error names the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


class ListFormatError(ValueError):
    """A malformed list file; the message is ``path:line: what is wrong``."""


def _records(path: str):
    """(line number, fields) of each meaningful line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield lineno, text


def _resolve(path: str, lineno: int, image: str, root: str) -> str:
    full = image if os.path.isabs(image) else os.path.join(root, image)
    if not os.path.isfile(full):
        raise ListFormatError(f"{path}:{lineno}: image {image!r} not found (looked for {full})")
    return full


def _root(path: str, root: str | None) -> str:
    return root if root is not None else os.path.dirname(os.path.abspath(path))


@dataclass
class PairList:
    """Pairs as given: ``a``, ``b`` (resolved image paths, or template ids) and bool ``labels``."""

    a: list[str]
    b: list[str]
    labels: np.ndarray


def read_pair_list(path: str, root: str | None = None, templates: set[str] | None = None) -> PairList:
    """Parse a pair list; with ``templates``, entries are template ids that must be in that set,
    otherwise image paths that must exist."""
    path = os.fspath(path)
    base = _root(path, root)
    a, b, labels = [], [], []
    for lineno, text in _records(path):
        fields = text.split()
        if len(fields) != 3:
            raise ListFormatError(f"{path}:{lineno}: expected 'a b label', got {len(fields)} fields")
        if fields[2] not in ("0", "1"):
            raise ListFormatError(f"{path}:{lineno}: label must be 0 or 1, got {fields[2]!r}")
        ends = []
        for item in fields[:2]:
            if templates is not None:
                if item not in templates:
                    raise ListFormatError(f"{path}:{lineno}: template {item!r} is not in the template list")
                ends.append(item)
            else:
                ends.append(_resolve(path, lineno, item, base))
        a.append(ends[0])
        b.append(ends[1])
        labels.append(fields[2] == "1")
    if not labels:
        raise ListFormatError(f"{path}: no pairs")
    return PairList(a, b, np.asarray(labels, dtype=bool))


@dataclass
class TemplateList:
    """One row per image: its resolved path, template id and media id (the image's own when absent)."""

    images: list[str]
    templates: list[str]
    medias: list[str]


def read_template_list(path: str, root: str | None = None) -> TemplateList:
    path = os.fspath(path)
    base = _root(path, root)
    images, templates, medias = [], [], []
    for lineno, text in _records(path):
        fields = text.split()
        if len(fields) not in (2, 3):
            raise ListFormatError(f"{path}:{lineno}: expected 'image template [media]', got {len(fields)} fields")
        images.append(_resolve(path, lineno, fields[0], base))
        templates.append(fields[1])
        medias.append(fields[2] if len(fields) == 3 else f"\0image{len(images)}")
    if not images:
        raise ListFormatError(f"{path}: no images")
    return TemplateList(images, templates, medias)


def read_subject_list(path: str, known_templates: set[str] | None = None) -> dict[str, str]:
    """template id → subject id, in file order. A template listed twice must name one subject."""
    path = os.fspath(path)
    subjects: dict[str, str] = {}
    for i, (lineno, text) in enumerate(_records(path)):
        if i == 0 and text.upper().startswith("TEMPLATE_ID"):
            continue
        fields = text.replace(",", " ").split()
        if len(fields) < 2:
            raise ListFormatError(f"{path}:{lineno}: expected 'template subject', got {len(fields)} field")
        template, subject = fields[0], fields[1]
        if known_templates is not None and template not in known_templates:
            raise ListFormatError(f"{path}:{lineno}: template {template!r} is not in the template list")
        if subjects.setdefault(template, subject) != subject:
            raise ListFormatError(
                f"{path}:{lineno}: template {template!r} is subject {subject!r} here but "
                f"{subjects[template]!r} earlier"
            )
    if not subjects:
        raise ListFormatError(f"{path}: no templates")
    return subjects

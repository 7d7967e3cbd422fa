"""Set-to-set comparison: one feature per template (a set of images of one subject), IJB style.

As insightface's IJB scripts with flip-add and feature norms kept ("F2, N1"): each image's feature
is the *unnormalized* sum of its plain and mirrored embeddings, so a sharper face (larger norm) weighs
more; images of one media (frames of a video) are averaged first; a template is the sum of its media
features, L2-normalized. insightface can also weight by face-detector scores ("D1"); our list format
carries no detector scores, so that weighting is not applied.
"""

from __future__ import annotations

import numpy as np

from .protocol import l2_normalize


def aggregate_templates(features: np.ndarray, templates, medias=None) -> tuple[list, np.ndarray]:
    """(template ids in order of first appearance, normalized float64 [T, D]).

    ``features`` [N, D] (raw, flip-summed) with one template id and media id per row; without media
    ids every image is its own media.
    """
    features = np.asarray(features, dtype=np.float64)
    templates = [str(t) for t in templates]
    if len(templates) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {len(templates)} template ids")
    medias = [str(i) for i in range(len(templates))] if medias is None else [str(m) for m in medias]

    template_index: dict[str, int] = {}  # file order
    media_index: dict[tuple[str, str], int] = {}
    media_of_row = np.empty(len(templates), dtype=np.int64)
    template_of_media = []
    for row, (t, m) in enumerate(zip(templates, medias)):
        ti = template_index.setdefault(t, len(template_index))
        mi = media_index.get((t, m))
        if mi is None:
            mi = media_index[(t, m)] = len(media_index)
            template_of_media.append(ti)
        media_of_row[row] = mi

    media_sum = np.zeros((len(media_index), features.shape[1]))
    np.add.at(media_sum, media_of_row, features)
    media_mean = media_sum / np.bincount(media_of_row)[:, None]
    out = np.zeros((len(template_index), features.shape[1]))
    np.add.at(out, np.asarray(template_of_media), media_mean)
    return list(template_index), l2_normalize(out)

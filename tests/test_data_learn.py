"""The synthetic identities need learning and can be learned: a tiny conv net trained for a few
seconds with plain softmax cross-entropy verifies *held-out* identities far better than chance and
than raw pixels do."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pm_dist.data.synthetic import SyntheticIdentities
from pm_dist.data.transforms import normalize


def split_half_accuracy(emb: torch.Tensor, issame: np.ndarray) -> float:
    """Cosine-similarity verification: threshold chosen on the first half of the pairs, scored on
    the second half (no peeking)."""
    e = F.normalize(emb.double(), dim=1)
    sim = (e[0::2] * e[1::2]).sum(1).numpy()
    h = len(sim) // 2
    best = max(np.unique(sim[:h]), key=lambda t: ((sim[:h] >= t) == issame[:h]).mean())
    return float(((sim[h:] >= best) == issame[h:]).mean())


def test_tiny_encoder_learns_heldout_verification():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair to the other tests on a shared machine
    try:
        _train_and_verify()
    finally:
        torch.set_num_threads(threads)


def _train_and_verify():
    num_ids, per_id, steps = 100, 10, 200
    gen = SyntheticIdentities(num_ids, image_size=32, seed=0)
    train = np.stack([gen.render(c, k) for c in range(num_ids) for k in range(per_id)])
    labels = torch.arange(num_ids).repeat_interleave(per_id)
    x_train = normalize(train)
    pairs, issame = gen.verification_pairs(300, seed=0)
    x_pairs = normalize(pairs)
    pixel_acc = split_half_accuracy(x_pairs.flatten(1), issame)

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 64),
    )
    head = nn.Linear(64, num_ids)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=g)
        xb = x_train[idx]
        flip = torch.rand(128, generator=g) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = F.cross_entropy(head(net(xb)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        learned_acc = split_half_accuracy(net(x_pairs), issame)
    assert pixel_acc < 0.65  # raw pixels barely beat chance: the nuisances demand learning
    assert learned_acc > 0.72 and learned_acc > pixel_acc + 0.1, (pixel_acc, learned_acc)

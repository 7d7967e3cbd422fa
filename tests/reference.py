"""Plain single-process references, written to be obviously right rather than fast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_target_logit(cos_t: torch.Tensor, s: float, m1: float, m2: float, m3: float):
    """s·(cos(m1·θ + m2) − m3), falling back to s·(cos θ − m3 − m2·sin m2) where m1·θ + m2 > π."""
    cos_t = cos_t.clamp(-1.0, 1.0)
    angle = m1 * torch.acos(cos_t) + m2
    value = torch.where(angle <= math.pi, torch.cos(angle), cos_t - m2 * math.sin(m2))
    return s * (value - m3)


def margin_cross_entropy(cos: torch.Tensor, labels: torch.Tensor, s, m1, m2, m3, mask=None):
    """Mean CE of the full [N, C] cosine matrix with the margin on the target; autograd does the rest.

    Returns (loss, accuracy, hardest non-target column per row or −1).
    """
    n = cos.shape[0]
    rows = torch.arange(n)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    target = margin_target_logit(cos[rows, labels], s, m1, m2, m3)
    logits = torch.where(onehot, target.unsqueeze(1), s * cos)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(0) & ~onehot, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        raw = cos.detach().clone()
        if mask is not None:
            raw[:, ~mask] = float("-inf")
        acc = (raw.argmax(1) == labels).float().mean()
        raw[onehot] = float("-inf")
        best, hardest = raw.max(1)
        hardest = torch.where(torch.isfinite(best), hardest, torch.full_like(hardest, -1))
    return loss, acc, hardest

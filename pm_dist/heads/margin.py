"""Additive/multiplicative angular margins on the target logit.

All three margins used in face recognition are one family, the *combined margin* of insightface:

    target logit = s · (cos(m1·θ + m2) − m3),   θ = arccos(cos_t)
    other logits = s · cos_j

CosFace is (1, 0, m), ArcFace is (1, m, 0), SphereFace-like multiplicative margins set m1.

The margin is only ever applied to the one target cosine per row, so this module works on [N]
vectors and returns the target logit together with its **true derivative** d logit / d cos_t; the
distributed softmax (``softmax.py``) uses that derivative in its hand-written backward. No
straight-through trick (insightface's ``arccos_`` under ``no_grad``): the gradient is the derivative of
the function the forward computed.

Where the angle would leave [0, π] (m1·θ + m2 > π) cos(·) stops decreasing in θ, and a larger angle
would earn a *larger* logit. The standard fallback (the ArcFace reference code, ``easy_margin=False``)
replaces the target there by the monotone ``cos θ − m3 − m2·sin(m2)``, whose derivative is 1.

d cos(m1·θ + m2)/d cos θ = m1 · sin(m1·θ + m2) / sin θ, singular at θ = 0. Float32 cannot represent
an angle between 0 and ~3.5e-4 away from cos = 1 anyway, so sin θ is floored at that resolution
(``_SIN_FLOOR``); everywhere else the derivative is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SIN_FLOOR = 3.4e-4  # ≈ sqrt(1 − (1 − 2⁻²⁴)²): the smallest nonzero angle fp32 resolves near cos = 1


@dataclass(frozen=True)
class Margin:
    """Combined margin (m1, m2, m3) with scale s; see the module docstring."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.35

    def __post_init__(self):
        if not self.s > 0:
            raise ValueError(f"margin scale s must be > 0, got {self.s}")
        if not self.m1 >= 1.0:
            raise ValueError(f"margin m1 must be ≥ 1, got {self.m1}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"margin m2 must be in [0, π), got {self.m2}")
        if not 0.0 <= self.m3 < 2.0:
            raise ValueError(f"margin m3 must be in [0, 2), got {self.m3}")

    @property
    def is_angular(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_logit(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled target logit and its derivative w.r.t. the target cosine, both fp32 [N]."""
        cos_t = cos_t.float().clamp(-1.0, 1.0)
        if not self.is_angular:  # CosFace: cheap and exact
            return self.s * (cos_t - self.m3), torch.full_like(cos_t, self.s)
        theta = torch.acos(cos_t)
        angle = self.m1 * theta + self.m2
        sin_theta = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0)).clamp_min(_SIN_FLOOR)
        inside = angle <= math.pi
        value = torch.where(inside, torch.cos(angle), cos_t - self.m2 * math.sin(self.m2)) - self.m3
        deriv = torch.where(inside, self.m1 * torch.sin(angle) / sin_theta, torch.ones_like(cos_t))
        return self.s * value, self.s * deriv


def cosface(s: float = 64.0, m: float = 0.35) -> Margin:
    return Margin(s=s, m1=1.0, m2=0.0, m3=m)


def arcface(s: float = 64.0, m: float = 0.5) -> Margin:
    return Margin(s=s, m1=1.0, m2=m, m3=0.0)


def build_margin(kind: str = "cosface", s: float = 64.0, m: float | None = None,
                 m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> Margin:
    """Margin by name: ``cosface`` (m, default 0.35), ``arcface`` (m, default 0.5) or ``combined``."""
    if kind == "cosface":
        return cosface(s, 0.35 if m is None else m)
    if kind == "arcface":
        return arcface(s, 0.5 if m is None else m)
    if kind == "combined":
        return Margin(s=s, m1=m1, m2=m2, m3=m3)
    raise ValueError(f"unknown margin {kind!r}: choose cosface, arcface or combined")

import math

import pytest
import torch

from pm_dist.heads.margin import Margin, build_margin
from reference import margin_target_logit


@pytest.mark.parametrize("params", [(64, 1, 0, 0.35), (64, 1, 0.5, 0), (32, 1, 0.3, 0.2),
                                    (16, 1.5, 0, 0), (64, 1.35, 0.25, 0.1)])
def test_value_and_true_derivative(params):
    margin = Margin(*params)
    cos = torch.linspace(-0.9999, 0.9999, 2001, dtype=torch.float64)
    value, deriv = margin.target_logit(cos)
    x = cos.clone().requires_grad_(True)
    ref = margin_target_logit(x, *params)
    ref.sum().backward()
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(deriv.double(), x.grad, rtol=1e-3, atol=1e-3)


def test_fallback_beyond_pi_is_monotone_and_finite():
    margin = Margin(s=1.0, m1=1.0, m2=0.5, m3=0.0)
    cos = torch.linspace(-1, 1, 10001)
    value, deriv = margin.target_logit(cos)
    assert torch.isfinite(value).all() and torch.isfinite(deriv).all()
    assert (value[1:] >= value[:-1] - 1e-6).all()  # a larger cosine never lowers the target logit
    below = cos < math.cos(math.pi - 0.5)
    torch.testing.assert_close(value[below], cos[below] - 0.5 * math.sin(0.5))
    assert (deriv[below] == 1).all()


def test_derivative_bounded_at_theta_zero():
    value, deriv = Margin(s=64, m1=1, m2=0.5, m3=0).target_logit(torch.tensor([1.0, 1.0 + 1e-7]))
    assert torch.isfinite(deriv).all() and value[0] == pytest.approx(64 * math.cos(0.5))


@pytest.mark.parametrize("kwargs,name", [({"s": 0}, "scale"), ({"m1": 0.5}, "m1"),
                                         ({"m2": -0.1}, "m2"), ({"m3": 3}, "m3")])
def test_nonsense_margins_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Margin(**kwargs)


def test_build_by_name():
    assert build_margin("arcface") == Margin(64, 1, 0.5, 0)
    assert build_margin("cosface", m=0.4) == Margin(64, 1, 0, 0.4)
    with pytest.raises(ValueError, match="unknown margin"):
        build_margin("sphereface")

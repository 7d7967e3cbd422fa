"""BatchNorm whose running statistics stay fp32 when the encoder trains in bf16 or fp16.

A momentum-0.1 update of a statistic is smaller than half a bf16 ulp once the statistic is near 1,
so bf16 running statistics stop moving (a variance of 1.03 tracked for 300 steps stays at exactly
1.0 in bf16). ``keep_norm_stats_fp32`` switches an encoder's BatchNorm layers to ``Fp32StatsNorm``:
their statistics stay fp32 whatever DeepSpeed casts the parameters to, and the normalization runs
in fp32 (the input, weight and bias are upcast for it; the output is cast back to the input's
dtype). State-dict keys and shapes do not change: an exported encoder loads into the plain model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class Fp32StatsNorm(_BatchNorm):
    """``_BatchNorm.forward`` with fp32 statistics and arithmetic; mixed into the concrete classes
    below so ``_check_input_dim`` stays theirs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch_stats = self.training or self.running_mean is None
        keep_stats = not self.training or self.track_running_stats
        y = F.batch_norm(
            x.float(),
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            use_batch_stats, factor, self.eps)
        return y.to(x.dtype)


class Fp32StatsBatchNorm1d(Fp32StatsNorm, nn.BatchNorm1d):
    pass


class Fp32StatsBatchNorm2d(Fp32StatsNorm, nn.BatchNorm2d):
    pass


class Fp32StatsBatchNorm3d(Fp32StatsNorm, nn.BatchNorm3d):
    pass


_FP32_STATS = {nn.BatchNorm1d: Fp32StatsBatchNorm1d, nn.BatchNorm2d: Fp32StatsBatchNorm2d,
               nn.BatchNorm3d: Fp32StatsBatchNorm3d}


def keep_norm_stats_fp32(module: nn.Module) -> int:
    """Switch every BatchNorm layer of ``module`` to its ``Fp32StatsNorm`` class in place (same
    parameters, same buffers) and make its statistics fp32. Returns how many layers it switched."""
    switched = 0
    for layer in module.modules():
        cls = _FP32_STATS.get(type(layer))
        if cls is not None:
            layer.__class__ = cls  # keeps the layer's tensors, hooks and state-dict keys
            switched += 1
        if isinstance(layer, Fp32StatsNorm):
            for name in ("running_mean", "running_var"):
                stat = getattr(layer, name)
                if stat is not None and stat.dtype != torch.float32:
                    stat.data = stat.data.float()
    return switched


def is_norm_statistic(module: nn.Module, buffer_name: str) -> bool:
    """Whether ``module``'s buffer ``buffer_name`` (dotted, as ``named_buffers`` gives it) is a
    normalization layer's running statistic."""
    owner, _, leaf = buffer_name.rpartition(".")
    layer = module.get_submodule(owner) if owner else module
    return isinstance(layer, _BatchNorm) and leaf in ("running_mean", "running_var")

"""``tiny``: a small IResNet-style encoder for CPU runs on 32–112 px faces.

The point is turnaround, not accuracy: tests, demos and CPU experiments need an encoder
that trains at hundreds of images per second on two cores. It keeps IResNet's block
(so behaviour is familiar) but
- its stem has stride 2, so no conv runs at full resolution (the single largest cost of
  IResNet on CPU);
- it has one block per stage and widths 32 → 64 → 128 → 256;
- its head is MobileFaceNet's global depthwise conv instead of a flatten-Linear, so the
  parameter count barely depends on the input size.
Input size: any multiple of 16 (stem + three stride-2 stages); 32 px leaves a 2×2 map.
"""

from __future__ import annotations

import torch
from torch import nn

from .iresnet import IBasicBlock

DOWNSAMPLE = 16
WIDTHS = (32, 64, 128, 256)


def _stage(inplanes: int, planes: int) -> IBasicBlock:
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
        nn.BatchNorm2d(planes),
    )
    return IBasicBlock(inplanes, planes, stride=2, downsample=downsample)


class TinyEncoder(nn.Module):
    """Stem (conv3×3/2, BN, PReLU) → 3 IBasicBlocks /2 → BN → GDC → Linear → BN1d."""

    def __init__(self, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0):
        super().__init__()
        if image_size % DOWNSAMPLE or image_size <= 0:
            raise ValueError(f"tiny needs an image size divisible by {DOWNSAMPLE}, got {image_size}")
        self.image_size = image_size
        w0, w1, w2, w3 = WIDTHS
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.PReLU(w0),
        )
        self.stages = nn.Sequential(_stage(w0, w1), _stage(w1, w2), _stage(w2, w3))
        self.bn = nn.BatchNorm2d(w3)
        side = image_size // DOWNSAMPLE
        # Global depthwise conv: a learned spatial weighting per channel. Faces are aligned,
        # so position matters and plain average pooling throws that away.
        self.gdc = nn.Conv2d(w3, w3, kernel_size=side, groups=w3, bias=False)
        self.gdc_bn = nn.BatchNorm2d(w3)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(w3, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stages(self.stem(x)))
        x = torch.flatten(self.gdc_bn(self.gdc(x)), 1)
        return self.features(self.fc(self.dropout(x)))

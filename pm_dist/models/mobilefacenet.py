"""MobileFaceNet as insightface's arcface_torch builds it under the name ``mbf``.

Module nesting and parameter shapes match insightface's
``recognition/arcface_torch/backbones/mobilefacenet.py`` with ``get_mbf`` defaults
(blocks (1, 4, 6, 2), width scale 2, no output normalisation), so its ``backbone.pth`` loads
with ``strict=True``. The nested ``layers`` Sequentials look redundant but they *are* the
key names (``layers.3.layers.0.layers.1.layers.0.weight``); keep them.

Quirks kept on purpose because the weights depend on them:
- the second layer is a 3×3 conv with ``groups=64`` over 128 channels (pairs of channels,
  not depthwise);
- with scale 2 the first bottlenecks do not expand (128 → 128 → 128);
- the embedding head is a global depthwise conv (GDC) whose kernel equals the final map,
  7×7 at 112 px; here the kernel is ``image_size // 16`` so other sizes work.
"""

from __future__ import annotations

import torch
from torch import nn

DOWNSAMPLE = 16  # stem and three bottlenecks with stride 2


class ConvBlock(nn.Module):
    """Conv (no bias) → BN → PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) → BN, no activation (the linear bottleneck's projection)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1×1 expand to ``hidden`` → 3×3 depthwise → 1×1 linear projection."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` stride-1 residual bottlenecks of constant width ``c``."""

    def __init__(self, c: int, num_block: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, hidden, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the final map → flatten → Linear (no bias) → BN1d."""

    def __init__(self, embedding_size: int, side: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=side, groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        # Not in insightface's mbf; kept outside ``layers`` so the key indices stay theirs.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gdc, flatten, linear, bn = self.layers
        return bn(linear(self.dropout(flatten(gdc(x)))))


class MobileFaceNet(nn.Module):
    """insightface ``mbf``: ~2.0 M parameters at D=512, 112 px."""

    def __init__(self, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0,
                 blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2):
        super().__init__()
        if image_size % DOWNSAMPLE or image_size <= 0:
            raise ValueError(f"MobileFaceNet needs an image size divisible by {DOWNSAMPLE}, got {image_size}")
        self.image_size = image_size
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=3, padding=1, groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], hidden=128))
        self.layers.extend([
            DepthWise(c1, c1, hidden=128, stride=2),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, hidden=256, stride=2),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, hidden=512, stride=2),
            Residual(c2, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size, image_size // DOWNSAMPLE, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface's initialisation; matters only when training from scratch.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))

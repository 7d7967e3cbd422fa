"""IResNet-18/34/50/100: the backbones of insightface's arcface_torch, layer for layer.

Attribute names, module nesting and parameter shapes match insightface's
``recognition/arcface_torch/backbones/iresnet.py`` exactly, so a published ``backbone.pth``
loads here with ``load_state_dict(strict=True)`` and gives the same embeddings. Do not
rename or reorder modules: the state-dict keys are the compatibility contract.

Differences that do not touch the weights: the input size is a parameter (insightface fixes
112, i.e. a 7×7 final map), dropout is not in-place, and there is no fp16/autocast switch
(DeepSpeed owns precision here).
"""

from __future__ import annotations

import torch
from torch import nn

# Blocks per stage, as in insightface.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}

# Stem keeps the resolution; each of the four stages halves it.
DOWNSAMPLE = 16


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN.

    The stride sits in the *second* conv (unlike torchvision's BasicBlock); there is no
    activation after the addition. Both choices come from insightface and the weights
    depend on them.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """Stem (conv3×3 64, BN, PReLU) → 4 stages → BN2d → dropout → flatten → Linear → BN1d.

    The head flattens the whole (S/16)×(S/16)×512 map into one Linear, so the input size is
    fixed at construction (``image_size``, divisible by 16) and ``fc.weight`` has shape
    ``[D, 512·(S/16)²]``.
    """

    def __init__(self, layers: tuple[int, ...], embedding_size: int = 512, image_size: int = 112,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % DOWNSAMPLE or image_size <= 0:
            raise ValueError(f"IResNet needs an image size divisible by {DOWNSAMPLE}, got {image_size}")
        self.image_size = image_size
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        side = image_size // DOWNSAMPLE
        self.fc = nn.Linear(512 * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage starts with a stride-2 block, so it always needs a projection shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        stage = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        # insightface's initialisation; matters only when training from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # insightface freezes the embedding BN's scale at 1 (MXNet's fix_gamma heritage): the
        # parameter stays in the state dict but never trains. Optimisers must therefore be
        # built from parameters with requires_grad (torch optimisers skip grad=None anyway).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


def iresnet(name: str, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0) -> IResNet:
    """Build one of :data:`IRESNET_LAYERS` by name."""
    return IResNet(IRESNET_LAYERS[name], embedding_size, image_size, dropout)

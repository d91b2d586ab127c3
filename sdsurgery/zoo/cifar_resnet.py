"""The paper's CIFAR / SVHN ResNets (He et al. 2016, as trained in Huang et al. 2016).

Depth ``6n + 2``: a 3x3 stem conv with 16 channels, three stages of ``n`` basic blocks with
16, 32 and 64 channels (stride 2 at the first block of stages 2 and 3), global average pooling
and a linear classifier. The shortcut of a stride-2 block is parameter-free, as in the
original Torch code: 1x1 average pooling with stride 2 (subsampling) and zero channel padding.

Registered names: ``cifar_resnet20``, ``cifar_resnet56``, ``cifar_resnet110``,
``cifar_resnet1202`` and ``svhn_resnet152`` (n = 25).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet20", "cifar_resnet56", "cifar_resnet110",
           "cifar_resnet1202", "svhn_resnet152"]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU. Shapes: (N, C_in, H, W) ->
    (N, C_out, H / stride, W / stride)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            shortcut = F.avg_pool2d(shortcut, kernel_size=1, stride=self.stride)
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet of depth ``6 * blocks + 2`` for 32x32 inputs (any size works)."""

    def __init__(self, blocks: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.depth = 6 * blocks + 2
        self.num_classes = num_classes
        self.image_size = 32  # what it is built for: inspect / bench count FLOPs at this size by default
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _factory(blocks: int, name: str):
    def build(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
        return CifarResNet(blocks, num_classes=num_classes, in_chans=in_chans)
    build.__name__ = name
    build.__doc__ = f"The paper's {name}: {blocks} basic blocks per stage, depth {6 * blocks + 2}."
    return register_model(build, name=name)


cifar_resnet20 = _factory(3, "cifar_resnet20")
cifar_resnet56 = _factory(9, "cifar_resnet56")
cifar_resnet110 = _factory(18, "cifar_resnet110")
cifar_resnet1202 = _factory(200, "cifar_resnet1202")
svhn_resnet152 = _factory(25, "svhn_resnet152")

"""Models the tests run on: small inputs, random weights, no downloads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import timm
import torch
import torch.nn as nn
import torchvision


class Block(nn.Module):
    """A user block: identity shortcut, or a 1x1-conv projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(out + shortcut)


class CustomNet(nn.Module):
    """Identity and projection shortcuts, plus a residual written in the model's own forward."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(Block(8, 8), Block(8, 16, 2), Block(16, 16))
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage(self.stem(x))
        x = x.mean((2, 3))
        x = x + self.mix(x)  # a residual in the root's own forward
        return self.head(x)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, ...]
    residuals: int


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kw)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kw)


CASES = [
    Case("tv_resnet18", _tv("resnet18"), (2, 3, 32, 32), 8),
    Case("tv_resnet50", _tv("resnet50"), (2, 3, 32, 32), 16),
    Case("tv_mobilenet_v2", _tv("mobilenet_v2"), (2, 3, 32, 32), 10),
    Case("tv_efficientnet_b0", _tv("efficientnet_b0"), (2, 3, 32, 32), 9),
    Case("tv_convnext_tiny", _tv("convnext_tiny"), (2, 3, 32, 32), 18),
    Case("tv_vit_b_16", _tv("vit_b_16", image_size=32), (2, 3, 32, 32), 24),
    Case("tv_swin_t", _tv("swin_t"), (2, 3, 64, 64), 24),
    Case("timm_resnet18", _timm("resnet18"), (2, 3, 32, 32), 8),
    Case("timm_resnet50d", _timm("resnet50d"), (2, 3, 32, 32), 16),
    Case("timm_vit_tiny", _timm("vit_tiny_patch16_224", img_size=32), (2, 3, 32, 32), 24),
    Case("timm_convnext_atto", _timm("convnext_atto"), (2, 3, 32, 32), 12),
    Case("timm_swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=112, window_size=7),
         (2, 3, 112, 112), 24),
    Case("timm_efficientnet_b0", _timm("efficientnet_b0"), (2, 3, 32, 32), 9),
    Case("custom", CustomNet, (2, 3, 16, 16), 4),
]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every layer matter: fresh models hide mistakes (zero heads, layer scale 1e-6,
    BatchNorm at identity statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and float(p.std()) > 0 and "weight" in name and p.dim() > 1:
                continue  # keep the initialisers' scale for conv / linear weights
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75 if p.dim() <= 1 and not name.endswith("bias")
                    else torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


class ResidualConvNet(nn.Module):
    """BatchNorm-free residual CNN: its training is a deterministic function of the global
    batch, so data-parallel runs can be compared with one process."""

    def __init__(self, num_classes: int = 10, width: int = 8, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(blocks))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


def residual_convnet(num_classes: int = 10) -> nn.Module:
    return ResidualConvNet(num_classes)


class SizeBranching(nn.Module):
    """A block whose forward branches on the input size (as timm's TinyViT blocks do), with a
    drop-path slot at the end of each branch."""

    def __init__(self, c=8, window=4, gelu_last=False, batch_check=False):
        super().__init__()
        self.window, self.batch_check = window, batch_check
        self.attn = nn.Linear(c, c)
        self.drop_path1 = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c),
                                 *([nn.GELU()] if gelu_last else []))
        self.drop_path2 = nn.Identity()

    def forward(self, x):  # B, H, W, C
        B, H, W, C = x.shape
        if self.batch_check and B < 1:  # branches on the batch size: no batch-free rewrite
            raise ValueError("empty batch")
        shortcut = x
        if H == self.window:
            y = self.attn(x.reshape(B, H * W, C)).view(B, H, W, C)
        else:
            y = self.attn(x)
        x = shortcut + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(x))


class SizeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.blocks = nn.Sequential(SizeBranching(), SizeBranching())

    def forward(self, x):
        return self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2))

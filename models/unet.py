"""U-Net (Ronneberger et al. 2015) with batch norm, configurable width and depth."""
from __future__ import annotations

import torch
from torch import nn

from basics import NUM_CLASSES
from models.common import PadToStride, conv_bn_relu

__all__ = ["UNet", "unet"]


class UNet(nn.Module):
    """``depth`` down-sampling steps (stride 2**depth); widths base, 2·base, … doubling per level.
    Up-sampling by transposed convolution, skip connections by concatenation."""

    def __init__(self, num_classes: int = NUM_CLASSES, base: int = 32, depth: int = 4):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.inc = nn.Sequential(conv_bn_relu(3, widths[0]), conv_bn_relu(widths[0], widths[0]))
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(widths[i], widths[i + 1]), conv_bn_relu(widths[i + 1], widths[i + 1]))
            for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(
            nn.Sequential(conv_bn_relu(widths[i] * 2, widths[i]), conv_bn_relu(widths[i], widths[i]))
            for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def unet(num_classes: int = NUM_CLASSES, base: int = 32, depth: int = 4) -> nn.Module:
    return PadToStride(UNet(num_classes, base, depth), 2 ** depth)

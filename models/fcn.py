"""FCN-8s (Long et al. 2015) on a VGG-style encoder with batch norm, trained from scratch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from basics import NUM_CLASSES
from models.common import PadToStride, conv_bn_relu

__all__ = ["FCN8s", "fcn8s"]


class FCN8s(nn.Module):
    """Five VGG stages (2-3 convs each, max-pool after each: stride 32), then FCN-8s fusion:
    class scores from stage 5 upsampled ×2 and added to scores from stage 4, again ×2 with
    stage 3, then upsampled ×8 to the input. ``base`` is the first stage's width (VGG: 64)."""

    def __init__(self, num_classes: int = NUM_CLASSES, base: int = 32):
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8, base * 8]
        convs = [2, 2, 3, 3, 3]
        stages, cin = [], 3
        for w, n in zip(widths, convs):
            layers = [conv_bn_relu(cin if i == 0 else w, w) for i in range(n)]
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(conv_bn_relu(widths[4], widths[4] * 2), nn.Dropout2d(0.1),
                                  nn.Conv2d(widths[4] * 2, num_classes, 1))
        self.score4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score3 = nn.Conv2d(widths[2], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        s = self.head(feats[4])
        s = F.interpolate(s, size=feats[3].shape[-2:], mode="bilinear", align_corners=False) + self.score4(feats[3])
        s = F.interpolate(s, size=feats[2].shape[-2:], mode="bilinear", align_corners=False) + self.score3(feats[2])
        return F.interpolate(s, scale_factor=8, mode="bilinear", align_corners=False)


def fcn8s(num_classes: int = NUM_CLASSES, base: int = 32) -> nn.Module:
    return PadToStride(FCN8s(num_classes, base), 32)

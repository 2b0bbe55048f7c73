"""The blog's first model: one 3×3 convolution from RGB to 23 class scores, then ReLU."""
from __future__ import annotations

import torch
from torch import nn

from basics import NUM_CLASSES

__all__ = ["SingleConvolution"]


class SingleConvolution(nn.Module):
    """Conv2d(3 → num_classes, 3×3, padding 1) then ReLU: 644 parameters for 23 classes.

    The ReLU on logits is the blog's choice and is kept for a faithful reproduction.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, kernel_size=3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))

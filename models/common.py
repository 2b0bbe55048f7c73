"""What every segmentation model here shares: pad to the network's stride, crop back."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PadToStride", "ChannelsLast", "conv_bn_relu"]


class PadToStride(nn.Module):
    """Wrap a network so any input size works: pad H and W up to a multiple of ``stride``
    (reflection, so borders look like image content), run, crop the logits back.

    Also turns torchvision's ``{"out": logits}`` into plain logits.
    """

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net, self.stride = net, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if torch.compiler.is_exporting():  # a graph for any size: pad always (by 0 where none is needed)
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        elif ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        return out[..., :h, :w]


class ChannelsLast(nn.Module):
    """Run a model with channels_last weights and inputs (N×H×W×C in memory): faster convolutions
    on the CPU (oneDNN; measured in benchmarks/bench_engines.py) and with bf16 on GPUs. Logits
    come back in the usual layout. Used for inference (predict.py); training keeps the plain layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, dict):
            out = out["out"]
        return out.contiguous()


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3×3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

"""What every segmentation model here shares: pad to the network's stride, crop back."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PadToStride", "ChannelsLast", "Compiled", "conv_bn_relu"]


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


class Compiled(nn.Module):
    """A model whose forward runs through ``torch.compile`` (training: ``run_experiment.py --compile``),
    falling back to the plain model, with one message, where compiling fails (e.g. no C++ compiler
    for the CPU backend, or an unsupported platform). ``state_dict`` keys are those of the plain
    model under ``model.``; checkpoints hold the plain model (``distributed.unwrap`` peels this off)."""

    def __init__(self, model: nn.Module, **options):
        super().__init__()
        self.model = model
        self.__dict__["_compiled"] = torch.compile(model, **options)  # not a submodule: one set of weights
        self.failed: str | None = None

    @property
    def plain_model(self) -> nn.Module:
        """The model without compiling (``distributed.unwrap`` returns it)."""
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._compiled(x)
            except Exception as e:  # compilers fail in many ways; the plain model still trains
                self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"torch.compile failed ({self.failed[:300]}); training continues without compiling")
        return self.model(x)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3×3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

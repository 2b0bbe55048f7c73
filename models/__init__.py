"""Models and a small registry: ``get_model(name, num_classes=23, **options)``.

Every model takes normalised photos N×3×H×W of any size and returns logits N×C×H×W. Loading
weights from a file (--weights, --init-from, checkpoints) is checkpoint.py's.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from basics import NUM_CLASSES, InputError
from models.common import ChannelsLast, Compiled, PadToStride
from models.encoder_decoder import ENCODERS, EncoderDecoder, encoder_decoder
from models.efficientnet_lite import EfficientNetLite
from models.fcn import FCN8s, fcn8s
from models.mobilenet import deeplabv3_mobilenet, lraspp_mobilenet
from models.single_conv import SingleConvolution
from models.unet import UNet, unet

__all__ = ["SingleConvolution", "FCN8s", "UNet", "EncoderDecoder", "EfficientNetLite", "PadToStride", "ChannelsLast", "Compiled", "get_model",
           "MODELS", "PRETRAINED", "register", "count_parameters", "encoder_parameters"]

#: name → constructor taking num_classes (and keyword options).
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator adding a model constructor to the registry."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


for _name, _fn in (("single_conv", SingleConvolution), ("fcn8s", fcn8s), ("unet", unet),
                   ("deeplabv3_mobilenet", deeplabv3_mobilenet), ("lraspp_mobilenet", lraspp_mobilenet)):
    register(_name)(_fn)
for _enc in ENCODERS:
    register(f"unet_{_enc}")(encoder_decoder(_enc))

#: models that take ``pretrained=True`` (ImageNet weights for their encoder or backbone)
PRETRAINED = tuple(f"unet_{e}" for e in ENCODERS) + ("deeplabv3_mobilenet", "lraspp_mobilenet")


def get_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """Build a registered model by name: from scratch unless ``pretrained=True`` (models in
    ``PRETRAINED``), which loads ImageNet weights for the encoder (see models/encoder_decoder.py)."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if kwargs.get("pretrained") and name not in PRETRAINED:
        raise InputError(f"model {name!r} has no pretrained encoder; --pretrained works with: {', '.join(PRETRAINED)}")
    if not kwargs.get("pretrained"):
        kwargs.pop("pretrained", None)
    return MODELS[name](num_classes=num_classes, **kwargs)


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a model's pretrained part (EncoderDecoder's encoder, torchvision's
    ``backbone``), for a lower learning rate or freezing; [] for a model without one."""
    for m in model.modules():
        if isinstance(m, EncoderDecoder):
            return list(m.encoder.parameters())
        if isinstance(getattr(m, "backbone", None), nn.Module):
            return list(m.backbone.parameters())
    return []


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

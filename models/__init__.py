"""Models and a small registry: ``get_model(name, num_classes=23, **options)``.

Every model takes normalised photos N×3×H×W of any size and returns logits N×C×H×W.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from basics import NUM_CLASSES
from models.common import PadToStride
from models.fcn import FCN8s, fcn8s
from models.mobilenet import deeplabv3_mobilenet, lraspp_mobilenet
from models.single_conv import SingleConvolution
from models.unet import UNet, unet

__all__ = ["SingleConvolution", "FCN8s", "UNet", "PadToStride", "get_model", "MODELS", "register",
           "count_parameters", "load_weights"]

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


def get_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """Build a registered model by name (from scratch: no download ever happens)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a local weights file: a checkpoint of ours (``{"model": state_dict}``), a full state
    dict, or an ImageNet backbone state dict (e.g. torchvision's MobileNetV3-Large ``features``).
    Returns what was loaded; raises ValueError naming the file when nothing fits."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read weights ({e}); pass a .pt/.pth file") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    own = model.state_dict()
    if set(sd) == set(own):
        model.load_state_dict(sd)
        return f"all {len(sd)} tensors"
    # a classification backbone: map its "features.N" keys onto ours wherever names and shapes match
    matched = {}
    for k, v in sd.items():
        for prefix in ("net.backbone.", "backbone.", "net."):
            cand = prefix + k.replace("features.", "", 1) if k.startswith("features.") else prefix + k
            if cand in own and own[cand].shape == v.shape:
                matched[cand] = v
                break
    if not matched:
        raise ValueError(f"{path}: no tensor in this file fits the model (keys like {next(iter(sd), '?')!r}); "
                         "pass a checkpoint of this model or a backbone state dict of the same architecture")
    model.load_state_dict(matched, strict=False)
    return f"{len(matched)} of {len(own)} tensors (backbone)"

"""Models and a small registry: ``get_model(name, num_classes=23)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from basics import NUM_CLASSES
from models.single_conv import SingleConvolution

__all__ = ["SingleConvolution", "get_model", "MODELS", "register", "count_parameters"]

#: name → constructor taking num_classes (and keyword options).
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator adding a model constructor to the registry."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


register("single_conv")(SingleConvolution)


def get_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """Build a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

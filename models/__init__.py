"""Models and a small registry: ``get_model(name, num_classes=23, **options)``.

Every model takes normalised photos N×3×H×W of any size and returns logits N×C×H×W.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from basics import NUM_CLASSES, InputError
from layout import ClassSet
from models.common import ChannelsLast, Compiled, PadToStride
from models.encoder_decoder import ENCODERS, EncoderDecoder, encoder_decoder
from models.efficientnet_lite import EfficientNetLite
from models.fcn import FCN8s, fcn8s
from models.mobilenet import deeplabv3_mobilenet, lraspp_mobilenet
from models.single_conv import SingleConvolution
from models.unet import UNet, unet

__all__ = ["SingleConvolution", "FCN8s", "UNet", "EncoderDecoder", "EfficientNetLite", "PadToStride", "ChannelsLast", "Compiled", "get_model",
           "MODELS", "PRETRAINED", "register", "count_parameters", "load_weights", "load_state", "encoder_parameters",
           "init_from", "check_classes", "checkpoint_classes"]

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


def load_state(model: nn.Module, sd: dict, path: str | os.PathLike = "state dict") -> None:
    """``model.load_state_dict(sd)`` with one clear message when names or shapes differ."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        what = (f"{len(shapes)} tensor(s) of other shapes (e.g. {shapes[0]}: file {tuple(sd[shapes[0]].shape)}, "
                f"model {tuple(own[shapes[0]].shape)})" if shapes else
                f"{len(missing)} missing and {len(extra)} unexpected tensor(s) (e.g. {(missing or extra)[0]})")
        raise InputError(f"{path}: does not fit this model: {what}. Was it trained with other options "
                         "(model, --base, --depth, number of classes)?")
    model.load_state_dict(sd)


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a local weights file: a checkpoint of ours (``{"model": state_dict}``), a full state
    dict, or an ImageNet backbone state dict (e.g. torchvision's MobileNetV3-Large ``features``).
    Returns what was loaded; raises ValueError naming the file when nothing fits."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except (OSError, RuntimeError, EOFError) as e:
        raise InputError(f"{path}: cannot read weights ({str(e).splitlines()[0]}); pass a .pt/.pth file of "
                         "tensors (a checkpoint of ours or a state dict)") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    own = model.state_dict()
    if set(sd) == set(own):
        load_state(model, sd, path)
        return f"all {len(sd)} tensors"
    # a classification backbone: map its "features.N" keys onto ours wherever names and shapes match
    matched, wrong_shape = {}, []
    for k, v in sd.items():
        for prefix in ("net.backbone.", "backbone.", "net."):
            cand = prefix + k.replace("features.", "", 1) if k.startswith("features.") else prefix + k
            if cand in own:
                if own[cand].shape == v.shape:
                    matched[cand] = v
                else:
                    wrong_shape.append((cand, tuple(v.shape), tuple(own[cand].shape)))
                break
    if wrong_shape:
        k, a, b = wrong_shape[0]
        raise InputError(f"{path}: {len(wrong_shape)} tensor(s) match the model by name but not by shape "
                         f"(e.g. {k}: file {a}, model {b}); pass weights of the same architecture")
    if not matched:
        raise InputError(f"{path}: no tensor in this file fits the model (keys like {next(iter(sd), '?')!r}); "
                         "pass a checkpoint of this model or a backbone state dict of the same architecture")
    model.load_state_dict(matched, strict=False)
    return f"{len(matched)} of {len(own)} tensors (backbone)"


def _read(path: str | os.PathLike) -> dict:
    from train import load_checkpoint  # the one checkpoint reader (weights_only, one-line errors)

    return load_checkpoint(path)


def checkpoint_classes(ck: dict) -> ClassSet | None:
    """The class set a checkpoint of ours was trained on: its meta's ``classes``, or the drone
    classes for checkpoints written before class sets travelled; None for a bare state dict."""
    meta = ck.get("meta") if isinstance(ck.get("meta"), dict) else None
    if meta is not None or "model_name" in ck:
        return ClassSet.from_dict((meta or ck).get("classes"))
    return None


def check_classes(path: str | os.PathLike, classes: ClassSet) -> None:
    """Stop with one line when the checkpoint at ``path`` was trained on another class set than
    ``classes`` (the data's): its classifier would be meaningless; --init-from is the way."""
    theirs = checkpoint_classes(_read(path))
    if theirs is not None and theirs.names != classes.names:
        raise InputError(f"{path}: trained on {theirs.num_classes} classes ({', '.join(theirs.names[:6])}"
                         f"{', ...' if theirs.num_classes > 6 else ''}), but the data has {classes.num_classes} "
                         f"({', '.join(classes.names[:6])}{', ...' if classes.num_classes > 6 else ''}, from "
                         f"{classes.where()}): start from it with --init-from {path} instead")


def init_from(model: nn.Module, path: str | os.PathLike) -> str:
    """Load every tensor of a checkpoint of ours that matches the model by name and shape (e.g.
    the whole network but the classifier when the class count differs; the rest keeps its fresh
    initialisation). Returns one line saying what was loaded and what was not."""
    ck = _read(path)
    sd = ck["model"] if isinstance(ck, dict) and isinstance(ck.get("model"), dict) else ck
    own = model.state_dict()
    matched = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise InputError(f"{path}: no tensor fits this model by name and shape (keys like {next(iter(sd), '?')!r}); "
                         "pass a checkpoint of the same --model (and --base/--depth)")
    model.load_state_dict(matched, strict=False)
    shape = [k for k in own if k in sd and k not in matched]
    absent = [k for k in own if k not in sd]
    params = {k for k, _ in model.named_parameters()}
    not_loaded = shape + absent
    n_par = sum(1 for k in matched if k in params)
    text = f"loaded {len(matched)} of {len(own)} tensors ({n_par} of {len(params)} parameters)"
    if not_loaded:
        text += (f"; new (other shape): {', '.join(shape[:4])}{' ...' if len(shape) > 4 else ''}" if shape else "")
        text += (f"; new (not in the file): {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}" if absent else "")
    return text

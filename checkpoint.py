"""The model file, in one place: writing and reading checkpoints (best.pt, last.pt, model.pt),
what they record about their model (:class:`ModelMeta`: name and options, class set, sizes, the
run's settings and the split it was trained on), loading their weights into a model (whole:
:func:`load_state`; in part: :func:`load_weights` for --weights, :func:`init_from` for
--init-from, whose classifier rows follow the class names), and the metadata an exported ONNX
file carries (written by export.py, read by predict.py).

train.Checkpoints writes and reads the training state (optimiser, schedule, random generators)
through :func:`save_checkpoint` and :func:`load_checkpoint`; every other reader uses
:func:`read_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from basics import InputError, atomic_write
from layout import DRONE_CLASSES, ClassSet
from models import get_model

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "Checkpoint", "ModelMeta", "check_classes",
           "load_state", "load_weights", "init_from", "PRODUCER", "onnx_props", "encode_onnx_values",
           "read_onnx_props"]


def save_checkpoint(path: str | os.PathLike, **payload) -> None:
    """torch.save, atomically: a kill never leaves half a checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict) with
    ``weights_only=True``: tensors and plain data only, so a file from elsewhere cannot run code.
    ``mmap``: tensors stay on disk until used (cheap when only the metadata is wanted)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; pass an existing .pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: the checkpoint holds Python objects besides tensors and plain data (e.g. an "
                         "argparse.Namespace), which are not loaded, since loading them can run code. Re-save it "
                         "with plain values (vars(args) instead of args), or pass a plain state dict") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise InputError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]}); pass a .pt file written "
                         "by this repository or a plain state dict") from None


@dataclass
class ModelMeta:
    """What a checkpoint says about its model (its ``meta``): what rebuilds it (``model_name``,
    ``model_kwargs``, ``classes``), the sizes (W, H) it was trained at and runs at, and where it
    came from: the run's settings (``config``: run_experiment.RunConfig as a dict), the split
    (``split``: ``{"ids": {name: [ids]}, "seed": the --split-seed that made it, or None for a
    dataset's own lists, "digest": its identity}``) and the command. ``extra``: any further
    entries (e.g. ``train_gsd``), kept as they are."""

    model_name: str
    model_kwargs: dict = field(default_factory=dict)
    classes: ClassSet = DRONE_CLASSES
    train_size: list | None = None
    eval_size: list | None = None  # None: the training size (600x400 where none is recorded)
    config: dict | None = None
    split: dict | None = None
    command: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.eval_size is None:
            self.eval_size = list(self.train_size or [600, 400])
        if self.split is not None and "digest" not in self.split and "ids" in self.split:
            self.split = {**self.split, "digest": self.split_digest(self.split["ids"])}

    @staticmethod
    def split_digest(ids: dict[str, Sequence[str]]) -> str:
        """The identity of a split: a hash of its ids, list by list (order included)."""
        text = json.dumps({name: list(v) for name, v in ids.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """What a checkpoint stores as its ``meta`` (plain data: loadable with weights_only)."""
        return {**self.extra, "model_name": self.model_name, "model_kwargs": dict(self.model_kwargs),
                "classes": self.classes.to_dict(), "train_size": self.train_size, "eval_size": self.eval_size,
                "config": self.config, "split": self.split, "command": self.command}

    @classmethod
    def of(cls, ck) -> "ModelMeta | None":
        """The meta of a loaded checkpoint, whichever version wrote it (its ``meta``, or the
        top-level keys of run_single_conv.py's older model.pt); None for a bare state dict."""
        if not isinstance(ck, dict):
            return None
        meta = ck["meta"] if isinstance(ck.get("meta"), dict) else ck
        if not isinstance(meta.get("model_name"), str):
            return None
        train = meta.get("train_size") or meta.get("size")
        known = {"model_name", "model_kwargs", "classes", "train_size", "size", "eval_size", "config", "split",
                 "command", "model", "optimizer", "scheduler", "history", "epoch", "best", "rng", "rng_ranks",
                 "plan", "budget", "select_metric", "selected_on"}
        return cls(meta["model_name"], dict(meta.get("model_kwargs") or {}), ClassSet.from_dict(meta.get("classes")),
                   list(train) if train else None, list(meta["eval_size"]) if meta.get("eval_size") else None,
                   meta.get("config"), meta.get("split"), meta.get("command"),
                   {k: v for k, v in meta.items() if k not in known})


@dataclass
class Checkpoint:
    """A checkpoint of ours read back (:func:`read_checkpoint`): the model's weights and what is
    known about them. ``selected_on``: "val" for a best.pt chosen by its val ``score``, else
    "last_epoch" (last.pt, model.pt: the epoch training ended at)."""

    path: Path
    weights: dict
    meta: ModelMeta
    epoch: int | None = None
    history: dict | None = None
    score: float | None = None
    selected_on: str = "last_epoch"


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Checkpoint:
    """A best.pt, last.pt or model.pt of ours (any version); one line naming the file for
    anything else. ``mmap``: the weights stay on disk until used (to read the meta alone)."""
    ck = load_checkpoint(path, mmap=mmap)
    meta = ModelMeta.of(ck)
    if meta is None or not isinstance(ck.get("model"), dict):
        raise InputError(f"{path}: not a checkpoint of ours (no model name in it); pass a best.pt or last.pt of "
                         "run_experiment.py or a model.pt of run_single_conv.py")
    # best.pt records the metric it was selected by (older ones too); last.pt has none
    selected = ck.get("selected_on") or ("val" if "select_metric" in ck else "last_epoch")
    return Checkpoint(Path(path), ck["model"], meta, ck.get("epoch"), ck.get("history"),
                      ck.get("best") if selected == "val" else None, selected)


def _few(names: Sequence[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def check_classes(path: str | os.PathLike, classes: ClassSet, theirs: ClassSet | None = None, *,
                  scoring: bool = False) -> None:
    """Stop with one line when the checkpoint at ``path`` (trained on ``theirs``, read from the
    file when not given) was trained on another class set than ``classes`` (the data's): its
    classifier would be meaningless. The way out: for --weights, --init-from; for scoring
    (--eval-only), the data it was trained on."""
    if theirs is None:
        meta = ModelMeta.of(load_checkpoint(path, mmap=True))
        theirs = meta.classes if meta is not None else None
    if theirs is None or theirs.names == classes.names:
        return
    fix = ("score it on data of the classes it was trained on (the --data-root, or --classes file, of its "
           "training run)" if scoring else f"start from it with --init-from {path} instead")
    raise InputError(f"{path}: trained on {theirs.num_classes} classes ({_few(theirs.names)}), but the data has "
                     f"{classes.num_classes} ({_few(classes.names)}, from {classes.where()}): {fix}")


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


def _weights(ck) -> dict:
    """The state dict in a checkpoint of ours, or the file itself when it is a bare state dict."""
    return ck["model"] if isinstance(ck, dict) and isinstance(ck.get("model"), dict) else ck


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a local weights file: a checkpoint of ours (``{"model": state_dict}``), a full state
    dict, or an ImageNet backbone state dict (e.g. torchvision's MobileNetV3-Large ``features``).
    Returns what was loaded; raises InputError naming the file when nothing fits."""
    sd = _weights(load_checkpoint(path))
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


def _class_axes(meta: ModelMeta, sd: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors indexed by class (the classifier's weight and bias, FCN-8s' score
    layers, ...), each with its class axes: the tensors whose shape follows the class count when
    its architecture is built (on the meta device, nothing allocated) with one class more.
    {} where the architecture cannot be rebuilt or does not fit the file."""
    c = meta.classes.num_classes
    try:
        with torch.device("meta"):
            a = get_model(meta.model_name, num_classes=c, **meta.model_kwargs).state_dict()
            b = get_model(meta.model_name, num_classes=c + 1, **meta.model_kwargs).state_dict()
    except (InputError, TypeError, ValueError):  # a model no longer registered, options it no longer takes
        return {}
    axes = {k: tuple(d for d, (x, y) in enumerate(zip(v.shape, b[k].shape)) if x != y)
            for k, v in a.items() if v.shape != b[k].shape}
    if any(k not in sd or tuple(sd[k].shape) != tuple(a[k].shape) for k in axes):
        return {}  # the file's classifier is not the one its meta describes
    return axes


def _place_rows(new: torch.Tensor, old: torch.Tensor, axes: tuple[int, ...], new_idx: torch.Tensor,
                old_idx: torch.Tensor) -> torch.Tensor:
    """``new`` with ``old``'s entries at ``old_idx`` placed at ``new_idx``, along every class axis."""
    d, rest = axes[0], axes[1:]
    src = old.index_select(d, old_idx)
    if rest:  # a tensor indexed by class twice (C→C): place the columns within the chosen rows
        src = _place_rows(new.index_select(d, new_idx), src, rest, new_idx, old_idx)
    return new.index_copy(d, new_idx, src)


def init_from(model: nn.Module, path: str | os.PathLike, classes: ClassSet) -> str:
    """Start ``model`` (built for ``classes``, the data's) from a checkpoint of ours, also of
    another class set: every tensor that matches by name and shape is loaded, and the tensors
    indexed by class (the classifier's rows) are taken by class name: a class keeps its own row
    wherever it stood in the checkpoint, a name the checkpoint lacks keeps its fresh row.
    Returns one line saying what was loaded and what was not; raises InputError when no
    parameter fits (another architecture)."""
    ck = load_checkpoint(path)
    sd, meta = _weights(ck), ModelMeta.of(ck)
    theirs = meta.classes if meta is not None else None
    axes = _class_axes(meta, sd) if meta is not None else {}
    own = model.state_dict()

    def fits_but_classes(k: str) -> bool:  # the same shape but along the class axes
        a, b = sd[k], own[k]
        return a.dim() == b.dim() and all(a.shape[d] == b.shape[d] for d in range(b.dim()) if d not in axes[k])

    # the classifier is taken by name as a whole, or not at all (another width: its rows mean nothing)
    by_name = bool(axes) and theirs.names != classes.names and \
        all(fits_but_classes(k) for k in axes if k in own and k in sd)
    params = {k for k, _ in model.named_parameters()}
    matched, rowed, shape, absent = {}, {}, [], []
    mapping = [(j, theirs.names.index(n)) for j, n in enumerate(classes.names) if n in theirs.names] if by_name else []
    for k, v in own.items():
        if k not in sd:
            absent.append(k)
        elif by_name and k in axes:
            rowed[k] = v.clone()
            if mapping:
                new_idx, old_idx = (torch.tensor(i) for i in zip(*mapping))
                rowed[k] = _place_rows(rowed[k], sd[k].to(v.dtype), axes[k], new_idx, old_idx)
        elif tuple(sd[k].shape) == tuple(v.shape):
            matched[k] = sd[k]
        else:
            shape.append(k)
    n_par = sum(1 for k in matched if k in params)
    if n_par == 0 and not (mapping and any(k in params for k in rowed)):  # e.g. only batch-norm counters fit
        only = f" (only {len(matched)} buffer(s) such as {next(iter(matched))} match)" if matched else ""
        raise InputError(f"{path}: no parameter fits this model by name and shape{only}; pass a checkpoint of the "
                         "same --model (and --base/--depth)")
    model.load_state_dict({**matched, **rowed}, strict=False)
    text = f"loaded {len(matched)} of {len(own)} tensors ({n_par} of {len(params)} parameters)"
    if rowed:
        got = [classes.names[j] for j, _ in mapping]
        new = [n for n in classes.names if n not in got]
        text += f"; classifier ({', '.join(rowed)}): rows of {len(got)} of {classes.num_classes} classes taken by name"
        if new and got:
            text += f" ({_few(got, 8)}), new: {_few(new, 8)}"
        elif new:
            text += " (no class name in common): all new"
        elif [i for _, i in mapping] != list(range(len(mapping))):
            text += " (in another order)"
    elif theirs is not None and theirs.names != classes.names and not shape:
        text += (f"; the checkpoint's classes ({_few(theirs.names)}) differ from the data's, but its classifier "
                 "could not be told apart: its rows are kept in their order")
    if shape:
        text += f"; new (other shape): {', '.join(shape[:4])}{' ...' if len(shape) > 4 else ''}"
    if absent:
        text += f"; new (not in the file): {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}"
    return text


#: the producer tag that marks an ONNX file's metadata as export.py's
PRODUCER = "drone-seg export.py"
#: what the graph's input is, in words (stored with the metadata)
_ONNX_INPUT = "image: float32 N×3×H×W RGB, (pixel / 255 - mean) / std"


def encode_onnx_values(values: dict) -> dict[str, str]:
    """ONNX metadata holds strings: each value as JSON."""
    return {k: json.dumps(v) for k, v in values.items()}


def onnx_props(*, class_names: Sequence[str], class_colors: Sequence[Sequence[int]], model_name: str,
               eval_size: Sequence[int], mean: Sequence[float], std: Sequence[float], **extra) -> dict[str, str]:
    """The metadata export.py writes into an ONNX file: the class names and colours, the model's
    name, the size (W, H) it runs at, the input normalisation (mean, std), ``extra`` entries, and
    the producer tag that marks the file as ours (:func:`read_onnx_props` reads it back)."""
    values = {"class_names": list(class_names), "class_colors": [[int(v) for v in c] for c in class_colors],
              "mean": [float(v) for v in mean], "std": [float(v) for v in std], "model_name": model_name,
              "eval_size": [int(v) for v in eval_size], "input": _ONNX_INPUT, **extra}
    return {"producer": PRODUCER, **encode_onnx_values(values)}


def read_onnx_props(props: dict[str, str], path: str | os.PathLike) -> dict:
    """The values :func:`onnx_props` wrote into the ONNX file at ``path`` (its custom metadata
    map ``props``); InputError naming the file when export.py did not write it."""
    if props.get("producer") != PRODUCER:
        raise InputError(f"{path}: this ONNX file was not written by export.py (no class names or input "
                         "normalisation in its metadata); export the checkpoint with export.py")
    try:
        return {k: json.loads(v) for k, v in props.items() if k != "producer"}
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: its metadata is damaged ({e}); export the checkpoint again with export.py") from None

"""The blog's toolkit: device, normalisation statistics, the dataset's classes, seeding, and
the names every notebook of the blog uses after ``from basics import *`` (``torch``, ``nn``,
``DataLoader``, ``summary``, ``tqdm``, ``time``, ``np``).

Cheap at import: nothing here touches the disk or the GPU beyond asking whether CUDA exists;
torchsummary is imported only when :func:`summary` runs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

#: What the blog's cells use after ``from basics import *`` without importing it themselves:
#: basics is the toolkit every notebook star-imports. Other modules export only their own names.
TOOLKIT: tuple[str, ...] = ("torch", "nn", "DataLoader", "tqdm", "time", "np")

__all__ = [
    "device", "mean", "std", "NUM_CLASSES", "CLASS_NAMES", "CLASS_COLORS",
    "seed_everything", "get_device", "write_json", "atomic_write", "remove_temporaries", "put_until_stopped",
    "InputError",
    "summary", "ModelSummary", "TOOLKIT", "torch", "nn", "DataLoader", "tqdm", "time", "np",
]


class InputError(ValueError):
    """Bad input from the user (an option, a file): the message names it and the fix.

    Scripts turn exactly these (and missing files) into one line and exit code 2; any other
    error is a bug and keeps its traceback."""

#: The device the blog trains on: CUDA when present, else the CPU.
device: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: ImageNet statistics, as in the blog (photos are normalised with these).
mean: list[float] = [0.485, 0.456, 0.406]
std: list[float] = [0.229, 0.224, 0.225]

#: Classes used by the Semantic Drone Dataset. Index 23 ("conflicting") exists in the
#: class dict but never occurs in the masks, so the models predict 23 classes.
NUM_CLASSES: int = 23

#: Class names, index 0..22, as in the dataset's class_dict_seg.csv.
CLASS_NAMES: tuple[str, ...] = (
    "unlabeled", "paved-area", "dirt", "grass", "gravel", "water", "rocks", "pool",
    "vegetation", "roof", "wall", "window", "door", "fence", "fence-pole", "person",
    "dog", "car", "bicycle", "tree", "bald-tree", "ar-marker", "obstacle",
)

#: RGB colour of each class in the dataset's colour masks (same order as CLASS_NAMES).
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (128, 64, 128), (130, 76, 0), (0, 102, 0), (112, 103, 87), (28, 42, 168),
    (48, 41, 30), (0, 50, 89), (107, 142, 35), (70, 70, 70), (102, 102, 156),
    (254, 228, 12), (254, 148, 12), (190, 153, 153), (153, 153, 153), (255, 22, 96),
    (102, 51, 0), (9, 143, 150), (119, 11, 32), (51, 51, 0), (190, 250, 190),
    (112, 150, 146), (2, 135, 115),
)


def get_device(name: str | None = None) -> torch.device:
    """Resolve a device name ('cpu', 'cuda', 'cuda:1', None or 'auto' for the default)."""
    if name in (None, "", "auto"):
        return device
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


class ModelSummary(str):
    """torchsummary's table as text: ``print(summary(...))`` prints it once, and a notebook cell
    that ends with ``summary(...)`` shows it as the table (not as a quoted string)."""

    def __repr__(self) -> str:
        return str(self)


def summary(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = -1) -> ModelSummary:
    """torchsummary's layer table of ``model`` for one input of ``input_size`` (C, H, W), returned.

    Computed on a CPU copy: torchsummary knows only "cuda" (device 0) and "cpu", so a model on
    cuda:1, or on the CPU of a machine with a GPU, would meet its inputs on another device; the
    caller's model is left as it is. (torchsummary's own ``summary`` prints and returns None, so
    the blog's ``print(summary(model, size))`` printed "None" after the table.)"""
    from contextlib import redirect_stdout

    from torchsummary import summary as torchsummary_table

    text = io.StringIO()
    with redirect_stdout(text):
        torchsummary_table(copy.deepcopy(model).cpu(), tuple(input_size), batch_size=batch_size, device="cpu")
    return ModelSummary(text.getvalue().rstrip("\n"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    # PYTHONHASHSEED is read only when an interpreter starts, so setting it here would change
    # nothing in this process; nothing of ours depends on str hashing order


def _strict(obj):
    """NaN and infinities become None (JSON null); numbers and tensors become plain floats."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)  # paths and the like
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden, same suffix, so writers that pick the
    format from the suffix work); when the block ends without error it is renamed to ``path``,
    else deleted. Readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files this process's :func:`atomic_write` left in ``folder`` (after
    an interrupt stopped threads mid-write); returns them."""
    gone = []
    for tmp in Path(folder).glob(f".*.{os.getpid()}-*.tmp*"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def write_json(path: str | os.PathLike, obj) -> None:
    """Write strict JSON (NaN → null, so any reader loads it), atomically."""
    import json

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_strict(obj), indent=2, allow_nan=False))


def put_until_stopped(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into a bounded queue, giving up (False) once ``stop`` is set: a pipeline thread
    never hangs on a full queue after the run has stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False

"""Losses for segmentation: cross-entropy, class-weighted cross-entropy (weights from the train
split's pixel frequencies, counted once and cached) and cross-entropy plus soft Dice.

The training loop that uses them is in train.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from basics import NUM_CLASSES, InputError, write_json
from cache import default_cache_dir

__all__ = ["LOSSES", "DiceCELoss", "class_weights", "make_loss"]

LOSSES = ("ce", "wce", "ce+dice")


class DiceCELoss(nn.Module):
    """Cross-entropy plus soft Dice (1 − mean Dice over classes present in the batch's truth or
    prediction); pixels equal to ``ignore_index`` count in neither."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = 255, dice_weight: float = 1.0):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.ignore_index, self.dice_weight = ignore_index, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.ce(logits, target)
        c = logits.shape[1]
        valid = (target != self.ignore_index) & (target >= 0) & (target < c)
        prob = logits.float().softmax(1) * valid.unsqueeze(1)
        onehot = nn.functional.one_hot(target.clamp(0, c - 1) * valid, c).permute(0, 3, 1, 2) * valid.unsqueeze(1)
        inter = (prob * onehot).sum((0, 2, 3))
        truth = onehot.sum((0, 2, 3))
        denom = prob.sum((0, 2, 3)) + truth
        # softmax is never exactly 0, so "predicted" means the argmax, over the valid pixels
        predicted = torch.bincount(logits.detach().argmax(1)[valid], minlength=c)[:c]
        present = (truth > 0) | (predicted > 0)
        dice = (2 * inter[present] + 1) / (denom[present] + 1)
        return ce + self.dice_weight * (1 - dice.mean())


def class_weights(dataset, num_classes: int | None = None, cache_dir: str | os.PathLike | None = None
                  ) -> torch.Tensor:
    """Per-class loss weights 1/ln(1.02 + p) (ENet) from the split's pixel frequencies p,
    computed once and cached as JSON beside the dataset cache. ``num_classes`` defaults to the
    dataset's class set (the drone dataset's 23)."""
    classes = getattr(dataset, "classes", None)
    num_classes = num_classes or (classes.num_classes if classes is not None else NUM_CLASSES)
    # each mask's identity (size, mtime) is in the key: a changed mask means new counts
    ident = [[str(m), m.stat().st_size, m.stat().st_mtime_ns] for _, m in dataset.pairs]
    key = hashlib.sha1(json.dumps([ident, list(dataset.size), num_classes]).encode())
    path = Path(cache_dir or default_cache_dir()) / f"class-weights-{dataset.name}-{key.hexdigest()[:16]}.json"
    try:
        counts = torch.tensor(json.loads(path.read_text()), dtype=torch.float64)
    except (OSError, ValueError):
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for i in tqdm(range(len(dataset)), desc="class frequencies", leave=False):
            counts += torch.bincount(torch.from_numpy(dataset.raw(i)[1].reshape(-1).astype(np.int64)),
                                     minlength=num_classes)[:num_classes].double()
        try:
            write_json(path, counts.tolist())
        except OSError:
            pass  # a read-only cache folder only costs recomputing next time
    p = counts / counts.sum()
    return (1.0 / torch.log(1.02 + p)).float()


def make_loss(name: str = "ce", weight: torch.Tensor | None = None, ignore_index: int = 255) -> nn.Module:
    """'ce' (cross-entropy), 'wce' (class-weighted, pass ``weight``), 'ce+dice'."""
    if name == "ce":
        return nn.CrossEntropyLoss(ignore_index=ignore_index)
    if name == "wce":
        if weight is None:
            raise ValueError("loss 'wce' needs class weights (train.class_weights)")
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "ce+dice":
        return DiceCELoss(weight, ignore_index)
    raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")

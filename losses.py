"""Losses for segmentation: cross-entropy, class-weighted cross-entropy (weights from the train
split's pixel frequencies, counted once and cached), cross-entropy plus soft Dice, and the
Lovasz-softmax loss that optimises IoU (alone or plus cross-entropy), and online hard example
mining (cross-entropy over the hard pixels only).

The training loop that uses them is in train.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from basics import NUM_CLASSES, InputError, write_json
from cache import CACHE_FORMAT_VERSION, default_cache_dir
from layout import IGNORE

__all__ = ["LOSSES", "DiceCELoss", "LovaszLoss", "OhemCELoss", "lovasz_softmax", "class_weights",
           "class_pixel_counts", "make_loss", "IgnoreAlso", "ignoring_void"]

LOSSES = ("ce", "wce", "ce+dice", "lovasz", "ce+lovasz", "ohem")


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


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018): the Lovasz extension of the Jaccard loss
    1 - IoU of each class, on the class probabilities ``probs`` (N×C×H×W, softmax already taken)
    of the whole batch, averaged over the classes present in its ground truth. It optimises the
    IoU itself, so a thin class counts by its IoU, not by its few pixels. Pixels equal to
    ``ignore_index`` (or outside 0..C-1) count nowhere; a batch with no valid pixel gives 0
    (with a gradient, so a step still runs)."""
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    t = target.reshape(-1)
    valid = (t != ignore_index) & (t >= 0) & (t < c)
    p, t = p[valid], t[valid]
    if t.numel() == 0:
        return probs.sum() * 0
    present = torch.unique(t)  # classes present in the truth: absent ones have no IoU to lose
    fg = (t[None, :] == present[:, None]).to(p.dtype)  # K×P, one row per present class
    errors, order = torch.sort((fg - p[:, present].T).abs(), dim=1, descending=True)
    fg = torch.gather(fg, 1, order)
    # the Jaccard loss of the first i+1 pixels (by error) as they join one by one; its increments
    # are the Lovasz extension's gradient, so each class's loss is their dot product with the errors
    gts = fg.sum(1, keepdim=True)
    jaccard = 1 - (gts - fg.cumsum(1)) / (gts + (1 - fg).cumsum(1))
    jaccard = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    return (errors * jaccard).sum(1).mean()


class LovaszLoss(nn.Module):
    """Lovasz-softmax on the logits' softmax, alone or added to cross-entropy (``ce_weight`` > 0)."""

    def __init__(self, ignore_index: int = 255, ce_weight: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index, self.ce_weight = ignore_index, ce_weight
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index) if ce_weight else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = lovasz_softmax(logits.float().softmax(1), target, self.ignore_index)
        return loss + self.ce_weight * self.ce(logits, target) if self.ce is not None else loss


class OhemCELoss(nn.Module):
    """Online hard example mining: cross-entropy averaged over the hard pixels only, those whose
    true class has a probability under ``thresh``, and never fewer than the ``min_kept`` share of
    the batch's valid pixels (the hardest first), so that a batch the model already gets right
    still gives a gradient. Easy pixels (large, well-learnt classes) drop out, which leaves the
    loss to the rare and thin classes the model still misses. Pixels equal to ``ignore_index``
    count nowhere; a batch with no valid pixel gives 0 (with a gradient). Unweighted. Under torchrun
    each process picks the hard pixels of its own share of the batch."""

    def __init__(self, thresh: float = 0.7, min_kept: float = 0.1, ignore_index: int = 255):
        super().__init__()
        if not 0 < thresh <= 1 or not 0 < min_kept <= 1:
            raise ValueError(f"OhemCELoss: thresh {thresh} and min_kept {min_kept} must lie in (0, 1]")
        self.thresh, self.min_kept, self.ignore_index = thresh, min_kept, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        # a label outside 0..C-1 raises here, as in plain cross-entropy, rather than dropping out
        pixel = nn.functional.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")[valid]
        if pixel.numel() == 0:
            return logits.sum() * 0
        hard = pixel > -float(np.log(self.thresh))  # p(true class) < thresh
        n_min = max(1, math.ceil(self.min_kept * pixel.numel() - 1e-9))
        if int(hard.sum()) >= n_min:
            return pixel[hard].mean()
        return pixel.topk(n_min).values.mean()


class IgnoreAlso(nn.Module):
    """``loss`` (which leaves out IGNORE, 255) with the pixels labelled ``label`` left out too:
    they are relabelled IGNORE first. So an --ignore-index below 255 never turns the data's 255
    (ignored class-file rows, void, crop padding) into a target."""

    def __init__(self, loss: nn.Module, label: int):
        super().__init__()
        self.loss, self.label = loss, label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target.masked_fill(target == self.label, IGNORE))


def ignoring_void(loss_func: Callable) -> Callable:
    """``loss_func`` leaving out IGNORE pixels, as every loss here does: a torch cross-entropy or
    NLL loss with another ``ignore_index`` (torch's default -100 included, which no 8-bit mask
    holds) becomes the same loss ignoring IGNORE, and its own label too where a mask can hold it.
    Any other loss is returned as it is."""
    if type(loss_func) not in (nn.CrossEntropyLoss, nn.NLLLoss) or loss_func.ignore_index == IGNORE:
        return loss_func
    own = loss_func.ignore_index
    if type(loss_func) is nn.CrossEntropyLoss:
        fixed = nn.CrossEntropyLoss(weight=loss_func.weight, ignore_index=IGNORE, reduction=loss_func.reduction,
                                    label_smoothing=loss_func.label_smoothing)
    else:
        fixed = nn.NLLLoss(weight=loss_func.weight, ignore_index=IGNORE, reduction=loss_func.reduction)
    return IgnoreAlso(fixed, own) if 0 <= own < IGNORE else fixed


def class_weights(dataset, num_classes: int | None = None, cache_dir: str | os.PathLike | None = None
                  ) -> torch.Tensor:
    """Per-class loss weights 1/ln(1.02 + p) (ENet) from the split's pixel frequencies p
    (:func:`class_pixel_counts`). ``num_classes`` defaults to the dataset's class set."""
    counts = class_pixel_counts(dataset, num_classes, cache_dir)
    p = counts / counts.sum()
    return (1.0 / torch.log(1.02 + p)).float()


def class_pixel_counts(dataset, num_classes: int | None = None, cache_dir: str | os.PathLike | None = None
                       ) -> torch.Tensor:
    """Pixels of each class in the split's masks (float64), counted once and cached as JSON beside
    the dataset cache. ``num_classes`` defaults to the dataset's class set (the drone dataset's 23)."""
    classes = getattr(dataset, "classes", None)
    num_classes = num_classes or (classes.num_classes if classes is not None else NUM_CLASSES)
    # each mask's identity (size, mtime) is in the key: a changed mask means new counts
    ident = [[str(m), m.stat().st_size, m.stat().st_mtime_ns] for _, m in dataset.pairs]
    # and the class mapping: the same masks read through reordered rows (or another class file of
    # the same length) count other ids
    mapping = None if classes is None else [list(classes.row_names), [list(c) for c in classes.row_colors],
                                            [bool(i) for i in classes.row_ignored]]
    size = [list(dataset.size), list(getattr(dataset, "mask_size", dataset.size))]
    # and the cache format: a change in how masks are decoded (its version) means other ids
    key = hashlib.sha1(json.dumps([ident, size, num_classes, mapping, CACHE_FORMAT_VERSION]).encode())
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
    return counts


def make_loss(name: str = "ce", weight: torch.Tensor | None = None, ignore_index: int = 255) -> nn.Module:
    """'ce' (cross-entropy), 'wce' (class-weighted, pass ``weight``), 'ce+dice', 'lovasz',
    'ce+lovasz' (cross-entropy plus Lovasz-softmax, 1:1), 'ohem' (cross-entropy over the pixels
    whose true class has p < 0.7, at least 10 % of them: :class:`OhemCELoss`)."""
    if ignore_index != IGNORE:  # the data's 255 stays ignored: this label is left out in addition
        if not 0 <= ignore_index < IGNORE:
            raise InputError(f"--ignore-index {ignore_index}: give a label 0..{IGNORE} ({IGNORE}, the default, leaves "
                             "out only the data's ignored pixels; a class id leaves that class out too)")
        return IgnoreAlso(make_loss(name, weight), ignore_index)
    if name == "ce":
        return nn.CrossEntropyLoss(ignore_index=ignore_index)
    if name == "wce":
        if weight is None:
            raise ValueError("loss 'wce' needs class weights (train.class_weights)")
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "ce+dice":
        return DiceCELoss(weight, ignore_index)
    if name == "lovasz":
        return LovaszLoss(ignore_index)
    if name == "ce+lovasz":
        return LovaszLoss(ignore_index, ce_weight=1.0, weight=weight)
    if name == "ohem":
        if weight is not None:
            raise ValueError("loss 'ohem' is unweighted: it picks the hard pixels instead of weighting classes")
        return OhemCELoss(ignore_index=ignore_index)
    raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")

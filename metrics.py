"""Metrics: the blog's ``pixel_accuracy`` and one confusion-matrix engine that feeds every other number.

Conventions (stated once, used everywhere):
  * rows of the matrix are ground truth, columns predictions;
  * mIoU is dataset-level: IoU per class from the matrix accumulated over all images, then the
    mean over classes. A class absent from both ground truth and predictions has IoU nan and is
    left out of the mean; a class only predicted (never in the ground truth) counts with IoU 0;
  * mean class accuracy averages recall over classes present in the ground truth;
  * pixels whose ground truth equals ``ignore_index`` are not counted anywhere.
"""
from __future__ import annotations

import math

import torch

from basics import CLASS_NAMES, NUM_CLASSES
from layout import IGNORE

__all__ = ["pixel_accuracy", "to_labels", "ConfusionMatrix", "bootstrap_ci"]


def to_labels(output: torch.Tensor) -> torch.Tensor:
    """Logits/scores N×C×H×W → labels N×H×W; labels pass through unchanged."""
    if output.is_floating_point() and output.dim() == 4:
        return output.argmax(dim=1)
    return output


def pixel_accuracy(output: torch.Tensor, mask: torch.Tensor, ignore_index: int | None = None) -> float:
    """Fraction of pixels predicted right, as in the blog (``output`` logits N×C×H×W or labels).

    Like :class:`ConfusionMatrix`, pixels whose label is not a class (e.g. crop padding, 255)
    are not counted, nor those equal to ``ignore_index``. Labels say nothing of the class
    count, so there every label below 255 (``layout.IGNORE``) is a class."""
    with torch.no_grad():
        n = output.shape[1] if output.is_floating_point() and output.dim() == 4 else IGNORE
        pred = to_labels(output)
        if pred.shape != mask.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match mask {tuple(mask.shape)}")
        valid = (mask >= 0) & (mask < n)
        if ignore_index is not None:
            valid &= mask != ignore_index
        total = int(valid.sum())
        return float(((pred == mask) & valid).sum()) / total if total else float("nan")


class ConfusionMatrix:
    """num_classes × num_classes counts accumulated over batches with ``torch.bincount``.

    Works on any device (the matrix lives where the first batch does). ``update`` takes logits
    N×C×H×W or labels, plus the mask; ``compute`` returns every metric as plain Python numbers.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int | None = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat: torch.Tensor | None = None

    def reset(self) -> None:
        self.mat = None

    def update(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns that batch's own matrix (handy for per-image scores)."""
        n = self.num_classes
        pred, target = to_labels(output).reshape(-1), mask.reshape(-1)
        keep = (target >= 0) & (target < n)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        idx = target[keep].to(torch.int64) * n + pred[keep].to(torch.int64)
        batch = torch.bincount(idx, minlength=n * n).reshape(n, n)
        self.mat = batch.clone() if self.mat is None else self.mat + batch.to(self.mat.device)
        return batch

    @staticmethod
    def metrics_of(mat: torch.Tensor, class_names=CLASS_NAMES, ignore_index: int | None = None,
                   confusions: bool = True) -> dict:
        """Every metric of a confusion matrix (rows truth, columns prediction). A class equal to
        ``ignore_index`` gets IoU and accuracy nan and is in no mean, even where predicted."""
        h = mat.double().cpu()
        tp, gt, pr, total = h.diag(), h.sum(1), h.sum(0), h.sum()
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        if ignore_index is not None and 0 <= ignore_index < len(tp):
            iou[ignore_index] = recall[ignore_index] = math.nan
            gt = gt.clone()
            gt[ignore_index] = 0
        freq = gt / total if total > 0 else torch.zeros_like(gt)
        present = ~torch.isnan(iou)
        names = list(class_names)[:len(tp)] + [str(i) for i in range(len(class_names), len(tp))]
        # what each confusion costs: the mIoU gained were those n pixels of class i predicted i
        # instead of j (exactly: IoU_i gains n/U_i; j loses n false positives, and leaves the mean
        # when they were all it had)
        n_mean = int(present.sum())
        total_iou = float(iou[present].sum()) if n_mean else 0.0
        pairs = []
        off_diagonal = (h - torch.diag(h.diag())).nonzero().tolist() if confusions else []  # (bootstraps skip it)
        for i, j in off_diagonal:
            if torch.isnan(iou[i]) or torch.isnan(iou[j]):
                continue
            n = h[i, j]
            rest = total_iou - float(iou[i]) - float(iou[j]) + float((tp[i] + n) / union[i])
            after = (rest + float(tp[j] / (union[j] - n)), n_mean) if union[j] > n else (rest, n_mean - 1)
            pairs.append((after[0] / after[1] - total_iou / n_mean, i, j, int(n)))
        pairs.sort(reverse=True)
        return {
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_class_accuracy": float(recall[gt > 0].mean()) if (gt > 0).any() else math.nan,
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "fwiou": float((freq[gt > 0] * iou[gt > 0]).sum()) if total > 0 else math.nan,
            "per_class_iou": {n: float(v) for n, v in zip(names, iou)},
            "per_class_accuracy": {n: float(v) for n, v in zip(names, recall)},
            "classes_present": int(present.sum()),
            "pixels": int(total),
            "per_class_pixels": {n: int(v) for n, v in zip(names, h.sum(1))},
            "top_confusions": [{"truth": names[i], "predicted": names[j], "pixels": n,
                                "share_of_truth": n / float(h[i].sum()), "miou_cost": cost}
                               for cost, i, j, n in pairs[:10]],
        }

    def compute(self, class_names=CLASS_NAMES) -> dict:
        """Metrics of everything accumulated so far (see the module docstring for conventions)."""
        mat = self.mat if self.mat is not None else torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self.metrics_of(mat, class_names, self.ignore_index)


def bootstrap_ci(per_image: torch.Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 ignore_index: int | None = None, baseline: torch.Tensor | None = None) -> dict:
    """Percentile bootstrap over images of pixel accuracy and (dataset-level) mIoU.

    ``per_image`` is K×C×C, one confusion matrix per image; each resample draws K images with
    replacement, sums their matrices and recomputes the metrics (as
    :meth:`ConfusionMatrix.metrics_of` does; the mean IoU summed in another order, so equal to
    within the last bit). Returns [low, high] for each.

    ``baseline``: the same images' matrices under another model or setting (K×C×C); adds
    ``miou_difference``, the interval of mIoU minus the baseline's mIoU over the same resamples
    (a paired comparison: far narrower than two separate intervals where both vary together).
    """
    g = torch.Generator().manual_seed(seed)
    mats = per_image.double().cpu()
    k, c = mats.shape[0], mats.shape[-1]
    idx = torch.randint(k, (n_boot, k), generator=g)
    # all resamples at once (a Python loop over 1000 resamples took seconds per report): how often
    # each image is drawn, times its matrix; integer sums, so exactly the matrices a loop would sum
    counts = torch.zeros(n_boot, k, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, k, dtype=torch.float64))

    def resampled(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = (counts @ m.reshape(k, c * c)).reshape(n_boot, c, c)
        tp, total = sums.diagonal(dim1=1, dim2=2), sums.sum((1, 2))
        union = sums.sum(2) + sums.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        if ignore_index is not None and 0 <= ignore_index < c:
            iou[:, ignore_index] = math.nan  # as ConfusionMatrix.metrics_of: in no mean
        pa = torch.where(total > 0, tp.sum(1) / total.clamp(min=1), torch.full_like(total, math.nan))
        return pa, iou.nanmean(1)

    pa, miou = resampled(mats)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    out = {"pixel_accuracy": torch.quantile(pa, q).tolist(), "miou": torch.quantile(miou, q).tolist(), "n_boot": n_boot,
           "level": level}
    if baseline is not None:
        base = baseline.double().cpu()
        if base.shape != mats.shape:
            raise ValueError(f"baseline matrices {tuple(base.shape)} differ from the images' {tuple(mats.shape)}")
        out["miou_difference"] = torch.quantile(miou - resampled(base)[1], q).tolist()
    return out

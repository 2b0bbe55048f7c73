"""Evaluation: inference (batched, resized, tile by tile, with test-time augmentation), labels at
full size (``upsample_labels``), scoring through the one confusion matrix, the blog's
``ModelEvaluation`` and the report a run writes.

Not here: the figures themselves (figures.py) and
the metric definitions (metrics.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from basics import CLASS_COLORS, CLASS_NAMES, InputError, write_json
from basics import device as default_device
from distributed import Shard, all_reduce_sum, gather_objects, is_distributed, is_main
from figures import plot_class_iou, plot_confusion, plot_history, qualitative_figure
from metrics import ConfusionMatrix, bootstrap_ci, pixel_accuracy
from transforms import prepare_batch

__all__ = ["ModelEvaluation", "eval_mode", "evaluate_loader", "predict_logits", "resize_predictor", "sliding_window_logits",
           "sliding_predictor", "TTA", "upsample_labels", "labels_at", "dataset_classes", "iou_table", "write_report"]


class eval_mode:
    """Put a model in eval mode and give it back in the mode it had."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def predict_logits(model: nn.Module, x: torch.Tensor, amp: bool = False,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Float32 logits of a normalised batch; upsampled bilinearly to out_size=(H, W) when given."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp and x.device.type == "cuda"):
        out = model(x)
    if isinstance(out, dict):  # torchvision segmentation models
        out = out["out"]
    out = out.float()
    if out_size is not None and tuple(out.shape[-2:]) != tuple(out_size):
        out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
    return out


def resize_predictor(size: tuple[int, int], amp: bool = False, tile: tuple[int, int] | None = None,
                     overlap: float = 0.25, upsample: bool = True) -> Callable:
    """Predict at size=(W, H) whatever the input size: lets a model trained at 600×400 be scored
    against 1500×1000 (or full-size) masks. With ``tile`` the model runs tile by tile over the
    photo at ``size`` (its training scale), not over the larger input. ``upsample=False`` returns
    the logits at ``size``: :func:`evaluate_loader` and :class:`ModelEvaluation` then turn them
    into labels at the mask's size with :func:`upsample_labels` (same labels, strip by strip,
    without full-size logits in memory); True returns logits at the mask's size."""
    def predict(model: nn.Module, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (size[1], size[0]):
            x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
        out = predict_logits(model, x, amp) if tile is None else sliding_window_logits(model, x, tile, overlap, amp)
        if upsample and tuple(out.shape[-2:]) != tuple(out_size):
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
        return out
    return predict


class TTA(nn.Module):
    """Test-time augmentation: runs ``model`` on the 8 flips and 90° turns of the batch (nadir
    photos have no "up"), turns each prediction back and averages the logits. Wraps the model,
    so it composes with resized and sliding-window inference; costs 8 forward passes per scale.

    ``scales`` (e.g. (0.75, 1.0, 1.25)) also runs the views on the batch resized by each factor
    (bilinear, antialiased when shrinking) and brings their logits back to the input's size
    exactly before averaging; the default (1.0,) is the 8 views alone."""

    def __init__(self, model: nn.Module, scales: tuple[float, ...] = (1.0,)):
        super().__init__()
        if not scales or any(not s > 0 for s in scales):
            raise InputError(f"TTA scales {scales}: give one or more factors > 0, e.g. 0.75,1,1.25")
        self.model, self.scales = model, tuple(float(s) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        total = None
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                                         antialias=s < 1)
            for k in range(4):
                for flip in (False, True):
                    xi = torch.rot90(xs, k, (2, 3))
                    out = self.model(xi.flip(3) if flip else xi)
                    if isinstance(out, dict):
                        out = out["out"]
                    out = torch.rot90(out.flip(3) if flip else out, -k, (2, 3)).float()
                    if tuple(out.shape[-2:]) != (h, w):
                        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
                    total = out if total is None else total + out
        return total / (8 * len(self.scales))


def _window(h: int, w: int, device) -> torch.Tensor:
    """Blending weights of one tile: high in the middle, low but non-zero at the borders."""
    wy = torch.hann_window(h + 2, periodic=False, device=device)[1:-1]
    wx = torch.hann_window(w + 2, periodic=False, device=device)[1:-1]
    return (wy[:, None] * wx[None, :]).clamp(min=1e-3)


def sliding_window_logits(model: nn.Module, x: torch.Tensor, tile: tuple[int, int] = (512, 512),
                          overlap: float = 0.25, amp: bool = False, tile_batch: int = 4) -> torch.Tensor:
    """Logits of a whole N×3×H×W batch predicted tile by tile (tile=(W, H), overlapping by
    ``overlap``), blended with a smooth window, so any photo size fits in memory. Equals
    whole-image inference when one tile covers the image."""
    n, _, h, w = x.shape
    tw, th = min(tile[0], w), min(tile[1], h)
    if (th, tw) == (h, w):
        return predict_logits(model, x, amp)
    sy, sx = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    ys = sorted({*range(0, h - th, sy), h - th})
    xs = sorted({*range(0, w - tw, sx), w - tw})
    weight = _window(th, tw, x.device)
    out = norm = None
    boxes = [(y0, x0) for y0 in ys for x0 in xs]
    for b in range(0, len(boxes), tile_batch):
        chunk = boxes[b:b + tile_batch]
        tiles = torch.cat([x[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])
        logits = predict_logits(model, tiles, amp)
        if out is None:
            out = torch.zeros(n, logits.shape[1], h, w, device=x.device)
            norm = torch.zeros(1, 1, h, w, device=x.device)
        for j, (y0, x0) in enumerate(chunk):
            out[:, :, y0:y0 + th, x0:x0 + tw] += logits[j * n:(j + 1) * n] * weight
            norm[:, :, y0:y0 + th, x0:x0 + tw] += weight
    return out / norm


def sliding_predictor(tile: tuple[int, int], overlap: float = 0.25, amp: bool = False,
                      upsample: bool = True) -> Callable:
    """A ``predict`` for :func:`evaluate_loader` that runs :func:`sliding_window_logits`
    (``upsample`` as in :func:`resize_predictor`)."""
    def predict(model: nn.Module, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        out = sliding_window_logits(model, x, tile, overlap, amp)
        if upsample and tuple(out.shape[-2:]) != tuple(out_size):
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
        return out
    return predict


def labels_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels N×H×W (int64) of N×C×h×w logits at size=(H, W): the argmax, through
    :func:`upsample_labels` when the logits are smaller or larger than ``size``."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.argmax(1)
    return torch.stack([upsample_labels(o, size) for o in logits]).long()


def _source_coords(n_out: int, n_in: int, device) -> torch.Tensor:
    """Where each output pixel samples its input along one axis, exactly as F.interpolate
    (bilinear, align_corners=False) computes it: float32, clamped at 0."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    return (scale * (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) - 0.5).clamp(min=0)


def upsample_labels(logits: torch.Tensor, size: tuple[int, int], strip: int = 128) -> torch.Tensor:
    """Labels H×W (uint8) of C×h×w logits resized bilinearly to size=(H, W): the argmax of
    ``F.interpolate(logits, size, mode="bilinear")`` at a fraction of its cost, never holding
    more than a strip of rows. Ties follow argmax's rule: an exact tie goes to the lower class id
    (bf16 logits and ReLU zeros tie often). The two can differ only at a pixel where two classes'
    interpolated scores are within float rounding of each other (they round differently there).

    Why it is cheap: a bilinear value is a convex combination of its neighbours, so where the
    neighbours share a winner, it wins. Down a column, an output row lies between two logit
    rows: where both have the same winner that is the row's label, else all classes are
    interpolated there. Along a row, an output pixel lies between two logit columns, where every
    class score is linear in the position: a segment whose ends agree is uniform; one whose ends
    differ (p, q) is p up to the crossing point and q after it, unless a third class beats both
    at the crossing, the only place it can, and then that segment is computed in full.
    """
    c, h, w = logits.shape
    big_h, big_w = size
    dev = logits.device
    x = logits.float()
    if w == 1:
        x, w = torch.cat([x, x], 2), 2
    x = x.permute(1, 2, 0).contiguous()  # h×w×C: each pixel's scores side by side
    lab = x.argmax(-1)  # h×w: winner at every logit pixel
    ys = _source_coords(big_h, h, dev)
    y0 = ys.long().clamp(max=h - 1)
    y1, wy = (y0 + 1).clamp(max=h - 1), ys - y0
    xs = _source_coords(big_w, w, dev)
    seg = xs.long().clamp(max=w - 2)  # the segment [j, j+1] each output column lies in
    tx = (xs - seg).clamp(max=1.0)  # its position in the segment (1 at the clamped right edge)
    pos = seg.double() + tx.double()  # increasing along the row; double keeps 1e-7 resolution
    n_seg = torch.bincount(seg, minlength=w - 1)  # output pixels per segment
    first = torch.searchsorted(pos, torch.arange(w - 1, dtype=torch.float64, device=dev))
    out = torch.empty(big_h, big_w, dtype=torch.uint8, device=dev)

    def scores(r: torch.Tensor, j: torch.Tensor) -> torch.Tensor:  # n×C: all classes at output rows r, logit columns j
        return torch.lerp(x[y0[r], j], x[y1[r], j], wy[r][:, None])

    for r0 in range(0, big_h, strip):
        r1 = min(big_h, r0 + strip)
        l0, l1 = lab[y0[r0:r1]], lab[y1[r0:r1]]  # S×w
        L = l0.clone()
        rv, jv = (l0 != l1).nonzero(as_tuple=True)  # the two rows disagree: score every class
        if len(rv):
            L[rv, jv] = scores(rv + r0, jv).argmax(-1)
        p, q = L[:, :-1], L[:, 1:]
        n_p = n_seg.expand(r1 - r0, -1).clone()  # pixels per segment that p wins; q gets the rest
        rr, jj = (p != q).nonzero(as_tuple=True)
        if len(rr):
            a, b = scores(rr + r0, jj), scores(rr + r0, jj + 1)
            pi, qi = p[rr, jj][:, None], q[rr, jj][:, None]
            d0 = (a.gather(1, pi) - a.gather(1, qi))[:, 0]
            d1 = (b.gather(1, pi) - b.gather(1, qi))[:, 0]
            den = d0 - d1
            tc = torch.where(den > 0, d0 / den.clamp(min=1e-30), torch.zeros_like(d0))
            # pixels up to the crossing go to p; one exactly on it goes to the lower class id (the
            # tie rule of argmax), and none may spill into the next segment: a tie at a segment's
            # end puts the crossing on the first pixel of the next one when the ratio is odd
            cross = jj.double() + tc.double()
            upto = torch.where(pi[:, 0] < qi[:, 0], torch.searchsorted(pos, cross, right=True),
                               torch.searchsorted(pos, cross, right=False)) - first[jj]
            n_p[rr, jj] = torch.minimum(upto.clamp(min=0), n_seg[jj])
            mid = torch.lerp(a, b, tc[:, None])
            env = mid.gather(1, pi)[:, 0]
            bad = mid.max(-1).values > env + 1e-5 * env.abs().clamp(min=1)
        counts = torch.stack([n_p, n_seg - n_p], -1).reshape(-1)
        res = torch.stack([p, q], -1).reshape(-1).to(torch.uint8).repeat_interleave(counts).view(r1 - r0, big_w)
        if len(rr) and bool(bad.any()):  # a third class above p and q at the crossing
            br, bj = rr[bad], jj[bad]
            n = n_seg[bj]
            pr = br.repeat_interleave(n)
            offset = torch.arange(int(n.sum()), device=dev) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
            pc = first[bj].repeat_interleave(n) + offset
            j = seg[pc]
            full = torch.lerp(scores(pr + r0, j), scores(pr + r0, j + 1), tx[pc][:, None])
            res[pr, pc] = full.argmax(-1).to(torch.uint8)
        out[r0:r1] = res
    return out


def evaluate_loader(model: nn.Module, loader, device: torch.device | str | None = None, *,
                    loss_func: Callable | None = None, num_classes: int | None = None,
                    ignore_index: int | None = None, amp: bool = True, progress: bool = False,
                    predict: Callable | None = None, class_names=None) -> dict:
    """Run ``model`` over ``loader`` under inference mode and score it.

    Returns ``metrics`` (from the accumulated confusion matrix), ``loss`` (batch-size weighted
    mean, nan without ``loss_func``), ``per_image`` pixel accuracies, the ``confusion`` matrix and
    ``per_image_confusion`` (K×C×C, for bootstrap intervals).
    Masks may be larger than the model's input: labels come from :func:`upsample_labels`.
    ``predict(model, x, out_size)``, if given, replaces plain inference (e.g. sliding windows).
    ``class_names`` name the metrics' classes (default the loader's dataset's class set, else
    the drone classes).
    Under torchrun, a loader over a :class:`distributed.Shard` (``make_loader(shuffle=False)``)
    evaluates this rank's share; the matrices, losses and per-image results of all ranks are
    then summed and gathered, so every rank returns the numbers of the whole split.
    """
    device = torch.device(device) if device is not None else default_device
    names, _ = dataset_classes(getattr(loader, "dataset", None))
    class_names = list(class_names) if class_names is not None else names
    num_classes = num_classes or len(class_names)
    cm = ConfusionMatrix(num_classes, ignore_index)
    per_image, per_cm, loss_sum, seen = [], [], 0.0, 0
    model.to(device)
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc="evaluating", leave=False, disable=not progress):
            x, y = prepare_batch(batch, device)
            size = tuple(y.shape[-2:])
            out = predict(model, x, size) if predict is not None else predict_logits(model, x, amp)
            if loss_func is not None:
                full = out if tuple(out.shape[-2:]) == size else F.interpolate(
                    out, size=size, mode="bilinear", align_corners=False)
                loss_sum += float(loss_func(full, y)) * x.shape[0]
            seen += x.shape[0]
            pred = labels_at(out, size)
            for i in range(pred.shape[0]):
                per_cm.append(cm.update(pred[i], y[i]).cpu())
                per_image.append(ConfusionMatrix.metrics_of(per_cm[-1], confusions=False)["pixel_accuracy"])
    shard = getattr(loader, "dataset", None)
    if isinstance(shard, Shard) and shard.world > 1:  # under torchrun: add up every rank's share
        if cm.mat is None:
            cm.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        all_reduce_sum(cm.mat)
        totals = all_reduce_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=cm.mat.device))
        loss_sum, seen = float(totals[0]), int(totals[1])
        per_image, per_cm = _in_dataset_order(gather_objects((per_image, per_cm)), shard.world)
    return {"metrics": cm.compute(class_names), "loss": loss_sum / seen if loss_func is not None and seen else float("nan"),
            "per_image": per_image, "confusion": cm.mat.cpu() if cm.mat is not None else None,
            "per_image_confusion": torch.stack(per_cm) if per_cm else None}


def dataset_classes(dataset) -> tuple[list[str], list[tuple[int, int, int]]]:
    """(names, colours) of a dataset's classes: its ``classes`` (a layout.ClassSet), looked for
    through Shard/Subset wrappers; the drone classes when it has none."""
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return list(CLASS_NAMES), list(CLASS_COLORS)
    return list(classes.names), list(classes.colors)


def _in_dataset_order(parts: list, world: int) -> tuple[list, list]:
    """Per-image results of every rank's Shard (rank r holds items r, r + W, …) back in the
    order of the whole split."""
    n = sum(len(images) for images, _ in parts)
    per_image, per_cm = [None] * n, [None] * n
    for r, (images, mats) in enumerate(parts):
        for i, (score, mat) in enumerate(zip(images, mats)):
            per_image[r + i * world], per_cm[r + i * world] = score, mat
    return per_image, per_cm


def iou_table(metrics: dict) -> str:
    """Per-class IoU, accuracy and share of the ground-truth pixels as an aligned text table (nan:
    class absent from truth and prediction), then the confusions that cost the most mIoU."""
    pixels = metrics.get("per_class_pixels", {})
    total = max(sum(pixels.values()), 1)
    rows = [f"{'class':<12} {'IoU':>7} {'acc':>7} {'pixels':>8}"]
    for name, v in metrics["per_class_iou"].items():
        acc = metrics["per_class_accuracy"].get(name, float("nan"))
        share = f"{100 * pixels[name] / total:7.2f}%" if name in pixels else ""
        rows.append(f"{name:<12} {v:7.4f} {acc:7.4f} {share}")
    rows.append(f"{'mIoU':<12} {metrics['miou']:7.4f}   ({metrics['classes_present']} classes present)")
    costly = metrics.get("top_confusions", [])[:5]
    if costly:
        rows.append("costliest confusions (truth -> predicted: share of the truth's pixels, mIoU it costs):")
        rows += [f"  {c['truth']} -> {c['predicted']}: {100 * c['share_of_truth']:.1f} %, "
                 f"{100 * c['miou_cost']:.2f} points" for c in costly]
    return "\n".join(rows)


class ModelEvaluation:
    """The blog's evaluation object: ``evaluate_single``, ``evaluate_all``, ``show_qualitative``.

    ``metric(output, mask)`` scores one image (default: pixel accuracy); ``evaluate_all`` also
    fills ``self.metrics`` from the confusion matrix (mIoU, per-class IoU, …) and
    ``self.per_image_confusion``. ``predict(model, x, out_size)`` replaces plain inference
    (see :func:`resize_predictor`, :func:`sliding_predictor`). Pixels labelled ``ignore_index``
    count nowhere (nor does that class in mIoU); ``amp`` is bf16 autocast on CUDA; ``tta``
    averages the 8 flips and turns (:class:`TTA`; a sequence of scales, e.g. (0.75, 1, 1.25), also
    at each scale). ``evaluate_single`` and ``evaluate_all`` share
    one inference path, so they give the same per-image scores. Where the model's output is
    smaller than the mask, labels come from :func:`upsample_labels` and ``metric`` gets labels.
    """

    def __init__(self, model: nn.Module, test_dataset, metric: Callable = pixel_accuracy,
                 device: torch.device | str | None = None, batch_size: int = 4, num_workers: int = 0,
                 num_classes: int | None = None, predict: Callable | None = None, *,
                 ignore_index: int | None = None, amp: bool = True, tta: bool | Sequence[float] = False):
        self.model, self.tta = model, tta  # .model stays the model given; tta wraps it at inference
        self.dataset, self.metric, self.predict = test_dataset, metric, predict
        self.ignore_index, self.amp = ignore_index, amp
        self.device = torch.device(device) if device is not None else default_device
        # the class set is the dataset's (names, colours, count), the drone classes by default
        self.class_names, self.class_colors = dataset_classes(test_dataset)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_classes = num_classes if num_classes is not None else len(self.class_names)
        self.scores: list[float] | None = None
        self.metrics: dict | None = None
        self.confusion: torch.Tensor | None = None
        self.per_image_confusion: torch.Tensor | None = None

    def _net(self) -> nn.Module:
        """What inference runs: the model, or the model under test-time augmentation."""
        if not self.tta:
            return self.model
        return TTA(self.model) if self.tta is True else TTA(self.model, tuple(self.tta))

    def _infer(self, model: nn.Module, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """The one inference path of evaluate_single and evaluate_all."""
        if self.predict is not None:
            return self.predict(model, x, out_size)
        return predict_logits(model, x, self.amp)

    def evaluate_single(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Predict one photo (3×H×W, normalised float or uint8); returns (pred mask H×W, score)."""
        self.model.to(self.device)
        with eval_mode(self.model), torch.inference_mode():
            x, y = prepare_batch((image.unsqueeze(0), mask.unsqueeze(0)), self.device)
            size = tuple(y.shape[-2:])
            out = self._infer(self._net(), x, size)
            pred = labels_at(out, size)
            if self.ignore_index is not None:  # a label outside the classes is counted by no metric
                y = y.masked_fill(y == self.ignore_index, 255)
            score = float(self.metric(out if tuple(out.shape[-2:]) == size else pred, y))
        return pred[0].cpu(), score

    def evaluate_all(self, progress: bool = True) -> list[float]:
        """Score every image; prints the mean of per-image scores (the blog's number) and mIoU.
        Under torchrun every rank must call it: each scores its share, the results are summed."""
        data = Shard(self.dataset) if is_distributed() else self.dataset
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        res = evaluate_loader(self._net(), loader, self.device, num_classes=self.num_classes,
                              progress=progress and is_main(),
                              predict=self._infer, ignore_index=self.ignore_index, class_names=self.class_names)
        self.scores = res["per_image"] if self.metric is pixel_accuracy else [
            self.evaluate_single(*self.dataset[i])[1] for i in range(len(self.dataset))]
        self.metrics, self.confusion = res["metrics"], res["confusion"]
        self.per_image_confusion = res["per_image_confusion"]
        if is_main():
            print(f"mean per-image score over {len(self.scores)} images: {np.mean(self.scores):.4f} | "
                  f"pixel accuracy {self.metrics['pixel_accuracy']:.4f} | mIoU {self.metrics['miou']:.4f}")
        return self.scores

    def show_qualitative(self, ind: int | list[int], save_path: str | os.PathLike | None = None):
        """Photo, ground truth and prediction of image ``ind`` (or a grid, one row per index in
        a list) in the class colours with a legend and the score; returns the Figure."""
        inds = [ind] if isinstance(ind, int) else list(ind)
        n = len(self.dataset)
        outside = [i for i in inds if not 0 <= i < n]
        if outside:
            raise InputError(f"show_qualitative({ind}): the dataset has {n} images, so an index is 0 to {n - 1} "
                             f"({', '.join(map(str, outside))} is not)")
        label = getattr(self.dataset, "ids", None)
        rows = []
        for i in inds:
            image, mask = self.dataset[i]
            pred, score = self.evaluate_single(image, mask)
            rows.append((image, mask, pred, score, label[i] if label else i))
        return qualitative_figure(rows, getattr(self.metric, "__name__", "score"),
                                  title_index=ind if isinstance(ind, int) else None, save_path=save_path,
                                  class_names=self.class_names, class_colors=self.class_colors)


def write_report(out: str | os.PathLike, evaluation: "ModelEvaluation", history: dict | None = None,
                 extra: dict | None = None, n_grid: int = 4, n_boot: int = 1000,
                 t_start: float | None = None) -> dict:
    """Evaluate and write the run's report to ``out``: metrics.json (pixel accuracy, mean per-image
    pixel accuracy, mean class accuracy, dataset-level mIoU, per-class IoU, fwIoU, 95 % bootstrap
    intervals over images, per-image scores, plus ``extra``), history.json and curves.png,
    qualitative.png (the blog's image 8, or the first), qualitative_grid.png, confusion.png and
    class_iou.png. With ``t_start`` (a ``time.perf_counter()`` reading) metrics.json also gets
    ``wall_time_s``, measured once everything else is written. Returns the metrics dict."""
    out = Path(out)
    scores = evaluation.scores if evaluation.scores is not None else evaluation.evaluate_all()
    m = evaluation.metrics
    print(iou_table(m))
    ds = evaluation.dataset
    ids = getattr(ds, "ids", [str(i) for i in range(len(ds))])
    report = {"mean_pixel_accuracy": float(np.mean(scores)), "pixel_accuracy": m["pixel_accuracy"],
              "miou": m["miou"], "mean_class_accuracy": m["mean_class_accuracy"], "fwiou": m["fwiou"],
              "per_class_iou": m["per_class_iou"], "per_class_accuracy": m["per_class_accuracy"],
              "classes_present": m["classes_present"], "per_class_pixels": m["per_class_pixels"],
              "top_confusions": m["top_confusions"], "classes": list(evaluation.class_names),
              "class_colors": [list(c) for c in evaluation.class_colors],
              "bootstrap_95": bootstrap_ci(evaluation.per_image_confusion, n_boot,
                                                     ignore_index=getattr(evaluation, "ignore_index", None)),
              "per_image": dict(zip(ids, scores)), **(extra or {})}
    evaluation.show_qualitative(8 if len(ds) > 8 else 0, out / "qualitative.png")
    grid = np.linspace(0, len(ds) - 1, min(n_grid, len(ds))).round().astype(int).tolist()
    evaluation.show_qualitative(grid, out / "qualitative_grid.png")
    plot_confusion(evaluation.confusion, out / "confusion.png", evaluation.class_names)
    plot_class_iou(m, out / "class_iou.png", evaluation.class_colors)
    if history is not None:
        plot_history(history, out / "curves.png")
        write_json(out / "history.json", history)
    if t_start is not None:
        report["wall_time_s"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", report)
    return report

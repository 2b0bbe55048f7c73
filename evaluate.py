"""Evaluation: batched inference, the confusion-matrix metrics, per-image scores and figures."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from basics import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, write_json
from basics import device as default_device, mean as MEAN, std as STD
from datautils import prepare_batch
from metrics import ConfusionMatrix, bootstrap_ci, pixel_accuracy

__all__ = ["ModelEvaluation", "eval_mode", "evaluate_loader", "predict_logits", "resize_predictor", "sliding_window_logits",
           "sliding_predictor", "TTA", "upsample_labels", "labels_at", "colorize", "iou_table", "save_figure", "plot_history", "plot_confusion",
           "plot_class_iou", "write_report"]


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
    so it composes with resized and sliding-window inference; costs 8 forward passes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for k in range(4):
            for flip in (False, True):
                xi = torch.rot90(x, k, (2, 3))
                out = self.model(xi.flip(3) if flip else xi)
                if isinstance(out, dict):
                    out = out["out"]
                out = torch.rot90(out.flip(3) if flip else out, -k, (2, 3)).float()
                total = out if total is None else total + out
        return total / 8


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


def upsample_labels(logits: torch.Tensor, size: tuple[int, int], strip: int = 64) -> torch.Tensor:
    """Labels H×W (uint8) of C×h×w logits resized bilinearly to size=(H, W): the argmax of
    ``F.interpolate(logits, size, mode="bilinear")`` (up to near-ties within float error) at
    about the cost of interpolating one channel, and never holding more than a strip of rows.

    Why it is cheap: rows are interpolated at the logits' width (strip×w×C), then along a row
    each output pixel lies between two logit columns, where every class's score is linear in
    the position. If both ends have the same argmax, the whole segment has it (a convex
    combination keeps the winner); if they differ (p, q), p wins up to the crossing point and
    q after it, unless a third class beats both at the crossing, the only place it can: then
    that segment's pixels are computed in full over all classes (rare in real predictions).
    """
    c, h, w = logits.shape
    big_h, big_w = size
    dev = logits.device
    x = logits.float()
    if w == 1:  # one column: one segment of two equal ends
        x, w = torch.cat([x, x], 2), 2
    x = x.permute(1, 2, 0).contiguous()  # h×w×C: each pixel's scores side by side
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
    for r0 in range(0, big_h, strip):
        r1 = min(big_h, r0 + strip)
        rows = torch.lerp(x.index_select(0, y0[r0:r1]), x.index_select(0, y1[r0:r1]), wy[r0:r1].view(-1, 1, 1))
        top, lab = rows.max(-1)  # S×w: winner at every logit column
        p, q = lab[:, :-1], lab[:, 1:]
        left, right = rows[:, :-1], rows[:, 1:]
        p_right = right.gather(-1, p[..., None])[..., 0]
        d0 = top[:, :-1] - left.gather(-1, q[..., None])[..., 0]  # score of p minus q at the left end (>= 0)
        d1 = p_right - top[:, 1:]  # and at the right end (<= 0)
        den = d0 - d1
        cross = torch.where(den > 0, d0 / den.clamp(min=1e-30), torch.zeros_like(d0))
        # pixels per segment that p wins; the others go to q
        n_p = n_seg.expand(r1 - r0, -1).clone()
        rr, jj = (p != q).nonzero(as_tuple=True)
        tc = cross[rr, jj]
        n_p[rr, jj] = torch.searchsorted(pos, jj.double() + tc.double(), right=True) - first[jj]
        counts = torch.stack([n_p, n_seg - n_p], -1).reshape(-1)
        res = torch.stack([p, q], -1).reshape(-1).to(torch.uint8).repeat_interleave(counts).view(r1 - r0, big_w)
        # a third class above p and q at the crossing: compute those segments in full
        env = torch.lerp(top[rr, jj], p_right[rr, jj], tc)
        third = torch.lerp(rows[rr, jj], rows[rr, jj + 1], tc[:, None]).max(-1).values
        bad = third > env + 1e-5 * env.abs().clamp(min=1)
        if bool(bad.any()):
            br, bj = rr[bad], jj[bad]
            n = n_seg[bj]
            pr = br.repeat_interleave(n)
            offset = torch.arange(int(n.sum()), device=dev) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
            pc = first[bj].repeat_interleave(n) + offset
            j = seg[pc]
            full = torch.lerp(rows[pr, j], rows[pr, j + 1], tx[pc][:, None])
            res[pr, pc] = full.argmax(-1).to(torch.uint8)
        out[r0:r1] = res
    return out


def evaluate_loader(model: nn.Module, loader, device: torch.device | str | None = None, *,
                    loss_func: Callable | None = None, num_classes: int = NUM_CLASSES,
                    ignore_index: int | None = None, amp: bool = True, progress: bool = False,
                    predict: Callable | None = None) -> dict:
    """Run ``model`` over ``loader`` under inference mode and score it.

    Returns ``metrics`` (from the accumulated confusion matrix), ``loss`` (batch-size weighted
    mean, nan without ``loss_func``), ``per_image`` pixel accuracies, the ``confusion`` matrix and
    ``per_image_confusion`` (K×C×C, for bootstrap intervals).
    Masks may be larger than the model's input: labels come from :func:`upsample_labels`.
    ``predict(model, x, out_size)``, if given, replaces plain inference (e.g. sliding windows).
    """
    device = torch.device(device) if device is not None else default_device
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
                per_image.append(ConfusionMatrix.metrics_of(per_cm[-1])["pixel_accuracy"])
    return {"metrics": cm.compute(), "loss": loss_sum / seen if loss_func is not None and seen else float("nan"),
            "per_image": per_image, "confusion": cm.mat.cpu() if cm.mat is not None else None,
            "per_image_confusion": torch.stack(per_cm) if per_cm else None}


def colorize(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Class ids H×W → RGB uint8 H×W×3 in the dataset's colours."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.asarray(CLASS_COLORS, np.uint8)[np.clip(m, 0, len(CLASS_COLORS) - 1)]


def iou_table(metrics: dict) -> str:
    """Per-class IoU as an aligned text table (nan: class absent from truth and prediction)."""
    rows = [f"{'class':<12} {'IoU':>7} {'acc':>7}"]
    for name, v in metrics["per_class_iou"].items():
        acc = metrics["per_class_accuracy"].get(name, float("nan"))
        rows.append(f"{name:<12} {v:7.4f} {acc:7.4f}")
    rows.append(f"{'mIoU':<12} {metrics['miou']:7.4f}   ({metrics['classes_present']} classes present)")
    return "\n".join(rows)


def save_figure(fig, path: str | os.PathLike | None, dpi: int = 100):
    """Save a figure atomically when a path is given; return the figure either way."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    return fig


def _photo_for_display(image: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    img = image.detach().cpu()
    if img.dtype == torch.uint8:
        return img.permute(1, 2, 0).numpy()
    img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


class ModelEvaluation:
    """The blog's evaluation object: ``evaluate_single``, ``evaluate_all``, ``show_qualitative``.

    ``metric(output, mask)`` scores one image (default: pixel accuracy); ``evaluate_all`` also
    fills ``self.metrics`` from the confusion matrix (mIoU, per-class IoU, …) and
    ``self.per_image_confusion``. ``predict(model, x, out_size)`` replaces plain inference
    (see :func:`resize_predictor`, :func:`sliding_predictor`). Pixels labelled ``ignore_index``
    count nowhere (nor does that class in mIoU); ``amp`` is bf16 autocast on CUDA; ``tta``
    averages the 8 flips and turns (:class:`TTA`). ``evaluate_single`` and ``evaluate_all`` share
    one inference path, so they give the same per-image scores. Where the model's output is
    smaller than the mask, labels come from :func:`upsample_labels` and ``metric`` gets labels.
    """

    def __init__(self, model: nn.Module, test_dataset, metric: Callable = pixel_accuracy,
                 device: torch.device | str | None = None, batch_size: int = 4, num_workers: int = 0,
                 num_classes: int = NUM_CLASSES, predict: Callable | None = None, *,
                 ignore_index: int | None = None, amp: bool = True, tta: bool = False):
        self.model = TTA(model) if tta else model
        self.dataset, self.metric, self.predict = test_dataset, metric, predict
        self.ignore_index, self.amp = ignore_index, amp
        self.device = torch.device(device) if device is not None else default_device
        self.batch_size, self.num_workers, self.num_classes = batch_size, num_workers, num_classes
        self.scores: list[float] | None = None
        self.metrics: dict | None = None
        self.confusion: torch.Tensor | None = None
        self.per_image_confusion: torch.Tensor | None = None

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
            out = self._infer(self.model, x, size)
            pred = labels_at(out, size)
            if self.ignore_index is not None:  # a label outside the classes is counted by no metric
                y = y.masked_fill(y == self.ignore_index, 255)
            score = float(self.metric(out if tuple(out.shape[-2:]) == size else pred, y))
        return pred[0].cpu(), score

    def evaluate_all(self, progress: bool = True) -> list[float]:
        """Score every image; prints the mean of per-image scores (the blog's number) and mIoU."""
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        res = evaluate_loader(self.model, loader, self.device, num_classes=self.num_classes, progress=progress,
                              predict=self._infer, ignore_index=self.ignore_index)
        self.scores = res["per_image"] if self.metric is pixel_accuracy else [
            self.evaluate_single(*self.dataset[i])[1] for i in range(len(self.dataset))]
        self.metrics, self.confusion = res["metrics"], res["confusion"]
        self.per_image_confusion = res["per_image_confusion"]
        print(f"mean per-image score over {len(self.scores)} images: {np.mean(self.scores):.4f} | "
              f"pixel accuracy {self.metrics['pixel_accuracy']:.4f} | mIoU {self.metrics['miou']:.4f}")
        return self.scores

    def show_qualitative(self, ind: int | list[int], save_path: str | os.PathLike | None = None):
        """Photo, ground truth and prediction of image ``ind`` (or a grid, one row per index in
        a list) in the class colours with a legend and the score; returns the Figure."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        inds = [ind] if isinstance(ind, int) else list(ind)
        name = getattr(self.metric, "__name__", "score")
        fig = Figure(figsize=(16, 3.9 * len(inds) + 0.9))
        axes = np.asarray(fig.subplots(len(inds), 3)).reshape(len(inds), 3)
        present: set[int] = set()
        for row, i in zip(axes, inds):
            image, mask = self.dataset[i]
            pred, score = self.evaluate_single(image, mask)
            present |= set(torch.unique(mask).tolist()) | set(torch.unique(pred).tolist())
            label = getattr(self.dataset, "ids", None)
            panels = [(_photo_for_display(image), f"photo {label[i] if label else i}"),
                      (colorize(mask), "ground truth"), (colorize(pred), f"prediction ({name} {score:.3f})")]
            for ax, (img, title) in zip(row, panels):
                ax.imshow(img)
                ax.set_title(title)
                ax.axis("off")
        handles = [Patch(color=np.asarray(CLASS_COLORS[c]) / 255, label=CLASS_NAMES[c])
                   for c in sorted(present) if c < len(CLASS_NAMES)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
        if isinstance(ind, int):
            fig.suptitle(f"image {ind}: {name} {score:.4f}")
        fig.subplots_adjust(left=0.01, right=0.99, wspace=0.03, hspace=0.12,
                            bottom=0.8 / fig.get_figheight(), top=1 - 0.5 / fig.get_figheight())
        return save_figure(fig, save_path)


def plot_history(history: dict, save_path: str | os.PathLike | None = None):
    """Loss and accuracy per epoch (train, and val when present); returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = range(1, len(history["train_loss"]) + 1)
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_acc.plot(epochs, history["train_acc"], "o-", label="train pixel acc")
    if history.get("val_loss"):
        ax_loss.plot(epochs, history["val_loss"], "o-", label="val")
        ax_acc.plot(epochs, history["val_acc"], "o-", label="val pixel acc")
        ax_acc.plot(epochs, history["val_miou"], "s--", label="val mIoU")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, save_path)


def plot_confusion(confusion: torch.Tensor, save_path: str | os.PathLike | None = None, class_names=CLASS_NAMES):
    """Row-normalised confusion matrix (rows: ground truth) with class names; returns the Figure."""
    from matplotlib.figure import Figure

    m = confusion.double()
    m = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig = Figure(figsize=(11, 10))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names)[:m.shape[0]]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j] >= 0.05:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("confusion matrix, normalised per ground-truth class")
    return save_figure(fig, save_path)


def plot_class_iou(metrics: dict, save_path: str | os.PathLike | None = None):
    """Per-class IoU as a bar chart (absent classes marked); returns the Figure."""
    from matplotlib.figure import Figure

    names = list(metrics["per_class_iou"])
    vals = [metrics["per_class_iou"][n] for n in names]
    fig = Figure(figsize=(11, 4.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), [0 if v != v else v for v in vals],
           color=[np.asarray(CLASS_COLORS[i]) / 255 if i < len(CLASS_COLORS) else "grey" for i in range(len(names))],
           edgecolor="black", linewidth=0.5)
    for i, v in enumerate(vals):
        ax.text(i, (0 if v != v else v) + 0.01, "absent" if v != v else f"{v:.2f}", ha="center", fontsize=7,
                rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("IoU")
    ax.set_title(f"per-class IoU (dataset-level mIoU {metrics['miou']:.3f})")
    return save_figure(fig, save_path)


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
    scores = evaluation.evaluate_all()
    m = evaluation.metrics
    print(iou_table(m))
    ds = evaluation.dataset
    ids = getattr(ds, "ids", [str(i) for i in range(len(ds))])
    report = {"mean_pixel_accuracy": float(np.mean(scores)), "pixel_accuracy": m["pixel_accuracy"],
              "miou": m["miou"], "mean_class_accuracy": m["mean_class_accuracy"], "fwiou": m["fwiou"],
              "per_class_iou": m["per_class_iou"], "per_class_accuracy": m["per_class_accuracy"],
              "classes_present": m["classes_present"],
              "bootstrap_95": bootstrap_ci(evaluation.per_image_confusion, n_boot,
                                                     ignore_index=getattr(evaluation, "ignore_index", None)),
              "per_image": dict(zip(ids, scores)), **(extra or {})}
    evaluation.show_qualitative(8 if len(ds) > 8 else 0, out / "qualitative.png")
    grid = np.linspace(0, len(ds) - 1, min(n_grid, len(ds))).round().astype(int).tolist()
    evaluation.show_qualitative(grid, out / "qualitative_grid.png")
    plot_confusion(evaluation.confusion, out / "confusion.png")
    plot_class_iou(m, out / "class_iou.png")
    if history is not None:
        plot_history(history, out / "curves.png")
        write_json(out / "history.json", history)
    if t_start is not None:
        report["wall_time_s"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", report)
    return report

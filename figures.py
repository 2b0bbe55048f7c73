"""Figures: class-colour pictures of masks, training curves, the confusion matrix, per-class IoU
and qualitative grids. Each is saved to a file when given a path (atomically) and returned, so a
notebook can display it.

Not here: inference and scoring (evaluate.py), which call these.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from basics import CLASS_COLORS, CLASS_NAMES, atomic_write, mean as MEAN, std as STD

__all__ = ["colorize", "save_figure", "plot_history", "plot_budgets", "plot_confusion", "plot_class_iou", "qualitative_figure"]


def colorize(mask: np.ndarray | torch.Tensor, colors=CLASS_COLORS) -> np.ndarray:
    """Class ids H×W → RGB uint8 H×W×3 in the class colours (``colors``, default the drone
    dataset's); ignored pixels (ids beyond the classes, e.g. 255) are black."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    palette = np.concatenate([np.asarray(colors, np.uint8).reshape(-1, 3), np.zeros((1, 3), np.uint8)])
    return palette[np.where((m >= 0) & (m < len(colors)), m, len(colors))]


def save_figure(fig, path: str | os.PathLike | None, dpi: int = 100, tight: bool = True):
    """Save a figure atomically when a path is given; return the figure either way. ``tight``
    crops to the drawn content (it draws the figure twice: figures laid out by hand skip it)."""
    if path is not None:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return fig


def _photo_for_display(image: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    img = image.detach().cpu()
    if img.dtype == torch.uint8:
        return img.permute(1, 2, 0).numpy()
    img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def qualitative_figure(rows: list, metric_name: str = "score", title_index: int | None = None,
                       save_path: str | os.PathLike | None = None, class_names=CLASS_NAMES, class_colors=CLASS_COLORS):
    """One row per ``(image, mask, pred, score, label)``: photo, ground truth and prediction in
    the class colours, a legend of the classes shown; saved when ``save_path`` is given and
    returned (what :meth:`evaluate.ModelEvaluation.show_qualitative` draws)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(16, 3.9 * len(rows) + 0.9))
    axes = np.asarray(fig.subplots(len(rows), 3)).reshape(len(rows), 3)
    present: set[int] = set()
    for row, (image, mask, pred, score, label) in zip(axes, rows):
        present |= set(torch.unique(mask).tolist()) | set(torch.unique(pred).tolist())
        panels = [(_photo_for_display(image), f"photo {label}"), (colorize(mask, class_colors), "ground truth"),
                  (colorize(pred, class_colors), f"prediction ({metric_name} {score:.3f})")]
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
    handles = [Patch(color=np.asarray(class_colors[c]) / 255, label=class_names[c])
               for c in sorted(present) if c < len(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if title_index is not None:
        fig.suptitle(f"image {title_index}: {metric_name} {rows[-1][3]:.4f}")
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.03, hspace=0.12,
                        bottom=0.8 / fig.get_figheight(), top=1 - 0.5 / fig.get_figheight())
    return save_figure(fig, save_path, tight=False)  # its margins are set above


def plot_history(history: dict, save_path: str | os.PathLike | None = None):
    """Loss and accuracy per epoch (train, and val when present, at the epochs in ``val_epoch``
    when the history has them: a budget run validates only some epochs); returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = range(1, len(history["train_loss"]) + 1)
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_acc.plot(epochs, history["train_acc"], "o-", label="train pixel acc")
    if history.get("val_loss"):
        at = history.get("val_epoch") or epochs
        ax_loss.plot(at, history["val_loss"], "o-", label="val")
        ax_acc.plot(at, history["val_acc"], "o-", label="val pixel acc")
        ax_acc.plot(at, history["val_miou"], "s--", label="val mIoU")
    _finish_axes(((ax_loss, "loss"), (ax_acc, "accuracy")), "epoch")
    return save_figure(fig, save_path)


def _finish_axes(axes_titles, xlabel: str) -> None:
    for ax, title in axes_titles:
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()


def plot_budgets(rows: list[dict], save_path: str | os.PathLike | None = None):
    """Val pixel accuracy and mIoU against training minutes, one curve per time-budget run
    (rows of ``tools/budget_report.py``: ``minutes``, ``acc``, ``miou``, ``label``); returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_acc, ax_miou = fig.subplots(1, 2)
    for r in rows:
        ax_acc.plot(r["minutes"], r["acc"], "o-", label=r["label"])
        ax_miou.plot(r["minutes"], r["miou"], "o-", label=r["label"])
    _finish_axes(((ax_acc, "val pixel accuracy"), (ax_miou, "val mIoU")),
                 "training minutes (wall clock, validation included)")
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


def plot_class_iou(metrics: dict, save_path: str | os.PathLike | None = None, class_colors=CLASS_COLORS):
    """Per-class IoU as a bar chart in the class colours (absent classes marked); returns the Figure."""
    from matplotlib.figure import Figure

    names = list(metrics["per_class_iou"])
    vals = [metrics["per_class_iou"][n] for n in names]
    fig = Figure(figsize=(11, 4.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), [0 if v != v else v for v in vals],
           color=[np.asarray(class_colors[i]) / 255 if i < len(class_colors) else "grey" for i in range(len(names))],
           edgecolor="black", linewidth=0.5)
    for i, v in enumerate(vals):
        ax.text(i, (0 if v != v else v) + 0.01, "absent" if v != v else f"{v:.2f}", ha="center", fontsize=7,
                rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("IoU")
    ax.set_title(f"per-class IoU (dataset-level mIoU {metrics['miou']:.3f})")
    return save_figure(fig, save_path)

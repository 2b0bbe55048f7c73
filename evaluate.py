"""Evaluation: batched inference, the confusion-matrix metrics, per-image scores and figures."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from basics import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, device as default_device, mean as MEAN, std as STD
from datautils import prepare_batch
from metrics import ConfusionMatrix, pixel_accuracy

__all__ = ["ModelEvaluation", "evaluate_loader", "predict_logits", "colorize", "iou_table", "save_figure",
           "plot_history"]


class _eval_mode:
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


def evaluate_loader(model: nn.Module, loader, device: torch.device | str | None = None, *,
                    loss_func: Callable | None = None, num_classes: int = NUM_CLASSES,
                    ignore_index: int | None = None, amp: bool = True, progress: bool = False,
                    predict: Callable | None = None) -> dict:
    """Run ``model`` over ``loader`` under inference mode and score it.

    Returns ``metrics`` (from the accumulated confusion matrix), ``loss`` (batch-size weighted
    mean, nan without ``loss_func``), ``per_image`` pixel accuracies and the ``confusion`` matrix.
    Masks may be larger than the model's input: logits are upsampled to the mask's size.
    ``predict(model, x, out_size)``, if given, replaces plain inference (e.g. sliding windows).
    """
    device = torch.device(device) if device is not None else default_device
    cm = ConfusionMatrix(num_classes, ignore_index)
    per_image, loss_sum, seen = [], 0.0, 0
    model.to(device)
    with _eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc="evaluating", leave=False, disable=not progress):
            x, y = prepare_batch(batch, device)
            if predict is not None:
                out = predict(model, x, tuple(y.shape[-2:]))
            else:
                out = predict_logits(model, x, amp, tuple(y.shape[-2:]))
            if loss_func is not None:
                loss_sum += float(loss_func(out, y)) * x.shape[0]
            seen += x.shape[0]
            pred = out.argmax(1)
            for i in range(pred.shape[0]):
                per_image.append(ConfusionMatrix.metrics_of(cm.update(pred[i], y[i]))["pixel_accuracy"])
    return {"metrics": cm.compute(), "loss": loss_sum / seen if loss_func is not None and seen else float("nan"),
            "per_image": per_image, "confusion": cm.mat.cpu() if cm.mat is not None else None}


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
    fills ``self.metrics`` from the confusion matrix (mIoU, per-class IoU, …).
    """

    def __init__(self, model: nn.Module, test_dataset, metric: Callable = pixel_accuracy,
                 device: torch.device | str | None = None, batch_size: int = 4, num_workers: int = 0,
                 num_classes: int = NUM_CLASSES):
        self.model, self.dataset, self.metric = model, test_dataset, metric
        self.device = torch.device(device) if device is not None else default_device
        self.batch_size, self.num_workers, self.num_classes = batch_size, num_workers, num_classes
        self.scores: list[float] | None = None
        self.metrics: dict | None = None
        self.confusion: torch.Tensor | None = None

    def evaluate_single(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Predict one photo (3×H×W, normalised float or uint8); returns (pred mask H×W, score)."""
        self.model.to(self.device)
        with _eval_mode(self.model), torch.inference_mode():
            x, y = prepare_batch((image.unsqueeze(0), mask.unsqueeze(0)), self.device)
            out = predict_logits(self.model, x, out_size=tuple(y.shape[-2:]))
            pred = out.argmax(1)
            score = float(self.metric(out, y))
        return pred[0].cpu(), score

    def evaluate_all(self, progress: bool = True) -> list[float]:
        """Score every image; prints the mean of per-image scores (the blog's number) and mIoU."""
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        res = evaluate_loader(self.model, loader, self.device, num_classes=self.num_classes, progress=progress)
        self.scores = res["per_image"] if self.metric is pixel_accuracy else [
            self.evaluate_single(*self.dataset[i])[1] for i in range(len(self.dataset))]
        self.metrics, self.confusion = res["metrics"], res["confusion"]
        print(f"mean per-image score over {len(self.scores)} images: {np.mean(self.scores):.4f} | "
              f"pixel accuracy {self.metrics['pixel_accuracy']:.4f} | mIoU {self.metrics['miou']:.4f}")
        return self.scores

    def show_qualitative(self, ind: int, save_path: str | os.PathLike | None = None):
        """Photo, ground truth and prediction of image ``ind`` with a class legend; returns the Figure."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        image, mask = self.dataset[ind]
        pred, score = self.evaluate_single(image, mask)
        fig = Figure(figsize=(16, 4.6))
        axes = fig.subplots(1, 3)
        panels = [(_photo_for_display(image), "photo"), (colorize(mask), "ground truth"),
                  (colorize(pred), f"prediction ({getattr(self.metric, '__name__', 'score')} {score:.3f})")]
        for ax, (img, title) in zip(axes, panels):
            ax.imshow(img)
            ax.set_title(title)
            ax.axis("off")
        present = sorted(set(torch.unique(mask).tolist()) | set(torch.unique(pred).tolist()))
        handles = [Patch(color=np.asarray(CLASS_COLORS[c]) / 255, label=CLASS_NAMES[c]) for c in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
        fig.suptitle(f"image {ind}: {getattr(self.metric, '__name__', 'score')} {score:.4f}")
        fig.subplots_adjust(bottom=0.16)
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

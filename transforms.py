"""From uint8 pixels to the model's input: normalisation, batch preparation on the training
device, and training augmentation (photo and mask transformed together).

Reading photos and masks from disk is in datautils.py; nothing here touches files.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from basics import mean as MEAN, std as STD

__all__ = ["normalize", "prepare_batch", "Augment", "rare_class_weights"]


def normalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
              ) -> torch.Tensor:
    """Photos (…×3×H×W, any device; uint8 0..255 or float 0..1) → float32 normalised with mean/std.

    The one place normalisation happens, per sample or per batch, so both agree to the bit.
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.to(torch.float32, copy=True)
    return x.sub_(m).div_(s)


def prepare_batch(batch, device: torch.device, augment: Callable | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a (photos, masks) batch to ``device``; uint8 photos are augmented (if asked) and
    normalised there, so the data path can stay compact uint8 up to the model."""
    x, y = batch
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True).long()
    if augment is not None:
        if x.dtype != torch.uint8:
            raise ValueError("augmentation needs uint8 photos: build the dataset with normalize=False")
        x, y = augment(x, y)
        return normalize(x), y
    if x.dtype == torch.uint8:
        x = normalize(x)
    return x, y


def rare_class_weights(pixel_counts: Sequence[float], temperature: float) -> torch.Tensor:
    """Per-class sampling weights exp((1 - f_c) / T) from the train split's pixel counts (f_c the
    class's share of the pixels), as in rare-class sampling: the lower the temperature, the more
    often a crop is centred on a rare class. Normalised to sum 1 (only ratios matter)."""
    if not temperature > 0:
        raise ValueError(f"rare-class temperature {temperature}: give a number > 0, e.g. 0.1")
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    f = counts / counts.sum().clamp(min=1)
    logits = (1 - f) / temperature
    w = torch.exp(logits - logits.max())  # shifted: the same ratios without overflow at small T
    return (w / w.sum()).float()


class Augment:
    """Training augmentation of a batch where it sits (the GPU when training there).

    Per sample, photo and mask together: random scale (``scale``, log-uniform, relative to the
    input; only the window the crop takes is resampled), a random ``crop`` (W, H) padded where
    the scaled photo is smaller (mask padding = ``ignore_index``), horizontal and vertical flips,
    90° rotations (square crops only: nadir views have no "up") and mild colour jitter on the photo. Built on
    ``torchvision.transforms.v2`` with ``tv_tensors.Mask``, which keeps photo and mask aligned;
    the per-sample loop (independent crops within one batch), the scaling and rot90 are ours.
    Takes uint8 photos B×3×H×W and int64 masks B×H×W; returns the same dtypes at the crop size.

    Where the crop lies, two options for rare and thin classes: ``class_weights`` (per class, e.g.
    :func:`rare_class_weights`) picks one of the classes present in the photo with probability
    proportional to its weight and places the crop around a random pixel of it; ``max_class_share``
    (MMSegmentation's ``cat_max_ratio``) redraws a crop, up to 10 times, while one class fills more
    than that share of its labelled pixels. Without them the crop lies uniformly at random.
    """

    def __init__(self, crop: tuple[int, int] = (384, 384), scale: tuple[float, float] = (0.5, 2.0),
                 flips: bool = True, rot90: bool = True, color: float = 0.2, ignore_index: int = 255,
                 class_weights: torch.Tensor | None = None, max_class_share: float | None = None,
                 unlabelled: Sequence[int] = ()):
        self.crop, self.scale, self.flips, self.color, self.ignore_index = tuple(crop), scale, flips, color, ignore_index
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float64)
        self.max_class_share = max_class_share
        # labels that are no class for placing a crop (besides 255 and the padding): --ignore-index N
        self.unlabelled = tuple(unlabelled)
        self.rot90 = rot90 and crop[0] == crop[1]
        self._pipes: dict[tuple[int, int], object] = {}

    def _pipeline(self, hw: tuple[int, int]):
        if hw not in self._pipes:
            import torchvision.transforms.v2 as v2
            from torchvision import tv_tensors

            steps = [v2.RandomCrop((self.crop[1], self.crop[0]), pad_if_needed=True,
                                   fill={tv_tensors.Image: 0, tv_tensors.Mask: self.ignore_index})]
            if self.flips:
                steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
            if self.color:
                steps.append(v2.ColorJitter(self.color, self.color, self.color, self.color / 10))
            self._pipes[hw] = v2.Compose(steps)
        return self._pipes[hw]

    def _scale(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rescales only the window the crop can take (about crop/s of the photo), not the whole
        # photo: the same distribution of crops at the cost of the crop instead of the photo
        # (at s = 2 a 600x400 photo is 15x more pixels than a 256 crop). Where the scaled photo
        # is smaller than the crop the window is the whole side, and the crop step pads it.
        s = self._draw_scale()
        h, w = x.shape[-2:]
        want_h, want_w = max(1, round(self.crop[1] / s)), max(1, round(self.crop[0] / s))
        wh, ww = min(h, want_h), min(w, want_w)
        top, left = self._place(y, wh, ww)
        x, y = x[:, top:top + wh, left:left + ww], y[top:top + wh, left:left + ww]
        # a whole window becomes exactly the crop: round(round(c / s) * s) can fall a pixel short,
        # which the crop step would pad with a strip of ignored labels
        out_h = self.crop[1] if wh == want_h else min(self.crop[1], max(1, round(wh * s)))
        out_w = self.crop[0] if ww == want_w else min(self.crop[0], max(1, round(ww * s)))
        return self._resize(x, y, (out_h, out_w))

    def _place(self, y: torch.Tensor, wh: int, ww: int) -> tuple[int, int]:
        """Top-left corner of the window: uniform, around a sampled class's pixel, and/or redrawn
        while one class fills more than ``max_class_share`` of it."""
        h, w = y.shape
        tries = 10 if self.max_class_share is not None else 1
        for attempt in range(tries):
            top, left = int(torch.randint(h - wh + 1, ())), int(torch.randint(w - ww + 1, ()))
            if self.class_weights is not None:
                k = len(self.class_weights)
                labels = y[(y >= 0) & (y < k)]  # the ignore label is no class to centre on
                for u in self.unlabelled:
                    labels = labels[labels != u]
                p = (torch.bincount(labels, minlength=k) > 0).cpu() * self.class_weights  # present classes only
                if p.sum() > 0:
                    c = int(torch.multinomial(p / p.sum(), 1))
                    where = (y == c).nonzero()
                    py, px = where[int(torch.randint(len(where), ()))].tolist()
                    # a window of the same size, at a uniform offset, that holds the pixel
                    top = min(max(py - int(torch.randint(wh, ())), 0), h - wh)
                    left = min(max(px - int(torch.randint(ww, ())), 0), w - ww)
            if attempt == tries - 1:
                break
            window = y[top:top + wh, left:left + ww]
            labelled = window[(window != self.ignore_index) & (window != 255)]
            for u in self.unlabelled:
                labelled = labelled[labelled != u]
            if labelled.numel() == 0 or torch.bincount(labelled.reshape(-1)).max() <= self.max_class_share * labelled.numel():
                break
        return top, left

    def _draw_scale(self) -> float:
        lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
        return math.exp(lo + (hi - lo) * float(torch.rand(())))

    @staticmethod
    def _resize(x: torch.Tensor, y: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # v2's mask resize samples with 'nearest', half a pixel off the photo's bilinear grid;
        # 'nearest-exact' keeps the two on the same pixel centres, so this step is ours.
        xf = torch.nn.functional.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False,
                                             antialias=True)
        yf = torch.nn.functional.interpolate(y[None, None].float(), size=size, mode="nearest-exact")
        return xf[0].round_().clamp_(0, 255).to(torch.uint8), yf[0, 0].long()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        pipe = self._pipeline(tuple(x.shape[-2:]))
        xs, ys = [], []
        for xi, yi in zip(x, y):
            xi, yi = self._scale(xi, yi)
            xi, yi = pipe(tv_tensors.Image(xi), tv_tensors.Mask(yi))
            if self.rot90:
                k = int(torch.randint(4, ()))
                xi, yi = torch.rot90(xi, k, (-2, -1)), torch.rot90(yi, k, (-2, -1))
            xs.append(xi.as_subclass(torch.Tensor))
            ys.append(yi.as_subclass(torch.Tensor))
        return torch.stack(xs), torch.stack(ys)

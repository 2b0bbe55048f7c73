"""SYNTHETIC demo data: aerial-like scenes of class regions written in the dataset's exact on-disk
layout, for the demo (``--demo``) and the tests. Not the Semantic Drone Dataset, and nothing
here is used when the real dataset is given.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from basics import CLASS_COLORS, CLASS_NAMES, InputError
from cache import default_cache_dir

__all__ = ["make_demo_dataset", "demo_dataset"]

# Classes painted by the demo generator, with a base colour and texture strength each.
_DEMO_STYLE = {
    1: ((128, 128, 132), 10), 2: ((140, 105, 70), 18), 3: ((70, 140, 60), 22), 4: ((165, 160, 150), 30),
    5: ((40, 80, 150), 6), 8: ((60, 110, 40), 30), 9: ((170, 70, 60), 8), 15: ((230, 200, 40), 5),
    17: ((30, 30, 200), 4), 19: ((20, 70, 25), 25), 10: ((200, 200, 190), 6),
}


def _demo_scene(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.full((h, w), 3 if rng.random() < 0.5 else 1, np.uint8)  # grass or paved ground
    mask[(xx + yy * rng.uniform(-0.5, 0.5)) % w < w * rng.uniform(0.15, 0.3)] = 1  # a road band
    for cls, count, rmin, rmax, shape in ((2, 2, 0.08, 0.2, "rect"), (4, 2, 0.06, 0.15, "rect"),
                                          (5, 1, 0.08, 0.18, "disc"), (8, 3, 0.05, 0.12, "disc"),
                                          (9, 3, 0.06, 0.14, "rect"), (19, 4, 0.03, 0.07, "disc"),
                                          (17, 4, 0.015, 0.03, "rect"), (15, 5, 0.006, 0.012, "disc")):
        for _ in range(rng.integers(0, count + 1)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(rmin, rmax) * w
            if shape == "disc":
                sel = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            else:
                sel = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.5, 1.0))
            mask[sel] = cls
            if cls == 9:  # roofs cast a wall edge
                mask[sel & ~((abs(xx - cx) < r - 3) & (abs(yy - cy) < r * 0.5 - 3))] = 10 if rng.random() < 0.5 else 9
    photo = np.zeros((h, w, 3), np.float32)
    noise = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    for cls, (color, tex) in _DEMO_STYLE.items():
        sel = mask == cls
        photo[sel] = np.asarray(color, np.float32) + tex * noise[sel]
    photo *= rng.uniform(0.85, 1.15)  # lighting
    return np.clip(photo, 0, 255).astype(np.uint8), mask


def make_demo_dataset(root: str | os.PathLike, n: int = 40, size: tuple[int, int] = (600, 400), seed: int = 0,
                      layout: str = "kaggle-archive", mask_form: str = "index",
                      split_counts: tuple[int, int, int] | None = None) -> Path:
    """Write a small SYNTHETIC aerial-like dataset in the dataset's exact on-disk layout.

    Scenes of class regions (paved area, grass, roofs, trees, water, cars, people …), each with
    its own colour and texture. For the demo and tests only. ``layout`` is 'kaggle-archive',
    'kaggle-folder' or 'tugraz'; ``mask_form`` 'index', 'rgb' or 'both'. Returns the path to
    pass as the data root. Split lists train/val/test (default 70/15/15 %) go in ``splits/``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    if layout == "tugraz":
        base = root / "training_set"
        img_dir, idx_dir, rgb_dir = base / "images", None, base / "gt" / "semantic" / "label_images"
        class_csv, splits_dir, mask_form = base / "gt" / "semantic" / "class_dict.csv", base / "splits", "rgb"
    else:
        folder = root / "dataset" / "semantic_drone_dataset"
        img_dir, idx_dir = folder / "original_images", folder / "label_images_semantic"
        rgb_dir = root / "RGB_color_image_masks" / "RGB_color_image_masks"
        class_csv, splits_dir = root / "class_dict_seg.csv", root / "splits"
        base = root if layout == "kaggle-archive" else folder
        if layout not in ("kaggle-archive", "kaggle-folder"):
            raise InputError(f"layout {layout!r}: use kaggle-archive, kaggle-folder or tugraz")
    write_idx = mask_form in ("index", "both") and idx_dir is not None
    write_rgb = mask_form in ("rgb", "both")
    for d in (img_dir, idx_dir if write_idx else None, rgb_dir if write_rgb else None, splits_dir):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    palette = np.asarray(CLASS_COLORS, np.uint8)
    ids = [f"{i * 3:03d}" for i in range(n)]  # not contiguous, like the real ids
    for i in tqdm(ids, desc="writing synthetic demo data", leave=False):
        photo, mask = _demo_scene(rng, w, h)
        Image.fromarray(photo).save(img_dir / f"{i}.jpg", quality=92)
        if write_idx:
            Image.fromarray(mask).save(idx_dir / f"{i}.png")
        if write_rgb:
            Image.fromarray(palette[mask]).save(rgb_dir / f"{i}.png")
    with open(class_csv, "w") as f:
        f.write("name, r, g, b\n")
        for name, (r, g, b) in zip(CLASS_NAMES + ("conflicting",), CLASS_COLORS + ((255, 0, 0),)):
            f.write(f"{name}, {r}, {g}, {b}\n")
    n_tr, n_va, _ = split_counts or (round(n * 0.7), round(n * 0.15), 0)
    for name, part in (("train", ids[:n_tr]), ("val", ids[n_tr:n_tr + n_va]), ("test", ids[n_tr + n_va:])):
        (splits_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in part))
    (root / "SYNTHETIC_DEMO_DATA.txt").write_text(
        "Synthetic demo data written by datautils.make_demo_dataset: not the Semantic Drone Dataset.\n")
    return base


def demo_dataset(cache_dir: str | os.PathLike | None = None, n: int = 40, seed: int = 0) -> Path:
    """The demo dataset's root, generated once under the cache folder and reused afterwards."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    root = folder / f"demo-data-v1-n{n}-s{seed}"
    done = root / "SYNTHETIC_DEMO_DATA.txt"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-partial-", dir=folder))
        make_demo_dataset(tmp, n=n, seed=seed)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root

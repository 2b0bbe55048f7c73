"""Data: finding the Semantic Drone Dataset on disk, reading photos and masks, the one dataset
class ``DroneDataset``, ``import_drone_dataset`` and the loaders — what a reader of the blog looks for.

Not here: the dataset's layouts and split lists (layout.py), the decode-once cache (cache.py),
normalisation and augmentation (transforms.py) and the synthetic demo data (demo.py): import
their names from there. ``from datautils import *`` gives this module's names, the blog's
``import_drone_dataset`` and ``DroneDataset`` among them.

Layouts accepted (see README):
  * the Kaggle archive root, holding ``dataset/semantic_drone_dataset/`` (and optionally
    ``RGB_color_image_masks/`` and ``class_dict_seg.csv``);
  * the ``semantic_drone_dataset`` folder itself (``original_images/``, ``label_images_semantic/``);
  * the TU Graz ``training_set/`` folder (``images/``, ``gt/semantic/label_images/`` colour masks);
  * your own data (``images/``, ``masks/``, ``classes.csv``), photos or large georeferenced scenes;
  * the DroneDeploy benchmark (``images/<scene>-ortho.tif``, ``labels/<scene>-label.png``).

Scenes (orthomosaics) are cut once into windows of the training size at the training ground
sampling distance (:func:`cut_scenes`, in the cache folder); the windows are then read as photos.

Every photo goes through one function, :func:`load_pair`, whether it is read per item or once
into the cache (which is handed that function), so cached and uncached loading give identical pixels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from basics import CLASS_COLORS, InputError, atomic_write, mean as MEAN, std as STD, write_json
from cache import DecodeCache, default_cache_dir, map_readonly, open_locked, pread
from distributed import Shard, is_distributed, is_main, rank, say, world_size
from layout import (DATASET_HELP, DRONE_CLASSES, IGNORE, ClassSet, DatasetError, DatasetLayout, drone_classes,
                    find_dataset, list_by_id, list_scenes, metres_per_unit, read_classes, read_split, scene_split_lists,
                    seeded_split, write_split)
from transforms import normalize

__all__ = [
    "DroneDataset", "import_drone_dataset", "DECODERS", "load_photo", "open_photo", "photo_size", "unreadable_photo", "load_mask",
    "save_mask", "load_pair", "DeviceBatchLoader", "make_loader", "parse_size", "PHOTO_EXTS", "MASK_EXTS",
    "cut_scenes", "cut_as_trained",
]

#: Photo file types, by suffix.
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: Mask file types, by suffix (index or colour images; lossless only).
MASK_EXTS = (".png", ".tif", ".tiff")


# --------------------------------------------------------------------------- reading files


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # broken EXIF is no reason to reject a photo
        return 1
    return value if value in _EXIF_TRANSPOSE else 1


# EXIF orientation → the turn that shows the photo upright (as ImageOps.exif_transpose applies it)
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


DECODERS = ("pil", "torchvision")


def load_photo(path: str | os.PathLike, size: tuple[int, int] | None = None, draft: bool = True,
               decoder: str = "pil") -> tuple[np.ndarray, tuple[int, int]]:
    """Read a photo as uint8 H×W×3 RGB, upright per EXIF, resized (antialiased) to size=(W, H).

    decoder 'pil' (default, the fastest on CPU: see benchmarks/bench_data.py): for JPEGs at
    least twice the target, decoding is done in the DCT domain at a reduced scale (Pillow's
    ``draft``), then resized bilinearly with antialiasing. decoder 'torchvision': libjpeg-turbo
    via ``torchvision.io.decode_jpeg`` at full size, then an antialiased bilinear resize; within
    a few grey levels of 'pil' (tests/test_cache.py states the tolerance).
    Returns the array and the photo's full (W, H).
    """
    arr, full, _ = _read_photo(path, size, draft, decoder)
    return arr, full


def open_photo(path: str | os.PathLike) -> Image.Image:
    """A photo as an upright RGB PIL image at full size: for outputs drawn on the photo itself
    (overlays), where a NumPy copy of 24 megapixels would only cost time and memory."""
    try:
        with Image.open(path) as im:
            orientation = _exif_orientation(im)
            im.load()
            if orientation in _EXIF_TRANSPOSE:
                im = im.transpose(_EXIF_TRANSPOSE[orientation])
            return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise unreadable_photo(path, e) from None


def unreadable_photo(path: str | os.PathLike, error: BaseException) -> DatasetError:
    """The one message for a photo no decoder can read: the file, the reason, what to do."""
    return DatasetError(f"{path}: cannot read this photo ({type(error).__name__}: {error}). The file is damaged or "
                        "not an image: download it again or remove it (and its mask, if it has one).")


def photo_size(path: str | os.PathLike) -> tuple[int, int]:
    """A photo's upright (W, H) from its header alone (EXIF orientation applied), no decoding."""
    try:
        with Image.open(path) as im:
            return im.size[::-1] if _exif_orientation(im) in (5, 6, 7, 8) else im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise unreadable_photo(path, e) from None


def _read_photo(path, size, draft: bool = True, decoder: str = "pil") -> tuple[np.ndarray, tuple[int, int], int]:
    """:func:`load_photo` plus the EXIF orientation it applied (for the photo's mask)."""
    if decoder not in DECODERS:
        raise InputError(f"decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    if decoder == "torchvision" and Path(path).suffix.lower() in (".jpg", ".jpeg"):
        arr, full = _load_photo_torchvision(path, size)  # decode_jpeg turns the photo itself
        try:
            with Image.open(path) as im:
                return arr, full, _exif_orientation(im)
        except OSError:
            return arr, full, 1
    try:
        with Image.open(path) as im:
            orientation = _exif_orientation(im)
            swap = orientation in (5, 6, 7, 8)
            full = im.size[::-1] if swap else im.size
            if draft and size is not None and im.format == "JPEG":
                req = (size[1], size[0]) if swap else size
                im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode, req)
            im.load()
            if orientation in _EXIF_TRANSPOSE:  # the same turn load_mask gives its mask
                im = im.transpose(_EXIF_TRANSPOSE[orientation])
            im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8), full, orientation
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise unreadable_photo(path, e) from None


def _load_photo_torchvision(path, size) -> tuple[np.ndarray, tuple[int, int]]:
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as moving to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            t = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, OSError) as e:
        raise unreadable_photo(path, e) from None
    full = (int(t.shape[2]), int(t.shape[1]))
    if size is not None and full != tuple(size):
        t = TF.resize(t, [size[1], size[0]], antialias=True)
    return t.permute(1, 2, 0).contiguous().numpy(), full


_COLOR_LUT: dict[tuple, np.ndarray] = {}
_UNKNOWN = 254  # colour LUT code of a colour of no row (ignored rows map to IGNORE)


def _color_lut(classes: ClassSet) -> np.ndarray:
    key = (classes.row_colors, classes.row_ignored)
    if key not in _COLOR_LUT:
        lut = np.full(1 << 24, _UNKNOWN, dtype=np.uint8)  # 16 MB, built once per class set
        for (r, g, b), cid in zip(classes.row_colors, classes.row_to_id()):
            lut[(r << 16) | (g << 8) | b] = cid
        _COLOR_LUT[key] = lut
    return _COLOR_LUT[key]


def _as_classes(classes: ClassSet | Sequence[tuple[int, int, int]] | None) -> ClassSet:
    """A ClassSet from a ClassSet, a list of row colours (the older ``colors`` argument), or None
    (the drone classes)."""
    if classes is None:
        return DRONE_CLASSES
    if isinstance(classes, ClassSet):
        return classes
    colors = tuple(tuple(int(v) for v in c) for c in classes)
    drone = DRONE_CLASSES.row_names
    return ClassSet(tuple(drone[i] if i < len(drone) else f"class{i}" for i in range(len(colors))), colors)


#: PNG text chunk :func:`save_mask` writes: the pixel values are the model's class ids, not class-file rows
_IDS_KEY, _IDS_VALUE = "segmentation", "class ids"


def _check_ids(arr: np.ndarray, classes: ClassSet, path) -> np.ndarray:
    """A class-id mask (written by :func:`save_mask`): its values are already ids."""
    n = classes.num_classes
    beyond = (arr >= n) & (arr != IGNORE)
    if beyond.any():
        raise DatasetError(f"{path}: this class-id mask (written by predict.py) holds id {int(arr[beyond].max())} "
                           f"({int(beyond.sum())} pixels), but {classes.where()} has {n} classes: read it with "
                           "the class file of the model that wrote it.")
    return arr


def _palette_ids(values: np.ndarray, palette: list[int] | None, classes: ClassSet, path) -> np.ndarray | None:
    """Class ids of a palette mask of another tool, read through its palette's colours (its
    values are palette indices, in whatever order that tool chose); None where the palette is
    the plain index layout (each used index i shown as grey i, or not at all): then the values
    are class-file rows, as in an 8-bit mask. The value 255 whose colour is no row's is void."""
    pal = np.asarray(palette or [], np.int64)[:768].reshape(-1, 3)
    used = np.flatnonzero(np.bincount(values.reshape(-1), minlength=256))
    # the palette a tool defined ends at its last non-black entry: black entries after it are
    # padding (Pillow and most writers fill 256 entries), so they decide nothing
    nonblack = np.flatnonzero(pal.any(1))
    defined = int(nonblack[-1]) + 1 if len(nonblack) else 1
    if (pal[:defined] == np.arange(defined)[:, None]).all():  # the whole defined palette is greys i
        return None
    code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = np.full(256, _UNKNOWN, np.uint8)
    lut[:len(pal)] = _color_lut(classes)[code]
    if IGNORE >= defined or lut[IGNORE] == _UNKNOWN:  # 255 is void unless the palette gives it a class colour
        lut[IGNORE] = IGNORE
    bad = [int(v) for v in used if lut[v] == _UNKNOWN]
    if bad:
        counts = np.bincount(values.reshape(-1), minlength=256)
        bad.sort(key=lambda v: -counts[v])
        desc = ", ".join((f"RGB({pal[v, 0]}, {pal[v, 1]}, {pal[v, 2]})" if v < len(pal) else "no colour")
                         + f" (index {v}) on {counts[v]} pixels" for v in bad[:3])
        raise DatasetError(
            f"{path}: palette colour not in the class dict: {desc}. A palette mask is read by its colours, "
            f"which must be those of {classes.where()} (add a row for a missing one, with ignore=1 if it marks "
            "unlabelled pixels); if its values are the class-file rows instead, save it as an 8-bit greyscale PNG.")
    return lut[values]


def _mask_ids(values: np.ndarray, mode: str, palette: list[int] | None, marked_ids: bool, classes: ClassSet,
              path) -> np.ndarray:
    """Class ids (IGNORE for ignored rows and void) of a mask's pixel values, by the mask's kind
    (``mode`` as Pillow names it: "RGB" with H×W×3 values, "P" with its ``palette`` and whether
    save_mask marked its values as ids, "L"/"I"/"I;16"); the one reading of a mask, for whole
    masks (:func:`load_mask`) and for windows of label rasters (:func:`cut_scenes`)."""
    if mode in ("RGB", "RGBA"):
        rgb = values.astype(np.uint32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        arr = _color_lut(classes)[code]
        bad = arr == _UNKNOWN
        if bad.any():
            vals, counts = np.unique(code[bad], return_counts=True)
            top = np.argsort(-counts)[:3]
            desc = ", ".join(f"RGB({v >> 16}, {(v >> 8) & 255}, {v & 255}) on {c} pixels"
                             for v, c in zip(vals[top], counts[top]))
            raise DatasetError(
                f"{path}: colour not in the class dict: {desc}. Colour masks must use exactly "
                f"the colours of {classes.where()} (no blending or JPEG artefacts); add a row for "
                "it (with ignore=1 if it marks unlabelled pixels).")
        return arr
    if mode == "P" and marked_ids:
        return _check_ids(values, classes, path)
    if mode == "P" and (by_colour := _palette_ids(values, palette, classes, path)) is not None:
        return by_colour
    if mode in ("L", "P", "I", "I;16"):
        arr = values
        rows = len(classes.row_names)
        beyond = (arr >= rows) & (arr != IGNORE)
        if beyond.any():
            raise DatasetError(
                f"{path}: mask values must be class ids 0..{rows - 1}, found {int(arr[beyond].max())} "
                f"({int(beyond.sum())} pixels >= {rows}): {classes.where()} has {rows} rows. "
                + ("Use the dataset's label_images_semantic masks or its RGB colour masks."
                   if classes.path is None or classes.row_names == DRONE_CLASSES.row_names else
                   "Add the missing classes to that file, or fix the masks."))
        lut = np.full(256, IGNORE, dtype=np.uint8)
        lut[:rows] = classes.row_to_id()
        return lut[arr.astype(np.int64, copy=False)] if arr.dtype != np.uint8 else lut[arr]
    raise DatasetError(f"{path}: mask mode {mode} not understood; expected an 8-bit index "
                       "PNG (values 0..22) or an RGB colour PNG.")


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None,
              colors: ClassSet | Sequence[tuple[int, int, int]] | None = None, orientation: int = 1
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a mask as uint8 H×W class ids, resized nearest-neighbour to size=(W, H).

    ``colors`` is the class set (:class:`layout.ClassSet`; a list of row colours or None, the
    drone classes, also work). 8-bit index PNGs hold row numbers, RGB colour PNGs row colours;
    both become class ids, and rows marked ignore become ``IGNORE`` (255), as does the value 255
    of an index mask (the usual "void"). Palette PNGs: those :func:`save_mask` writes (predict.py's
    masks, marked by a text chunk) hold class ids and read back as they are; any other is read
    through its palette's colours, unless that palette is plain greys (index i shown as grey i:
    then the values are rows, as in an 8-bit mask). ``orientation`` (its photo's EXIF orientation) turns the
    mask the way the photo is turned upright, so both stay on one pixel grid. Returns the array
    and the mask's full (W, H), after turning.
    """
    classes = _as_classes(colors)
    try:
        with Image.open(path) as im:
            im.load()
            mode, full = im.mode, im.size
            # modes not understood are named by _mask_ids before their pixels are converted
            values = np.asarray(im.convert("RGB") if mode in ("RGB", "RGBA") else im) \
                if mode in ("RGB", "RGBA", "L", "P", "I", "I;16") else np.empty((0, 0), np.uint8)
            arr = _mask_ids(values, mode, im.getpalette() if mode == "P" else None,
                            im.info.get(_IDS_KEY) == _IDS_VALUE, classes, path)
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read this mask ({e}). The file is damaged or not an "
                           "image: download it again or remove it (and its photo).") from None
    arr = arr.astype(np.uint8, copy=False)
    if orientation in _EXIF_TRANSPOSE:
        arr = np.asarray(Image.fromarray(arr).transpose(_EXIF_TRANSPOSE[orientation]))
        full = (arr.shape[1], arr.shape[0])
    if size is not None and full != tuple(size):
        arr = np.asarray(Image.fromarray(arr).resize(tuple(size), Image.Resampling.NEAREST))
    return arr, full


def save_mask(labels: np.ndarray | torch.Tensor, path: str | os.PathLike,
              colors: Sequence[tuple[int, int, int]] = CLASS_COLORS, compress_level: int = 1) -> Image.Image:
    """Write class ids H×W as a palette PNG, atomically: the pixel values are the ids and the
    palette holds the class colours in id order (``colors``: a ClassSet's ``colors``), so the one
    file is both labels and a colour picture. A text chunk marks the values as ids, so
    :func:`load_mask` reads them back as ids whatever the class file (an ignored first row
    included). Level 1 compression: 24-megapixel masks in ~0.1 s.
    Returns the palette image (e.g. to draw an overlay from)."""
    from PIL import PngImagePlugin

    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombuffer("P", (arr.shape[1], arr.shape[0]), arr.tobytes(), "raw", "P", 0, 1)
    # a full 256-entry palette: with a short one Pillow packs the pixels into 1, 2 or 4 bits, which
    # would turn 255 (ignored) and any id beyond the colours into another id
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)
    im.putpalette(palette.tobytes())
    marker = PngImagePlugin.PngInfo()
    marker.add_text(_IDS_KEY, _IDS_VALUE)
    with atomic_write(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level, pnginfo=marker)
    return im


def load_pair(photo: str | os.PathLike, mask: str | os.PathLike, size: tuple[int, int] | None,
              colors: ClassSet | Sequence[tuple[int, int, int]] | None = None, decoder: str = "pil",
              mask_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Photo (H×W×3 uint8) at size=(W, H) and mask (H×W uint8) at ``mask_size`` (default
    ``size``) of one sample, sizes checked.

    The mask is taken to be drawn on the photo's stored pixel grid: when the photo's EXIF
    orientation turns it upright, the mask is turned the same way."""
    img, img_full, orientation = _read_photo(photo, size, decoder=decoder)
    msk, msk_full = load_mask(mask, mask_size or size, colors, orientation)
    if img_full != msk_full:
        raise DatasetError(f"{photo} is {img_full[0]}x{img_full[1]} but its mask {mask} is "
                           f"{msk_full[0]}x{msk_full[1]}: photo and mask must be the same size. "
                           "Replace the mismatched file with the dataset's original.")
    return img, msk


def parse_size(text: str | Sequence[int], square: bool = False) -> tuple[int, int]:
    """'600x400' (width × height) → (600, 400); with ``square``, also 'N' → (N, N) (crops, tiles)."""
    if not isinstance(text, str):
        w, h = text
        return int(w), int(h)
    try:
        parts = text.lower().split("x")
        w, h = (int(parts[0]), int(parts[0])) if square and len(parts) == 1 else (int(v) for v in parts)
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        form = "N or WIDTHxHEIGHT, e.g. 384 or 600x400" if square else "WIDTHxHEIGHT, e.g. 600x400"
        raise InputError(f"size {text!r}: write it as {form}") from None
    return w, h


# --------------------------------------------------------------------------- dataset


class DroneDataset(Dataset):
    """Photo/mask pairs → (float 3×H×W normalised, int64 H×W mask), resized to ``size`` (W, H);
    masks to ``mask_size`` when given (e.g. larger: the model sees the photo at its own size and
    is scored against the larger mask, the photo resized once, as in training and predict.py).

    ``img_path`` and ``mask_path`` are folders, ``X`` the image ids (file stems), as in the blog.
    With ``cache=True`` every pair is decoded once into a memory-mapped file under ``cache_dir``
    and read from there afterwards. With ``normalize=False`` photos come back as uint8 3×H×W,
    to be normalised later on the training device (:func:`normalize`).
    ``transform(image, mask)``, if given, is applied to the tensors last. ``classes`` (a
    :class:`layout.ClassSet` or a class file) gives the class set; default the drone classes,
    their colours from ``class_dict``.
    """

    def __init__(self, img_path: str | os.PathLike, mask_path: str | os.PathLike, X: Sequence[str],
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, transform=None, *,
                 size: tuple[int, int] | str = (600, 400), class_dict: str | os.PathLike | None = None,
                 normalize: bool = True, cache: bool = False, cache_dir: str | os.PathLike | None = None,
                 num_workers: int = 0, decoder: str = "pil", name: str = "split",
                 mask_size: tuple[int, int] | str | None = None, classes: ClassSet | str | os.PathLike | None = None):
        self.img_path, self.mask_path = Path(img_path), Path(mask_path)
        self.ids = list(X)
        self.mean, self.std, self.transform = list(mean), list(std), transform
        self.size = parse_size(size)
        self.mask_size = parse_size(mask_size) if mask_size is not None else self.size
        self.classes = (drone_classes(class_dict) if classes is None else
                        classes if isinstance(classes, ClassSet) else read_classes(classes))
        self.colors = list(self.classes.colors)
        self.normalize, self.name, self.decoder = normalize, name, decoder
        self.pairs = self._pair_files()
        self.cache_path: tuple[str, int] | None = None
        self._arrays = None
        self._fd: int | None = None
        if cache:
            self._attach_cache(Path(cache_dir) if cache_dir else default_cache_dir(), num_workers)

    def _pair_files(self) -> list[tuple[Path, Path]]:
        if not self.img_path.is_dir():
            raise DatasetError(f"{self.img_path}: photo folder not found. " + DATASET_HELP.splitlines()[-2])
        if not self.mask_path.is_dir():
            raise DatasetError(f"{self.mask_path}: mask folder not found; download the masks with the photos.")
        photos = list_by_id(self.img_path, PHOTO_EXTS)
        masks = list_by_id(self.mask_path, MASK_EXTS)
        lone_photos = sorted(set(photos) - set(masks))
        lone_masks = sorted(set(masks) - set(photos))
        if lone_photos:
            raise DatasetError(
                f"{len(lone_photos)} photo(s) without a mask, e.g. {photos[lone_photos[0]]} has no "
                f"{self.mask_path / (lone_photos[0] + '.png')}. Add the missing masks or remove those photos.")
        if lone_masks:
            raise DatasetError(
                f"{len(lone_masks)} mask(s) without a photo, e.g. {masks[lone_masks[0]]} has no photo "
                f"{lone_masks[0]}.jpg in {self.img_path}. Add the missing photos or remove those masks.")
        missing = [i for i in self.ids if i not in photos]
        if missing:
            raise DatasetError(
                f"{len(missing)} of the {len(self.ids)} ids of the {self.name} split have no photo in "
                f"{self.img_path} (first: {', '.join(missing[:5])}). "
                + ("The shared 1500x1000 copy leaves the 40 test images out on purpose: evaluate on "
                   "val with --eval-split val." if self.name == "test" else
                   "Use the full dataset, or the split lists that match your copy."))
        return [(photos[i], masks[i]) for i in self.ids]

    def _attach_cache(self, folder: Path, num_workers: int):
        photo = {"pil": "pil-draft+bilinear-antialias", "torchvision": "decode_jpeg+bilinear-antialias"}
        settings = {"size": list(self.size), "photo": photo[self.decoder],
                    "mask": "nearest", "colors": [list(c) for c in self.classes.row_colors]}
        if any(self.classes.row_ignored):
            settings["ignored_rows"] = [i for i, ig in enumerate(self.classes.row_ignored) if ig]
        if self.mask_size != self.size:
            settings["mask_size"] = list(self.mask_size)
        # the ids are part of the key: two datasets over one folder and split name with other ids
        # (e.g. other split lists) get their own files and never replace each other's
        key_src = json.dumps([str(self.img_path.resolve()), str(self.mask_path.resolve()), self.name,
                              settings, self.ids], sort_keys=True)
        key = f"{self.name}-{self.size[0]}x{self.size[1]}-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
        cache = DecodeCache(folder, key, settings, self.pairs, self.size, self.mask_size)
        found = cache.load()
        if found is None:
            try:
                found = cache.build(load_pair, self.classes, self.decoder, num_workers, desc=self.name)
            except OSError as e:
                warnings.warn(f"cache folder {folder} is not usable ({e.strerror or e}); loading without "
                              "a cache. Free some space, or choose another folder with --cache-dir or "
                              "DRONE_CACHE_DIR.", RuntimeWarning, stacklevel=3)
                return
        data, self._fd = found  # kept open (and locked) for the dataset's life
        self.cache_path = (str(data), len(self.pairs))

    def __getstate__(self):  # DataLoader workers reopen the memory map instead of copying it
        state = dict(self.__dict__)
        state["_arrays"] = state["_fd"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def _data_fd(self) -> int:
        """The (locked) descriptor of the cache file; DataLoader workers open their own."""
        if self._fd is None:
            self._fd = open_locked(Path(self.cache_path[0]))
        return self._fd

    def arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached (photos N×H×W×3, masks N×H×W) uint8 arrays, or None when uncached:
        memory-mapped from the locked descriptor, so never another file of the same name."""
        if self._arrays is None and self.cache_path is not None:
            _, n = self.cache_path
            (w, h), (mw, mh) = self.size, self.mask_size
            mm = map_readonly(self._data_fd())
            self._arrays = (np.frombuffer(mm, np.uint8, n * h * w * 3, 0).reshape(n, h, w, 3),
                            np.frombuffer(mm, np.uint8, n * mh * mw, n * h * w * 3).reshape(n, mh, mw))
        return self._arrays

    def __len__(self) -> int:
        return len(self.pairs)

    def raw(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 photo H×W×3 and mask H×W of sample idx, from the cache when there is one.

        Single items are read from the cache file with ``pread`` rather than through the
        memory map, so a process's resident memory stays flat however large the split is.
        """
        if self.cache_path is None:
            return load_pair(*self.pairs[idx], self.size, self.classes, self.decoder, self.mask_size)
        _, n = self.cache_path
        fd = self._data_fd()
        (w, h), (mw, mh) = self.size, self.mask_size
        idx = range(n)[idx]  # negative indices, bounds
        img = np.frombuffer(pread(fd, h * w * 3, idx * h * w * 3), np.uint8).reshape(h, w, 3)
        msk = np.frombuffer(pread(fd, mh * mw, n * h * w * 3 + idx * mh * mw), np.uint8).reshape(mh, mw)
        return img, msk

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = self.raw(idx)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        mask = torch.from_numpy(msk.astype(np.int64))
        if self.normalize:
            image = normalize(image, self.mean, self.std)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        cached = "cached" if self.cache_path else "uncached"
        masks = f", masks {self.mask_size[0]}x{self.mask_size[1]}" if self.mask_size != self.size else ""
        return f"DroneDataset({self.name}: {len(self)} pairs, {self.size[0]}x{self.size[1]}{masks}, {cached})"


def import_drone_dataset(root: str | os.PathLike | DatasetLayout | None = None,
                         size: tuple[int, int] | str = (600, 400),
                         splits: Sequence[str] | str = ("train", "test"), *, mean: Sequence[float] = MEAN,
                         std: Sequence[float] = STD, normalize: bool = True, cache: bool = True,
                         cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
                         splits_dir: str | os.PathLike | None = None, decoder: str = "pil",
                         mask_size: tuple[int, int] | str | None = None,
                         classes: ClassSet | str | os.PathLike | None = None, split_seed: int = 0,
                         split_ids: dict[str, Sequence[str]] | None = None,
                         window: tuple[int, int] | str | None = None, gsd: float | None = None):
    """Load the dataset's splits as DroneDatasets; by default ``(train_set, test_set)`` as in the blog.

    ``splits`` picks others, e.g. ``("train", "val")`` or ``"trainval"`` (train ∪ val, for final
    runs); a single name returns a single dataset. The root is ``root``, else $DRONE_DATA_ROOT,
    else the blog's ``../dataset/semantic_drone_dataset``. ``mask_size`` (default ``size``) sets
    the masks' size apart from the photos'. ``classes`` (a class file or :class:`layout.ClassSet`)
    replaces the dataset's own class set (the generic layout's classes.csv, else the drone
    classes). A dataset without split lists gets a seeded 80/10/10 split of its sorted ids
    (``split_seed``; scripts write it into their output folder). ``split_ids`` (ids per split
    name, e.g. a run's split read back from its checkpoint) replaces both.

    Scenes (orthomosaics: the generic layout holding GeoTIFFs, or the DroneDeploy benchmark) are
    first cut into windows of ``window`` (default ``size``; the training size) at ``gsd`` metres
    per pixel (default the scenes' own) by :func:`cut_scenes`, once, in ``cache_dir``; the splits
    are then by scene. ``root`` may also be a layout :func:`cut_scenes` returned.
    """
    layout = find_dataset(root, splits_dir)
    class_set = layout.classes(classes) if not isinstance(classes, ClassSet) else classes
    if layout.by_scene and layout.windows is None:
        layout = cut_scenes(layout, window or size, gsd, class_set, cache_dir)
    names = [splits] if isinstance(splits, str) else list(splits)
    made = ({n: list(v) for n, v in split_ids.items()} if split_ids is not None else
            seeded_split(list(list_by_id(layout.image_dir, PHOTO_EXTS)), split_seed, group=layout.group)
            if layout.splits_dir is None else None)
    out = []
    for n in names:
        ids = read_split(n, layout.splits_dir) if made is None else (
            made["train"] + made["val"] if n == "trainval" else made.get(n, []))
        if not ids:
            raise DatasetError(f"{layout.root}: the {n} split is empty ({len(sum(made.values(), []))} images in "
                               f"{layout.image_dir}); add images, or write split lists in {layout.root / 'splits'}")
        out.append(DroneDataset(layout.image_dir, layout.mask_dir, ids, mean, std, size=size,
                                class_dict=layout.class_dict, normalize=normalize, cache=cache, cache_dir=cache_dir,
                                num_workers=num_workers, decoder=decoder, name=n, mask_size=mask_size,
                                classes=class_set))
    return out[0] if isinstance(splits, str) else tuple(out)


# --------------------------------------------------------------------------- scenes: orthomosaics cut into windows

#: Format of a cut (its files and manifest): another version cuts the scenes again. 2: labels read
#: without overviews and with their nodata ignored; every file GDAL reads signed.
_CUT_VERSION = 2
#: GDAL's block cache while cutting, in bytes (an int is bytes to rasterio): a PNG label is decoded
#: line by line from its top, so the rows of a strip of windows must stay cached while its windows
#: are read left to right.
_CUT_GDAL_CACHE = 256 * 2**20


def _file_sig(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _open_raster(path: Path, what: str, **options):
    """A raster opened with rasterio (``options``: GDAL open options), or one line naming the file and the fix."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path, **options)
    except RasterioIOError as e:
        raise DatasetError(f"{path}: cannot read this {what} raster ({str(e).splitlines()[0][:200]}); the file is "
                           "damaged or not a raster GDAL reads: export it again or remove the scene") from None


def _open_label(path: Path):
    """A label raster opened for its pixels, without its overviews: GDAL reads a shrunken window
    from an overview even when nearest is asked, and an averaged overview holds class values no
    pixel has. (Opened so, a raster without georeference reports a zero transform and no
    sidecar files: its georeference is read from a plain open.)"""
    return _open_raster(path, "label", OVERVIEW_LEVEL="NONE")


def _raster_sig(path: Path) -> dict[str, list[int]]:
    """Size and mtime of every file GDAL reads for a raster (the file, and beside it .aux.xml,
    world files, .ovr, .msk), by name: a changed or added sidecar changes the raster read."""
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a label may be a plain PNG
            with rasterio.open(path) as src:
                files = [Path(f) for f in src.files]
    except Exception:  # not readable: the header check names the file
        files = [path]
    return {f.name: _file_sig(f) for f in sorted(set(files) | {path}) if f.is_file()}


def _raster_gsd(src) -> tuple[float, float] | None:
    """A raster's pixel size (x, y) in ground metres (layout.metres_per_unit, which ortho.py's
    predictions use too); None without a CRS in metres (pixel units then)."""
    t, m = src.transform, metres_per_unit(src)
    if m is None:
        return None
    return math.hypot(t.a, t.d) * m[0], math.hypot(t.b, t.e) * m[1]


def _label_kind(lab, path: Path) -> tuple[str, list[int] | None, bool, list[int]]:
    """How a label raster's values read (as :func:`load_mask` reads the same file): Pillow's mode
    name, the palette, whether save_mask marked the values as ids, and the bands to read."""
    from rasterio.enums import ColorInterp

    if lab.count >= 3 and lab.dtypes[0] == "uint8":
        return "RGB", None, False, [1, 2, 3]
    if lab.count == 1 and lab.colorinterp[0] == ColorInterp.palette:
        cmap = lab.colormap(1)
        palette = [v for i in range(max(cmap) + 1) for v in cmap.get(i, (0, 0, 0, 0))[:3]]
        return "P", palette, lab.tags().get(_IDS_KEY) == _IDS_VALUE, [1]
    if lab.count == 1 and lab.dtypes[0] in ("uint8", "uint16"):
        return ("L" if lab.dtypes[0] == "uint8" else "I;16"), None, False, [1]
    raise DatasetError(f"{path}: a label raster of {lab.count} band(s) of {lab.dtypes[0]}; expected class rows "
                       "(one 8-bit band, or a palette) or RGB class colours")


def _scene_header(image: Path, label: Path) -> dict:
    """Size and GSD of a scene, its photo and label checked (RGB 8-bit; the label on its pixel grid)."""
    with _open_raster(image, "scene") as src:
        if src.count < 3 or src.dtypes[0] != "uint8":
            raise DatasetError(f"{image}: {src.count} band(s) of {src.dtypes[0]}; a scene must be 8-bit RGB (an alpha "
                               "band may follow): convert it, e.g. gdal_translate -ot Byte -scale IN.tif OUT.tif")
        size, transform, crs, gsd = (src.width, src.height), src.transform, src.crs, _raster_gsd(src)
    with _open_raster(label, "label") as lab:  # not _open_label: that one reads no georeference of a plain PNG
        if (lab.width, lab.height) != size:
            raise DatasetError(f"{label} is {lab.width}x{lab.height} but its scene {image} is {size[0]}x{size[1]}: a "
                               "label raster must have its scene's pixel grid; export it on the orthomosaic's grid")
        if lab.crs is not None or not lab.transform.is_identity:  # a GeoTIFF label: on the very same grid
            pixel = min(math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
            if not lab.transform.almost_equals(transform, precision=max(1e-9, 0.01 * pixel)) or \
                    (lab.crs is not None and crs is not None and lab.crs != crs):
                raise DatasetError(f"{label}: its georeference differs from its scene's ({image}); a label raster must "
                                   "lie on the scene's pixel grid: warp it onto that grid (gdalwarp with the scene's "
                                   "extent and pixel size), or save it without georeference")
        _label_kind(lab, label)
    return {"size": list(size), "gsd": list(gsd) if gsd else None}


def _unit(f: float) -> float:
    return 1.0 if abs(f - 1) < 1e-9 else f


def _resolve_gsd(heads: dict[str, dict], gsd: float | None, scenes: dict[str, tuple[Path, Path]]
                 ) -> tuple[float | None, dict[str, tuple[float, float]]]:
    """The training GSD in metres (None: pixel units) and, per scene, source pixels per window pixel.

    Without ``gsd`` every scene is cut at its own pixel, which they must share within 1 %; scenes
    without a CRS in metres are cut in pixel units (``gsd`` then counts their pixels)."""
    metric = {s: sum(h["gsd"]) / 2 for s, h in heads.items() if h["gsd"]}
    plain = [s for s in heads if not heads[s]["gsd"]]
    if metric and plain:
        raise DatasetError(f"{scenes[plain[0]][0]} has no georeference in metres but {scenes[next(iter(metric))][0]} "
                           "has: give every scene its georeference (CRS and transform), or none (pixel units)")
    if not metric:
        return None, {s: (gsd or 1.0, gsd or 1.0) for s in heads}
    if gsd is None:
        lo, hi = min(metric, key=metric.get), max(metric, key=metric.get)
        if metric[hi] > metric[lo] * 1.01:
            raise DatasetError(f"the scenes' pixel sizes differ by more than 1 % ({scenes[lo][0].name}: "
                               f"{metric[lo]:.4g} m, {scenes[hi][0].name}: {metric[hi]:.4g} m): choose the training "
                               f"GSD with --train-gsd METRES, e.g. --train-gsd {metric[hi]:.3g}")
        return round(sum(metric.values()) / len(metric), 9), {s: (1.0, 1.0) for s in heads}
    return gsd, {s: (_unit(gsd / heads[s]["gsd"][0]), _unit(gsd / heads[s]["gsd"][1])) for s in heads}


def _cut_scene(scene: str, image: Path, label: Path, factor: tuple[float, float], window: tuple[int, int],
               classes: ClassSet, out: Path) -> list[str]:
    """Cut one scene into windows (PNG photo and class-id PNG mask each, in ``out``); returns their ids.

    Window by window through rasterio, resampled on read (area when shrinking, bilinear when
    enlarging; labels nearest, from their full resolution), so memory holds a window, never the
    scene. Windows without data or without a labelled pixel are skipped; pixels without data in
    the scene, or without label data (the label's nodata, alpha or mask band), are ignored (255);
    the right and bottom windows are padded (photo black, mask 255). Every file is written anew
    (unlinked first): a file linked from the live cut is never written through."""
    from rasterio.enums import MaskFlags, Resampling
    from rasterio.windows import Window

    (ww, wh), (fx, fy) = window, factor
    same = fx == 1 and fy == 1
    photo_resampling = Resampling.nearest if same else Resampling.average if max(fx, fy) > 1 else Resampling.bilinear
    ids = []
    with _open_raster(image, "scene") as src, _open_label(label) as lab:
        mode, palette, marked, bands = _label_kind(lab, label)
        # a label with nodata, an alpha or a mask band: its pixels without data carry no label
        label_mask = any(MaskFlags.all_valid not in flags for flags in lab.mask_flag_enums)
        if lab.driver == "PNG" and all(MaskFlags.alpha not in flags for flags in lab.mask_flag_enums):
            # GDAL reads a PNG's transparent palette entry as nodata; load_mask reads that entry as its class row
            label_mask = False
        w, h = src.width, src.height
        gw, gh = max(1, math.ceil(w / fx - 1e-6)), max(1, math.ceil(h / fy - 1e-6))  # the scene on the window grid
        for r in range(math.ceil(gh / wh)):
            for c in range(math.ceil(gw / ww)):
                tw, th = min(ww, gw - c * ww), min(wh, gh - r * wh)
                x0, y0 = c * ww * fx, r * wh * fy
                win = Window(int(x0), int(y0), tw, th) if same else \
                    Window(x0, y0, min(tw * fx, w - x0), min(th * fy, h - y0))
                valid = src.dataset_mask(window=win, out_shape=(th, tw)) > 0
                if not valid.any():
                    continue  # an orthomosaic's nodata border
                values = lab.read(bands, window=win, out_shape=(len(bands), th, tw), resampling=Resampling.nearest)
                values = values.transpose(1, 2, 0) if mode == "RGB" else values[0]
                where = f"{label} (window at pixel {x0:.0f},{y0:.0f})"
                if label_mask:  # the nodata value (often no class row, or a colour not in the class set) is not read
                    labelled = lab.dataset_mask(window=win, out_shape=(th, tw)) > 0
                    ids_ = np.full((th, tw), IGNORE, np.uint8)
                    ids_[labelled] = _mask_ids(values[labelled], mode, palette, marked, classes, where)
                else:
                    ids_ = _mask_ids(values, mode, palette, marked, classes, where)
                ids_ = np.where(valid, ids_, IGNORE).astype(np.uint8)  # a label over no data means nothing
                if (ids_ == IGNORE).all():
                    continue
                rgb = src.read([1, 2, 3], window=win, out_shape=(3, th, tw), resampling=photo_resampling)
                photo = np.zeros((wh, ww, 3), np.uint8)
                photo[:th, :tw] = np.where(valid[..., None], rgb.transpose(1, 2, 0), 0)
                mask = np.full((wh, ww), IGNORE, np.uint8)
                mask[:th, :tw] = ids_
                wid = f"{scene}_r{r:03d}_c{c:03d}"
                for sub in ("images", "masks"):  # may be a hard link into the live cut (a half-linked scene)
                    (out / sub / f"{wid}.png").unlink(missing_ok=True)
                Image.fromarray(photo).save(out / "images" / f"{wid}.png", compress_level=1)
                save_mask(mask, out / "masks" / f"{wid}.png", classes.colors)
                ids.append(wid)
    return ids


def _link_windows(old: Path, new: Path, ids: list[str]) -> bool:
    """Hard-link (else copy) an unchanged scene's windows from the previous cut; False if one is gone."""
    try:
        for wid in ids:
            for sub in ("images", "masks"):
                src, dst = old / sub / f"{wid}.png", new / sub / f"{wid}.png"
                try:
                    os.link(src, dst)
                except OSError:
                    if not src.is_file():
                        return False
                    shutil.copy2(src, dst)
    except OSError:
        return False
    return True


def _read_cut_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _unwritable(folder: Path, e: OSError) -> DatasetError:
    return DatasetError(f"{folder.parent}: cannot write the scenes' windows there ({e.strerror or e}); choose a "
                        "writable cache folder with --cache-dir or DRONE_CACHE_DIR")


#: This machine's name, in the names of a cut's temporary folders (a cache may be shared by machines).
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporary and replaced folders of a cut (``.NAME.tmp-PID``, ``.NAME.old-PID``)
    whose process is gone (killed mid-cut); those of a running process are kept. POSIX only
    (os.kill(pid, 0) asks whether a process exists; on Windows it would end it)."""
    if os.name != "posix":
        return
    # only this machine's: a cache folder shared between machines holds other hosts' live cuts too
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:tmp|old)-{re.escape(_HOST)}-(\d+)")
    for p in folder.parent.glob(f".{folder.name}.*-*"):
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (OSError, OverflowError):  # alive under another user, or no PID of this machine: left alone
            pass


@contextlib.contextmanager
def _cut_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``<cache>/scenes/NAME.lock`` while a cut is checked and made:
    processes cutting the same scenes at once take turns (the later one then finds the first
    one's cut and reuses it) and never rename each other's work away. Where the cache folder is
    read-only or has no locks (Windows; NFS, see cache.py) it goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder.parent / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache: a valid cut there still loads; a new one names the folder
        yield
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _build_cut(folder: Path, settings: dict, scenes: dict[str, tuple[Path, Path]], sources: dict,
               old: dict | None, gsd: float | None, classes: ClassSet) -> dict:
    """Cut every scene into a temporary folder (an unchanged scene's windows linked from the old
    cut), the manifest last, then rename it into place: a killed cut leaves nothing that loads."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    t0 = time.perf_counter()
    tmp = folder.parent / f".{folder.name}.tmp-{_HOST}-{os.getpid()}"
    try:
        _remove_leftovers(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
    except OSError as e:
        raise _unwritable(folder, e) from None
    try:
        with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=_CUT_GDAL_CACHE):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel units are allowed, and said once
            heads = {s: _scene_header(image, label) for s, (image, label) in scenes.items()}
            resolved, factors = _resolve_gsd(heads, gsd, scenes)
            done = {}
            for s, (image, label) in tqdm(scenes.items(), desc="cutting scenes", unit="scene", leave=False,
                                          disable=not is_main()):
                before = (old or {}).get("scenes", {}).get(s)
                if before and old.get("settings") == settings and (old.get("sources") or {}).get(s) == sources[s] and \
                        before["factor"] == list(factors[s]) and _link_windows(folder, tmp, before["windows"]):
                    ids = before["windows"]  # unchanged: not cut again
                else:
                    ids = _cut_scene(s, image, label, factors[s], tuple(settings["window"]), classes, tmp)
                if not ids:
                    raise DatasetError(f"{label}: no window of scene {s} holds a labelled pixel with data; check its "
                                       f"colours against {classes.where()} (ignored rows, and pixels without data, "
                                       "are left out), or remove the scene")
                done[s] = {"windows": ids, "factor": list(factors[s]), **heads[s]}
        (tmp / "classes.csv").write_text("name,r,g,b\n" + "".join(f"{n},{r},{g},{b}\n" for n, (r, g, b)
                                                                  in zip(classes.names, classes.colors)))
        manifest = {"version": _CUT_VERSION, "settings": settings, "sources": sources, "gsd": resolved,
                    "units": "metres" if resolved is not None else "pixels", "scenes": done,
                    "seconds": round(time.perf_counter() - t0, 1)}
        write_json(tmp / "manifest.json", manifest)
        stale = folder.parent / f".{folder.name}.old-{_HOST}-{os.getpid()}"
        try:
            os.rename(folder, stale)
        except FileNotFoundError:
            pass
        try:
            os.rename(tmp, folder)
        except OSError as e:
            if not (folder / "manifest.json").is_file():  # no other process's cut took its place: undo, and say why
                if stale.exists() and not folder.exists():
                    os.rename(stale, folder)
                raise DatasetError(f"{folder}: cannot put the scenes' cut in place ({e.strerror or e}); free space or "
                                   "choose a writable cache folder with --cache-dir") from None
        shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def cut_scenes(layout: DatasetLayout, window: tuple[int, int] | str, gsd: float | None = None,
               classes: ClassSet | str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> DatasetLayout:
    """Cut the scenes of a scene layout (``layout.by_scene``) into windows of ``window`` (W, H: the
    training size) at ``gsd`` metres per pixel (default: the scenes' own pixel, which they must
    share within 1 %; pixel units for scenes without georeference), once: in
    ``<cache_dir>/scenes/<root name>-<key>/`` as ``images/<scene>_r<row>_c<col>.png``, class-id
    masks ``masks/<same>.png``, ``classes.csv`` and ``manifest.json`` (the sizes and mtimes of
    every file GDAL reads for the scenes and labels, sidecars included; the settings; the
    windows). A valid cut is reused as it is; a changed scene is cut again (the others linked
    over), under a lock (``<cache_dir>/scenes/NAME.lock``) that makes processes cutting the same
    scenes take turns. The split lists (scene ids) become window lists, so a
    scene's windows stay in its split. Returns the layout pointing at the windows, ``gsd`` the
    training GSD in metres (None in pixel units). Bad input stops with one line naming the file."""
    if layout.windows is not None:
        return layout
    window = parse_size(window)
    if gsd is not None and not (math.isfinite(gsd) and gsd > 0):
        raise InputError(f"--train-gsd {gsd:g}: the training ground sampling distance is metres per pixel, a number "
                         "> 0, e.g. 0.1")
    class_set = classes if isinstance(classes, ClassSet) else layout.classes(classes)
    scenes = list_scenes(layout)
    lists = scene_split_lists(layout, scenes)  # bad lists stop before a raster is read
    root = Path(layout.root).resolve()  # one key for one root, however its path was spelled
    settings = {"version": _CUT_VERSION, "kind": layout.kind, "root": str(root), "window": list(window),
                "gsd": gsd, "classes": [[n, list(c), ig] for n, c, ig in
                                        zip(class_set.row_names, class_set.row_colors, class_set.row_ignored)]}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "scenes" / f"{root.name}-{key}"
    # every file GDAL reads for a scene's rasters: a changed .aux.xml, world file or .ovr cuts it again
    sources = {s: [_raster_sig(image), _raster_sig(label)] for s, (image, label) in scenes.items()}
    with _cut_lock(folder):
        manifest = _read_cut_manifest(folder)
        reused = manifest is not None and manifest.get("settings") == settings and manifest.get("sources") == sources
        if not reused:
            manifest = _build_cut(folder, settings, scenes, sources, manifest, gsd, class_set)
    n = sum(len(v["windows"]) for v in manifest["scenes"].values())
    at = f"{manifest['gsd']:g} m" if manifest["gsd"] is not None else \
        f"{gsd:g} scene pixel(s) per pixel" if gsd else "their own pixel"
    say(f"{layout.root}: {len(scenes)} scene(s) as {n} windows of {window[0]}x{window[1]} at {at}, "
        + (f"reused from {folder}" if reused else f"cut in {manifest['seconds']:.0f} s into {folder}"))
    if manifest["gsd"] is None:
        say(f"{layout.root}: the scenes have no georeference in metres: cut in pixel units, and no training GSD is "
            "stored with the model (predict.py then needs --gsd)")
    splits_dir = None
    if lists is not None:  # scene lists -> window lists, in a folder named by their content
        windows = {name: [w for s in ids for w in manifest["scenes"][s]["windows"]] for name, ids in lists.items()}
        windows = {name: ids for name, ids in windows.items() if ids}
        tag = hashlib.sha1(json.dumps(windows, sort_keys=True).encode()).hexdigest()[:12]
        splits_dir = folder / "splits" / tag
        if any(not (splits_dir / f"{name}.txt").is_file() for name in windows):
            write_split(windows, splits_dir)
    return dataclasses.replace(layout, image_dir=folder / "images", mask_dir=folder / "masks", splits_dir=splits_dir,
                               windows=folder, gsd=manifest["gsd"])


def cut_as_trained(layout: DatasetLayout, window: tuple[int, int] | str, gsd: float | None,
                   train_gsd: float | None, classes: ClassSet | str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> DatasetLayout:
    """The scenes of ``layout`` cut as a model was trained on scenes (for calibrating or showing
    it): windows of its training size ``window`` at its --train-gsd ``gsd`` (None: the scenes'
    own pixel), which finds its training cut again; where that gives another GSD than the metres
    it was trained at (``train_gsd``, its meta's; e.g. other scenes of another pixel size), cut
    at those metres instead. Photo layouts (and cuts) are returned as they are."""
    if not layout.by_scene or layout.windows is not None:
        return layout
    cut = cut_scenes(layout, window, gsd, classes, cache_dir)
    if train_gsd is not None and cut.gsd is not None and abs(cut.gsd - train_gsd) > 1e-6 * train_gsd:
        cut = cut_scenes(layout, window, train_gsd, classes, cache_dir)
    return cut


# --------------------------------------------------------------------------- loaders


def _upload(arr: np.ndarray, device: torch.device, chunk: int = 64) -> torch.Tensor:
    """Copy a (memory-mapped) array to the device in chunks, never holding it twice in RAM."""
    out = torch.empty(arr.shape, dtype=torch.uint8, device=device)
    for s in range(0, len(arr), chunk):
        out[s:s + chunk] = torch.from_numpy(np.array(arr[s:s + chunk]))
    return out


class DeviceBatchLoader:
    """Batches sliced from a split held whole on one device (the GPU), no DataLoader in the way.

    Yields (uint8 photos B×3×H×W, int64 masks B×H×W) on ``device``; shuffling draws from the
    global torch generator, as a DataLoader's sampler does, so seeding repeats the order. Under
    torchrun (``world > 1``) each rank takes its share of one permutation drawn from
    ``seed + epoch`` (:meth:`set_epoch`), padded so every rank gets as many batches.
    """

    def __init__(self, dataset: DroneDataset, batch_size: int, shuffle: bool, device: torch.device,
                 drop_last: bool = False, rank: int = 0, world: int = 1, seed: int = 0):
        arrays = dataset.arrays()
        if arrays is None:
            raise ValueError("DeviceBatchLoader needs a cached dataset (cache=True)")
        self.images = _upload(arrays[0], device).permute(0, 3, 1, 2)
        self.masks = _upload(arrays[1], device)
        self.batch_size, self.shuffle, self.drop_last, self.device = batch_size, shuffle, drop_last, device
        self.dataset, self.rank, self.world, self.seed, self.epoch = dataset, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if self.world == 1:
            return torch.randperm(n) if self.shuffle else torch.arange(n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        per_rank = -(-n // self.world)
        order = torch.cat([order, order[:per_rank * self.world - n]])  # pad, as DistributedSampler does
        return order[self.rank::self.world]

    def __len__(self) -> int:
        n = -(-len(self.images) // self.world)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images.index_select(0, idx).contiguous(), self.masks.index_select(0, idx).long()


def make_loader(dataset: DroneDataset, batch_size: int, shuffle: bool, device: torch.device | str = "cpu",
                num_workers: int = 0, gpu_fraction: float = 0.5, drop_last: bool = False, seed: int = 0):
    """The training/evaluation loader: GPU-resident batches when on CUDA and the cached split
    fits in ``gpu_fraction`` of free GPU memory, else a DataLoader (over the memory map when cached).

    Under torchrun, training loaders (``shuffle=True``) give each rank its share of every epoch,
    reshuffled per epoch from ``seed`` (``set_epoch``, called by ``train``); evaluation loaders
    (``shuffle=False``) run over this rank's :class:`distributed.Shard`, whose results
    ``evaluate_loader`` sums over ranks.
    """
    device = torch.device(device)
    arrays = dataset.arrays()
    sharded = is_distributed()
    if sharded and not shuffle:
        return DataLoader(Shard(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    if device.type == "cuda" and arrays is not None:
        free, _ = torch.cuda.mem_get_info(device)
        if arrays[0].nbytes + arrays[1].nbytes < gpu_fraction * free:
            return DeviceBatchLoader(dataset, batch_size, shuffle, device, drop_last, rank(), world_size(), seed)
    sampler = None
    if sharded:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0)

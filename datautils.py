"""Data: finding the Semantic Drone Dataset on disk, reading pairs, the dataset class, the cache.

Layouts accepted (see README):
  * the Kaggle archive root, holding ``dataset/semantic_drone_dataset/`` (and optionally
    ``RGB_color_image_masks/`` and ``class_dict_seg.csv``);
  * the ``semantic_drone_dataset`` folder itself (``original_images/``, ``label_images_semantic/``);
  * the TU Graz ``training_set/`` folder (``images/``, ``gt/semantic/label_images/`` colour masks).

Every photo goes through one function, :func:`load_pair`, whether it is read per item or once
into the cache, so cached and uncached loading give identical pixels.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from basics import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, InputError, atomic_write, mean as MEAN, std as STD

__all__ = [
    "DatasetError", "MissingSplit", "DatasetLayout", "DroneDataset", "import_drone_dataset", "find_dataset",
    "read_class_dict", "read_split", "DECODERS", "load_photo", "open_photo", "photo_size", "load_mask", "save_mask", "load_pair",
    "normalize",
    "make_demo_dataset", "demo_dataset", "default_cache_dir", "DeviceBatchLoader",
    "make_loader", "prepare_batch", "parse_size", "Augment", "DEFAULT_ROOT", "SPLITS_DIR", "DATASET_HELP",
]

#: The blog's location of the dataset, relative to the working folder.
DEFAULT_ROOT = Path("../dataset/semantic_drone_dataset")
#: The fixed train/val/test id lists shipped with the repository.
SPLITS_DIR = Path(__file__).resolve().parent / "splits"
PHOTO_EXTS = (".jpg", ".jpeg", ".png")
CACHE_FORMAT_VERSION = 2  # 2: masks turned with their photo's EXIF orientation

DATASET_HELP = """\
Get the Semantic Drone Dataset from TU Graz (https://www.tugraz.at/index.php?id=22387, free for
non-commercial research) or its common Kaggle mirror ("Aerial Semantic Segmentation Drone
Dataset", bulentsiyah/semantic-drone-dataset). Layouts accepted:
  <archive>/dataset/semantic_drone_dataset/{original_images,label_images_semantic}/  (Kaggle archive root)
  <...>/semantic_drone_dataset/{original_images,label_images_semantic}/              (that folder itself)
  <...>/training_set/{images,gt/semantic/label_images}/                              (TU Graz download)
Point to it with --data-root PATH or the environment variable DRONE_DATA_ROOT.
Without the dataset, try the pipeline on generated data: python run_single_conv.py --demo"""


class DatasetError(InputError):
    """Bad or missing input data. The message names the file or folder and the fix."""


class MissingSplit(DatasetError):
    """A split list (e.g. val.txt) that the dataset does not have; ``split`` names it."""

    def __init__(self, message: str, split: str):
        super().__init__(message)
        self.split = split


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's photos, masks, class dict and split lists are."""

    root: Path
    kind: str  # "kaggle-archive", "kaggle-folder" or "tugraz"
    image_dir: Path
    mask_dir: Path
    class_dict: Path | None
    splits_dir: Path


def _list_by_id(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            out[p.stem] = p
    return out


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def find_dataset(root: str | os.PathLike | None = None, splits_dir: str | os.PathLike | None = None
                 ) -> DatasetLayout:
    """Resolve the dataset root (argument, then $DRONE_DATA_ROOT, then the blog's path).

    Raises DatasetError saying where it looked and how to get the data when nothing is found.
    """
    if root not in (None, ""):
        path, where = Path(root).expanduser(), "--data-root / root argument"
    elif os.environ.get("DRONE_DATA_ROOT"):
        path, where = Path(os.environ["DRONE_DATA_ROOT"]).expanduser(), "$DRONE_DATA_ROOT"
    else:
        path, where = DEFAULT_ROOT, "the blog's default path"
    layout = _detect_layout(path, splits_dir)
    if layout is None:
        state = "does not exist" if not path.exists() else "holds none of the layouts below"
        raise DatasetError(f"No Semantic Drone Dataset found at {path.resolve()} ({where}): the folder "
                           f"{state}.\n" + DATASET_HELP)
    return layout


def _detect_layout(root: Path, splits_dir) -> DatasetLayout | None:
    if not root.is_dir():
        return None
    root = root.resolve()
    if (root / "training_set").is_dir():
        root = root / "training_set"
    if (root / "dataset" / "semantic_drone_dataset" / "original_images").is_dir():
        kind, archive = "kaggle-archive", root
        folder = root / "dataset" / "semantic_drone_dataset"
    elif (root / "original_images").is_dir():
        kind, folder = "kaggle-folder", root
        archive = root.parent.parent  # <archive>/dataset/semantic_drone_dataset
    elif (root / "images").is_dir() and (root / "gt" / "semantic" / "label_images").is_dir():
        sem = root / "gt" / "semantic"
        own_splits = _first_existing(root / "splits", root.parent / "splits")
        return DatasetLayout(root, "tugraz", root / "images", sem / "label_images",
                             _first_existing(sem / "class_dict.csv", root.parent / "class_dict.csv"),
                             Path(splits_dir) if splits_dir else (own_splits or SPLITS_DIR))
    else:
        return None
    index_masks = folder / "label_images_semantic"
    rgb_masks = archive / "RGB_color_image_masks" / "RGB_color_image_masks"
    mask_dir = index_masks if index_masks.is_dir() else rgb_masks
    if not mask_dir.is_dir():
        raise DatasetError(
            f"{folder}: photos found but no masks: expected {index_masks} (index PNGs) or "
            f"{rgb_masks} (colour PNGs). Download the masks with the photos.")
    class_dict = _first_existing(archive / "class_dict_seg.csv", folder / "class_dict_seg.csv",
                                 archive / "class_dict.csv")
    own_splits = _first_existing(archive / "splits", folder / "splits")
    return DatasetLayout(root, kind, folder / "original_images", mask_dir, class_dict,
                         Path(splits_dir) if splits_dir else (own_splits or SPLITS_DIR))


def read_class_dict(path: str | os.PathLike | None) -> list[tuple[int, int, int]]:
    """Colours of classes 0..N-1 from a class-dict CSV (``name, r, g, b``); built-ins when None."""
    if path is None:
        return list(CLASS_COLORS)
    colors = []
    try:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].strip().lower() == "name":
                    continue
                colors.append(tuple(int(v) for v in row[1:4]))
    except (OSError, ValueError, IndexError) as e:
        raise DatasetError(f"{path}: cannot read the class dict ({e}); expected rows 'name, r, g, b'. "
                           "Restore the file from the dataset download or delete it to use the built-in colours.")
    return colors


def read_split(name: str, splits_dir: str | os.PathLike = SPLITS_DIR) -> list[str]:
    """Image ids of a split ('train', 'val', 'test'; 'trainval' is train followed by val)."""
    if name == "trainval":
        return read_split("train", splits_dir) + read_split("val", splits_dir)
    path = Path(splits_dir) / f"{name}.txt"
    if not path.is_file():
        raise MissingSplit(f"{path}: split list not found; splits are train, val, test, trainval.", name)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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
        raise DatasetError(f"{path}: cannot read this photo ({e}). The file is damaged or not an "
                           "image: download it again or remove it.") from None


def photo_size(path: str | os.PathLike) -> tuple[int, int]:
    """A photo's upright (W, H) from its header alone (EXIF orientation applied), no decoding."""
    try:
        with Image.open(path) as im:
            return im.size[::-1] if _exif_orientation(im) in (5, 6, 7, 8) else im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read this photo ({e}). The file is damaged or not an "
                           "image: download it again or remove it.") from None


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
        raise DatasetError(f"{path}: cannot read this photo ({e}). The file is damaged or not an "
                           "image: download it again or remove it (and its mask).") from None


def _load_photo_torchvision(path, size) -> tuple[np.ndarray, tuple[int, int]]:
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as moving to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            t = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"{path}: cannot read this photo ({e}). The file is damaged or not an "
                           "image: download it again or remove it (and its mask).") from None
    full = (int(t.shape[2]), int(t.shape[1]))
    if size is not None and full != tuple(size):
        t = TF.resize(t, [size[1], size[0]], antialias=True)
    return t.permute(1, 2, 0).contiguous().numpy(), full


_COLOR_LUT: dict[tuple, np.ndarray] = {}


def _color_lut(colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    key = tuple(map(tuple, colors))
    if key not in _COLOR_LUT:
        lut = np.full(1 << 24, 255, dtype=np.uint8)  # 16 MB, built once per class dict
        for i, (r, g, b) in enumerate(colors):
            lut[(r << 16) | (g << 8) | b] = i
        _COLOR_LUT[key] = lut
    return _COLOR_LUT[key]


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None,
              colors: Sequence[tuple[int, int, int]] | None = None, orientation: int = 1
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a mask as uint8 H×W class ids, resized nearest-neighbour to size=(W, H).

    8-bit index PNGs are read as they are; RGB colour PNGs are mapped through ``colors``
    (the class dict). ``orientation`` (its photo's EXIF orientation) turns the mask the way
    the photo is turned upright, so both stay on one pixel grid. Returns the array and the
    mask's full (W, H), after turning.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode, full = im.mode, im.size
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint32)
                code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                arr = _color_lut(colors or CLASS_COLORS)[code]
                bad = arr == 255
                if bad.any():
                    vals, counts = np.unique(code[bad], return_counts=True)
                    top = np.argsort(-counts)[:3]
                    desc = ", ".join(f"RGB({v >> 16}, {(v >> 8) & 255}, {v & 255}) on {c} pixels"
                                     for v, c in zip(vals[top], counts[top]))
                    raise DatasetError(
                        f"{path}: colour not in the class dict: {desc}. Colour masks must use exactly "
                        "the colours of class_dict_seg.csv (no blending or JPEG artefacts).")
            elif mode in ("L", "P", "I", "I;16"):
                arr = np.asarray(im)
            else:
                raise DatasetError(f"{path}: mask mode {mode} not understood; expected an 8-bit index "
                                   "PNG (values 0..22) or an RGB colour PNG.")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read this mask ({e}). The file is damaged or not an "
                           "image: download it again or remove it (and its photo).") from None
    if arr.max(initial=0) >= NUM_CLASSES:
        n_bad = int((arr >= NUM_CLASSES).sum())
        raise DatasetError(f"{path}: mask values must be class ids 0..{NUM_CLASSES - 1}, found "
                           f"{int(arr.max())} ({n_bad} pixels >= {NUM_CLASSES}). Use the dataset's "
                           "label_images_semantic masks or its RGB colour masks.")
    arr = arr.astype(np.uint8, copy=False)
    if orientation in _EXIF_TRANSPOSE:
        arr = np.asarray(Image.fromarray(arr).transpose(_EXIF_TRANSPOSE[orientation]))
        full = (arr.shape[1], arr.shape[0])
    if size is not None and full != tuple(size):
        arr = np.asarray(Image.fromarray(arr).resize(tuple(size), Image.Resampling.NEAREST))
    return arr, full


def save_mask(labels: np.ndarray | torch.Tensor, path: str | os.PathLike,
              colors: Sequence[tuple[int, int, int]] = CLASS_COLORS, compress_level: int = 1) -> Path:
    """Write class ids H×W as a palette PNG, atomically: the pixel values are the ids (what
    :func:`load_mask` reads back) and the palette holds the class colours, so the one file is
    both labels and a colour picture. Level 1 compression: 24-megapixel masks in ~0.1 s."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombuffer("P", (arr.shape[1], arr.shape[0]), arr.tobytes(), "raw", "P", 0, 1)
    im.putpalette(np.asarray(colors, np.uint8).reshape(-1).tobytes())
    with atomic_write(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level)
    return Path(path)


def load_pair(photo: str | os.PathLike, mask: str | os.PathLike, size: tuple[int, int] | None,
              colors: Sequence[tuple[int, int, int]] | None = None, decoder: str = "pil"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Photo (H×W×3 uint8) and mask (H×W uint8) of one sample at size=(W, H), sizes checked.

    The mask is taken to be drawn on the photo's stored pixel grid: when the photo's EXIF
    orientation turns it upright, the mask is turned the same way."""
    img, img_full, orientation = _read_photo(photo, size, decoder=decoder)
    msk, msk_full = load_mask(mask, size, colors, orientation)
    if img_full != msk_full:
        raise DatasetError(f"{photo} is {img_full[0]}x{img_full[1]} but its mask {mask} is "
                           f"{msk_full[0]}x{msk_full[1]}: photo and mask must be the same size. "
                           "Replace the mismatched file with the dataset's original.")
    return img, msk


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


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """'600x400' (width × height) → (600, 400)."""
    if not isinstance(text, str):
        w, h = text
        return int(w), int(h)
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise InputError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 600x400") from None
    return w, h


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """$DRONE_CACHE_DIR, else $XDG_CACHE_HOME/drone-seg, else ~/.cache/drone-seg."""
    if os.environ.get("DRONE_CACHE_DIR"):
        return Path(os.environ["DRONE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "drone-seg"


def _file_sig(p: Path) -> list:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _open_locked(path: Path) -> int:
    """Open a cache data file read-only and take a shared lock on it: while any process holds
    one, no builder deletes the file (see :meth:`_Cache.remove_stale`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:  # a file system without locks: reading still works
        pass
    return fd


class _Cache:
    """One memory-mapped file of uint8 photos then masks, with a JSON manifest beside it.

    The data file is written under a temporary name and renamed; the manifest, written the same
    way, comes last and names the data file, so a build killed at any point leaves nothing
    that loads as valid. Readers hold a shared lock on the data file they opened, and a
    builder removes an older build only when it can take an exclusive lock on it, so
    concurrent processes never pull a file from under each other.
    """

    def __init__(self, folder: Path, key: str, settings: dict, pairs: list[tuple[Path, Path]],
                 size: tuple[int, int]):
        self.folder, self.key, self.settings, self.pairs, self.size = folder, key, settings, pairs, size
        self.manifest_path = folder / f"{key}.json"

    def expected_manifest(self) -> dict:
        return {"format_version": CACHE_FORMAT_VERSION, "settings": self.settings,
                "files": [_file_sig(a) + _file_sig(b) for a, b in self.pairs]}

    def load(self) -> tuple[Path, int] | None:
        """(data file, locked descriptor) of a valid cache, or None when missing, incomplete or stale."""
        exp = self.expected_manifest()
        n, (w, h) = len(self.pairs), self.size
        for _ in range(3):  # another process may replace the build between our two reads
            try:
                man = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError):
                return None
            if any(man.get(k) != v for k, v in exp.items()):
                return None
            data = self.folder / man.get("data_file", "")
            try:
                fd = _open_locked(data)
            except OSError:
                continue
            if os.fstat(fd).st_size == n * h * w * 4:
                return data, fd
            os.close(fd)
            return None
        return None

    def build(self, colors, decoder: str, num_workers: int = 0, desc: str = "cache") -> tuple[Path, int]:
        """Decode every pair into a new data file; returns (data file, locked descriptor)."""
        n, (w, h) = len(self.pairs), self.size
        nbytes = n * h * w * 4
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < nbytes + (16 << 20):
            raise OSError(28, f"needs {nbytes / 2**20:.0f} MB, {free / 2**20:.0f} MB free", str(self.folder))
        build_id = f"{os.getpid()}-{os.urandom(4).hex()}"
        final = self.folder / f"{self.key}-{build_id}.bin"
        part = final.with_suffix(".bin.partial")
        fd = None
        try:
            with open(part, "wb") as f:
                f.truncate(nbytes)
            fd = _open_locked(part)  # the lock follows the file through the rename
            jobs = [(str(a), str(b), self.size, colors, decoder, str(part), i, n)
                    for i, (a, b) in enumerate(self.pairs)]
            bar = tqdm(total=n, desc=f"decoding {desc} once into the cache", unit="img", leave=False)
            if num_workers and num_workers > 1 and n > 1:
                import multiprocessing as mp
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(min(num_workers, n)) as pool:
                    for _ in pool.imap_unordered(_cache_one, jobs, chunksize=1):
                        bar.update()
            else:
                for job in jobs:
                    _cache_one(job)
                    bar.update()
            bar.close()
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, final)
            man = self.expected_manifest()
            man.update(data_file=final.name, shape=[n, h, w], build_id=build_id)
            tmp = self.manifest_path.with_suffix(f".json.{build_id}.tmp")
            tmp.write_text(json.dumps(man))
            os.replace(tmp, self.manifest_path)
        except BaseException:
            if fd is not None:
                os.close(fd)
            for p in (part, final):
                p.unlink(missing_ok=True)
            raise
        self.remove_stale(keep=final)
        return final, fd

    def remove_stale(self, keep: Path) -> None:
        """Delete earlier builds of this key that no process has open (no lock held on them)."""
        for old in self.folder.glob(f"{self.key}-*.bin*"):  # killed builds leave .partial files
            if old == keep:
                continue
            try:
                fd = os.open(old, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use by a reader, or locks unsupported: leave it
            else:
                old.unlink(missing_ok=True)
            finally:
                os.close(fd)


def _cache_one(job) -> None:
    photo, mask, size, colors, decoder, data, i, n = job
    img, msk = load_pair(photo, mask, size, colors, decoder)
    w, h = size
    imgs = np.memmap(data, np.uint8, "r+", 0, (n, h, w, 3))
    msks = np.memmap(data, np.uint8, "r+", n * h * w * 3, (n, h, w))
    imgs[i], msks[i] = img, msk
    imgs.flush(), msks.flush()
    del imgs, msks


# --------------------------------------------------------------------------- dataset


class DroneDataset(Dataset):
    """Photo/mask pairs → (float 3×H×W normalised, int64 H×W mask), resized to ``size`` (W, H).

    ``img_path`` and ``mask_path`` are folders, ``X`` the image ids (file stems), as in the blog.
    With ``cache=True`` every pair is decoded once into a memory-mapped file under ``cache_dir``
    and read from there afterwards. With ``normalize=False`` photos come back as uint8 3×H×W,
    to be normalised later on the training device (:func:`normalize`).
    ``transform(image, mask)``, if given, is applied to the tensors last.
    """

    def __init__(self, img_path: str | os.PathLike, mask_path: str | os.PathLike, X: Sequence[str],
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, transform=None, *,
                 size: tuple[int, int] | str = (600, 400), class_dict: str | os.PathLike | None = None,
                 normalize: bool = True, cache: bool = False, cache_dir: str | os.PathLike | None = None,
                 num_workers: int = 0, decoder: str = "pil", name: str = "split"):
        self.img_path, self.mask_path = Path(img_path), Path(mask_path)
        self.ids = list(X)
        self.mean, self.std, self.transform = list(mean), list(std), transform
        self.size = parse_size(size)
        self.colors = read_class_dict(class_dict)
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
        photos = _list_by_id(self.img_path, PHOTO_EXTS)
        masks = _list_by_id(self.mask_path, (".png",))
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
                    "mask": "nearest", "colors": [list(c) for c in self.colors]}
        # the ids are part of the key: two datasets over one folder and split name with other ids
        # (e.g. other split lists) get their own files and never replace each other's
        key_src = json.dumps([str(self.img_path.resolve()), str(self.mask_path.resolve()), self.name,
                              settings, self.ids], sort_keys=True)
        key = f"{self.name}-{self.size[0]}x{self.size[1]}-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
        cache = _Cache(folder, key, settings, self.pairs, self.size)
        found = cache.load()
        if found is None:
            try:
                found = cache.build(self.colors, self.decoder, num_workers, desc=self.name)
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

    def arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached (photos N×H×W×3, masks N×H×W) uint8 arrays, or None when uncached."""
        if self._arrays is None and self.cache_path is not None:
            data, n = self.cache_path
            w, h = self.size
            self._arrays = (np.memmap(data, np.uint8, "r", 0, (n, h, w, 3)),
                            np.memmap(data, np.uint8, "r", n * h * w * 3, (n, h, w)))
        return self._arrays

    def __len__(self) -> int:
        return len(self.pairs)

    def raw(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 photo H×W×3 and mask H×W of sample idx, from the cache when there is one.

        Single items are read from the cache file with ``pread`` rather than through the
        memory map, so a process's resident memory stays flat however large the split is.
        """
        if self.cache_path is None:
            return load_pair(*self.pairs[idx], self.size, self.colors, self.decoder)
        data, n = self.cache_path
        if self._fd is None:
            self._fd = _open_locked(Path(data))
        w, h = self.size
        idx = range(n)[idx]  # negative indices, bounds
        img = np.frombuffer(os.pread(self._fd, h * w * 3, idx * h * w * 3), np.uint8).reshape(h, w, 3)
        msk = np.frombuffer(os.pread(self._fd, h * w, n * h * w * 3 + idx * h * w), np.uint8).reshape(h, w)
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
        return f"DroneDataset({self.name}: {len(self)} pairs, {self.size[0]}x{self.size[1]}, {cached})"


def import_drone_dataset(root: str | os.PathLike | None = None, size: tuple[int, int] | str = (600, 400),
                         splits: Sequence[str] | str = ("train", "test"), *, mean: Sequence[float] = MEAN,
                         std: Sequence[float] = STD, normalize: bool = True, cache: bool = True,
                         cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
                         splits_dir: str | os.PathLike | None = None, decoder: str = "pil"):
    """Load the dataset's splits as DroneDatasets; by default ``(train_set, test_set)`` as in the blog.

    ``splits`` picks others, e.g. ``("train", "val")`` or ``"trainval"`` (train ∪ val, for final
    runs); a single name returns a single dataset. The root is ``root``, else $DRONE_DATA_ROOT,
    else the blog's ``../dataset/semantic_drone_dataset``.
    """
    layout = find_dataset(root, splits_dir)
    names = [splits] if isinstance(splits, str) else list(splits)
    out = [DroneDataset(layout.image_dir, layout.mask_dir, read_split(n, layout.splits_dir), mean, std,
                        size=size, class_dict=layout.class_dict, normalize=normalize, cache=cache,
                        cache_dir=cache_dir, num_workers=num_workers, decoder=decoder, name=n) for n in names]
    return out[0] if isinstance(splits, str) else tuple(out)


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
    global torch generator, as a DataLoader's sampler does, so seeding repeats the order.
    """

    def __init__(self, dataset: DroneDataset, batch_size: int, shuffle: bool, device: torch.device,
                 drop_last: bool = False):
        arrays = dataset.arrays()
        if arrays is None:
            raise ValueError("DeviceBatchLoader needs a cached dataset (cache=True)")
        self.images = _upload(arrays[0], device).permute(0, 3, 1, 2)
        self.masks = _upload(arrays[1], device)
        self.batch_size, self.shuffle, self.drop_last, self.device = batch_size, shuffle, drop_last, device
        self.dataset = dataset

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images.index_select(0, idx).contiguous(), self.masks.index_select(0, idx).long()


def make_loader(dataset: DroneDataset, batch_size: int, shuffle: bool, device: torch.device | str = "cpu",
                num_workers: int = 0, gpu_fraction: float = 0.5, drop_last: bool = False):
    """The training/evaluation loader: GPU-resident batches when on CUDA and the cached split
    fits in ``gpu_fraction`` of free GPU memory, else a DataLoader (over the memory map when cached).
    """
    device = torch.device(device)
    arrays = dataset.arrays()
    if device.type == "cuda" and arrays is not None:
        free, _ = torch.cuda.mem_get_info(device)
        if arrays[0].nbytes + arrays[1].nbytes < gpu_fraction * free:
            return DeviceBatchLoader(dataset, batch_size, shuffle, device, drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------- demo data

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


# --------------------------------------------------------------------------- augmentation


class Augment:
    """Training augmentation of a batch where it sits (the GPU when training there).

    Per sample, photo and mask together: random scale (``scale``, log-uniform, relative to the input),
    a random ``crop`` (W, H) padded where the scaled photo is smaller (mask padding =
    ``ignore_index``), horizontal and vertical flips, 90° rotations (square crops only: nadir
    views have no "up") and mild colour jitter on the photo. Built on
    ``torchvision.transforms.v2`` with ``tv_tensors.Mask``, which keeps photo and mask aligned;
    the per-sample loop (independent crops within one batch), the scaling and rot90 are ours.
    Takes uint8 photos B×3×H×W and int64 masks B×H×W; returns the same dtypes at the crop size.
    """

    def __init__(self, crop: tuple[int, int] = (384, 384), scale: tuple[float, float] = (0.5, 2.0),
                 flips: bool = True, rot90: bool = True, color: float = 0.2, ignore_index: int = 255):
        self.crop, self.scale, self.flips, self.color, self.ignore_index = tuple(crop), scale, flips, color, ignore_index
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
        # v2's mask resize samples with 'nearest', half a pixel off the photo's bilinear grid;
        # 'nearest-exact' keeps the two on the same pixel centres, so this step is ours.
        lo, hi = math.log(self.scale[0]), math.log(self.scale[1])
        s = math.exp(lo + (hi - lo) * float(torch.rand(())))
        size = (max(1, round(x.shape[-2] * s)), max(1, round(x.shape[-1] * s)))
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

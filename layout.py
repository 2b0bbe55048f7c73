"""Where the dataset is: the three drone layouts (Kaggle archive, its inner folder, the TU Graz
download) and the generic layout for your own data (images/, masks/, classes.csv), the class set
(``ClassSet``: names, colours, ignored rows), the split lists (fixed, or a seeded split where a
dataset has none), and the errors that say what is missing.

Nothing here reads a photo; datautils.py does (and re-exports these names).
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basics import CLASS_COLORS, CLASS_NAMES, InputError, atomic_write

__all__ = ["DatasetError", "MissingSplit", "DatasetLayout", "ClassSet", "DRONE_CLASSES", "IGNORE", "find_dataset",
           "read_class_dict", "read_classes", "drone_classes", "read_split", "seeded_split", "write_split", "list_by_id",
           "DEFAULT_ROOT", "SPLITS_DIR", "DATASET_HELP", "SPLIT_FRACTIONS"]

#: The label of pixels that are never trained on and never scored (also the crop padding).
IGNORE = 255
#: train/val/test shares of the seeded split made for a dataset without split lists.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

DEFAULT_ROOT = Path("../dataset/semantic_drone_dataset")
#: The fixed train/val/test id lists shipped with the repository.
SPLITS_DIR = Path(__file__).resolve().parent / "splits"

DATASET_HELP = """\
Get the Semantic Drone Dataset from TU Graz (https://www.tugraz.at/index.php?id=22387, free for
non-commercial research) or its common Kaggle mirror ("Aerial Semantic Segmentation Drone
Dataset", bulentsiyah/semantic-drone-dataset). Layouts accepted:
  <archive>/dataset/semantic_drone_dataset/{original_images,label_images_semantic}/  (Kaggle archive root)
  <...>/semantic_drone_dataset/{original_images,label_images_semantic}/              (that folder itself)
  <...>/training_set/{images,gt/semantic/label_images}/                              (TU Graz download)
  <root>/{images,masks}/ + <root>/classes.csv [+ <root>/splits/]                      (your own data)
Point to it with --data-root PATH or the environment variable DRONE_DATA_ROOT.
Without the dataset, try the pipeline on generated data: python run_single_conv.py --demo"""


class DatasetError(InputError):
    """Bad or missing input data. The message names the file or folder and the fix."""


class MissingSplit(DatasetError):
    """A split list (e.g. val.txt) that the dataset does not have; ``split`` names it."""

    def __init__(self, message: str, split: str):
        super().__init__(message)
        self.split = split



@dataclass(frozen=True)
class ClassSet:
    """The classes of a dataset, as the rows of its class file: name and colour of each row, and
    whether the row is ignored (its pixels become :data:`IGNORE`: never trained on, never scored).
    The model's classes are the rows not ignored, numbered 0..N-1 in file order; an index mask's
    pixel value is a row number, a colour mask's colour is a row's colour."""

    row_names: tuple[str, ...]
    row_colors: tuple[tuple[int, int, int], ...]
    row_ignored: tuple[bool, ...] = ()
    path: str | None = None  # the class file, named in error messages

    def __post_init__(self):
        if not self.row_ignored:
            object.__setattr__(self, "row_ignored", (False,) * len(self.row_names))

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the model's classes (rows not ignored), in id order."""
        return tuple(n for n, ig in zip(self.row_names, self.row_ignored) if not ig)

    @property
    def colors(self) -> tuple[tuple[int, int, int], ...]:
        """Colours of the model's classes, in id order."""
        return tuple(c for c, ig in zip(self.row_colors, self.row_ignored) if not ig)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def row_to_id(self) -> np.ndarray:
        """Class id (or IGNORE) of every row: what an index mask's values become."""
        ids, next_id = [], 0
        for ig in self.row_ignored:
            ids.append(IGNORE if ig else next_id)
            next_id += 0 if ig else 1
        return np.asarray(ids, dtype=np.uint8)

    def where(self) -> str:
        return self.path or "the built-in drone classes"

    def to_dict(self) -> dict:
        """Names and colours of the model's classes: what checkpoints, reports and ONNX files store."""
        return {"names": list(self.names), "colors": [list(c) for c in self.colors]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ClassSet":
        """The class set :meth:`to_dict` wrote; the drone classes for checkpoints that have none."""
        if not d:
            return DRONE_CLASSES
        return cls(tuple(d["names"]), tuple(tuple(int(v) for v in c) for c in d["colors"]))


#: The Semantic Drone Dataset's 23 classes (its class dict's 24th row, "conflicting", never occurs).
DRONE_CLASSES = ClassSet(CLASS_NAMES, CLASS_COLORS)


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's photos, masks, class file and split lists are (``splits_dir`` None: the
    dataset has none, and a seeded split is made)."""

    root: Path
    kind: str  # "kaggle-archive", "kaggle-folder", "tugraz" or "generic"
    image_dir: Path
    mask_dir: Path
    class_dict: Path | None
    splits_dir: Path | None

    def classes(self, override: str | os.PathLike | None = None) -> ClassSet:
        """The class set: ``override`` (--classes) when given, else the layout's own: the generic
        layout's classes.csv, or the drone classes (colours from its class dict)."""
        if override is not None:
            return read_classes(override)
        if self.kind == "generic":
            if self.class_dict is None:
                raise DatasetError(f"{self.root}: no classes.csv; write one row per class in id order "
                                   "(name,r,g,b[,ignore]) or pass --classes FILE")
            return read_classes(self.class_dict)
        return drone_classes(self.class_dict)


def list_by_id(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
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
        raise DatasetError(f"No dataset found at {path.resolve()} ({where}): the folder {state}; expected the "
                           "Semantic Drone Dataset in one of its layouts, or your own data as images/, masks/ and "
                           f"classes.csv.\n" + DATASET_HELP)
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
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        return DatasetLayout(root, "generic", root / "images", root / "masks", _first_existing(root / "classes.csv"),
                             Path(splits_dir) if splits_dir else _first_existing(root / "splits"))
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


def drone_classes(class_dict: str | os.PathLike | None = None) -> ClassSet:
    """The 23 drone classes, their colours from the dataset's class dict when given (its 24th
    row, "conflicting", never occurs and is left out), else the built-in ones."""
    if class_dict is None:
        return DRONE_CLASSES
    colors = read_class_dict(class_dict)[:len(CLASS_NAMES)]
    return ClassSet(CLASS_NAMES, tuple(colors), path=str(class_dict))


def read_classes(path: str | os.PathLike) -> ClassSet:
    """A class file: one row per class in id order, ``name,r,g,b[,ignore]`` (a header line is
    optional; ``ignore`` is 1/true/yes/ignore for rows whose pixels are never trained on or
    scored, e.g. an "unlabelled" colour). Bad rows stop with a message naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: class file not found; write one row per class (name,r,g,b[,ignore]) "
                           "or point --classes to it")
    names, colors, ignored = [], [], []
    try:
        lines = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read the class file ({e}); expected rows name,r,g,b[,ignore]") from None
    for n, row in enumerate(lines, 1):
        row = [v.strip() for v in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        if n == 1 and (row[0].lower() in ("name", "class", "class_name", "classname", "label")
                       or [v.lower() for v in row[1:4]] == ["r", "g", "b"]):
            continue  # header
        if len(row) < 4:
            raise DatasetError(f"{path}, line {n}: {','.join(row)!r} has {len(row)} column(s); each row needs "
                               "name,r,g,b (and optionally ignore)")
        try:
            rgb = tuple(int(v) for v in row[1:4])
            if not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except ValueError:
            raise DatasetError(f"{path}, line {n}: colour {','.join(row[1:4])!r} of {row[0]!r} is not three "
                               "integers 0..255") from None
        flag = row[4].lower() if len(row) > 4 else ""
        if flag not in ("", "0", "false", "no", "1", "true", "yes", "ignore"):
            raise DatasetError(f"{path}, line {n}: ignore column {row[4]!r}: write 1 (ignore) or leave it empty")
        for seen, value, what in ((names, row[0], "name"), (colors, rgb, "colour")):
            if value in seen:
                raise DatasetError(f"{path}, line {n}: {what} {value!r} appears twice (rows {seen.index(value) + 1} "
                                   f"and {len(seen) + 1} of the classes); every class needs its own name and colour")
        names.append(row[0])
        colors.append(rgb)
        ignored.append(flag in ("1", "true", "yes", "ignore"))
    if not names or all(ignored):
        raise DatasetError(f"{path}: no classes to train (rows name,r,g,b[,ignore], at least one not ignored)")
    if len(names) > IGNORE - 1:  # 254 and 255 are taken: an unknown colour, and ignored pixels
        raise DatasetError(f"{path}: {len(names)} rows; at most {IGNORE - 1} fit 8-bit masks")
    return ClassSet(tuple(names), tuple(colors), tuple(ignored), str(path))


def seeded_split(ids: list[str], seed: int = 0, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
                 ) -> dict[str, list[str]]:
    """train/val/test id lists from the sorted ids, shuffled with ``seed`` (80/10/10 by default;
    val and test get at least one id each when there are three or more)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    return {"train": sorted(order[n_val + n_test:]), "val": sorted(order[:n_val]),
            "test": sorted(order[n_val:n_val + n_test])}


def write_split(splits: dict[str, list[str]], folder: str | os.PathLike) -> Path:
    """Write split lists as ``folder/<name>.txt`` (one id a line, atomically); returns the folder."""
    folder = Path(folder)
    for name, ids in splits.items():
        with atomic_write(folder / f"{name}.txt") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids))
    return folder


def read_split(name: str, splits_dir: str | os.PathLike = SPLITS_DIR) -> list[str]:
    """Image ids of a split ('train', 'val', 'test'; 'trainval' is train followed by val)."""
    if name == "trainval":
        return read_split("train", splits_dir) + read_split("val", splits_dir)
    path = Path(splits_dir) / f"{name}.txt"
    if not path.is_file():
        raise MissingSplit(f"{path}: split list not found; splits are train, val, test, trainval.", name)
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: the {name} split is empty; list its image ids one a line, or delete the "
                           "file to leave that split out")
    return ids

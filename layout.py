"""Where the dataset is: the three on-disk layouts (Kaggle archive, its inner folder, the TU Graz
download), the class colours and the fixed split lists, and the errors that say what is missing.

Nothing here reads a photo; datautils.py does (and re-exports these names).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from basics import CLASS_COLORS, InputError

__all__ = ["DatasetError", "MissingSplit", "DatasetLayout", "find_dataset", "read_class_dict", "read_split",
           "list_by_id", "DEFAULT_ROOT", "SPLITS_DIR", "DATASET_HELP"]

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
class DatasetLayout:
    """Where a dataset's photos, masks, class dict and split lists are."""

    root: Path
    kind: str  # "kaggle-archive", "kaggle-folder" or "tugraz"
    image_dir: Path
    mask_dir: Path
    class_dict: Path | None
    splits_dir: Path


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

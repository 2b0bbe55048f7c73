"""Where the dataset is: the three drone layouts (Kaggle archive, its inner folder, the TU Graz
download), the generic layout for your own data (images/, masks/, classes.csv), and two layouts of
large georeferenced scenes (orthomosaics) that are cut into training windows: the generic layout
holding GeoTIFFs ("scenes") and the DroneDeploy segmentation benchmark ("dronedeploy"). Also the
class set (``ClassSet``: names, colours, ignored rows), the split lists (fixed, or a seeded split
where a dataset has none; by scene for scenes), and the errors that say what is missing.

Nothing here reads a photo (datautils.py does, and cuts the scenes); a TIFF's header is read to
tell a georeferenced scene from a photo, with rasterio imported only then. The ground metres of a
raster's CRS units (:func:`metres_per_unit`) live here too, so that cutting scenes for training
and predicting orthomosaics (ortho.py) measure one GSD the same way.
"""
from __future__ import annotations

import csv
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from basics import CLASS_COLORS, CLASS_NAMES, InputError, atomic_write

__all__ = ["DatasetError", "MissingSplit", "DatasetLayout", "ClassSet", "DRONE_CLASSES", "IGNORE", "find_dataset",
           "read_class_dict", "read_classes", "drone_classes", "read_split", "seeded_split", "write_split", "list_by_id",
           "DEFAULT_ROOT", "SPLITS_DIR", "DATASET_HELP", "SPLIT_FRACTIONS", "SCENE_KINDS", "DRONEDEPLOY_CLASSES",
           "DRONEDEPLOY_SPLITS", "is_georeferenced", "list_scenes", "scene_split_lists", "scene_of_window", "metres_per_unit", "M_PER_DEGREE"]

#: The label of pixels that are never trained on and never scored (also the crop padding).
IGNORE = 255
#: train/val/test shares of the seeded split made for a dataset without split lists.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

DEFAULT_ROOT = Path("../dataset/semantic_drone_dataset")
#: The fixed train/val/test id lists shipped with the repository.
SPLITS_DIR = Path(__file__).resolve().parent / "splits"
#: The DroneDeploy benchmark's official scene split (scene ids), used for the scenes a root holds.
DRONEDEPLOY_SPLITS = SPLITS_DIR / "dronedeploy"
#: Layouts of large scenes (orthomosaics), cut into windows before training (datautils.cut_scenes).
SCENE_KINDS = ("scenes", "dronedeploy")
#: Scene rasters in the generic layout, by suffix (a photo folder may hold plain TIFFs too).
_SCENE_EXTS = (".tif", ".tiff")
#: Label rasters of scenes in the generic layout (masks/<scene stem>.png or .tif).
_LABEL_EXTS = (".png", ".tif", ".tiff")

DATASET_HELP = """\
Get the Semantic Drone Dataset from TU Graz (https://www.tugraz.at/index.php?id=22387, free for
non-commercial research) or its common Kaggle mirror ("Aerial Semantic Segmentation Drone
Dataset", bulentsiyah/semantic-drone-dataset). Layouts accepted:
  <archive>/dataset/semantic_drone_dataset/{original_images,label_images_semantic}/  (Kaggle archive root)
  <...>/semantic_drone_dataset/{original_images,label_images_semantic}/              (that folder itself)
  <...>/training_set/{images,gt/semantic/label_images}/                              (TU Graz download)
  <root>/{images,masks}/ + <root>/classes.csv [+ <root>/splits/]                      (your own data)
  <root>/{images/*.tif GeoTIFF scenes,masks}/ + <root>/classes.csv                  (your own orthomosaics)
  <root>/images/<scene>-ortho.tif + <root>/labels/<scene>-label.png [+ index.csv]    (DroneDeploy benchmark)
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

#: The DroneDeploy segmentation benchmark's classes (RGB colour labels, 10 cm pixels); its magenta
#: IGNORE colour is an ignored row. A classes.csv in the dataset root, or --classes, replaces them.
DRONEDEPLOY_CLASSES = ClassSet(
    ("BUILDING", "CLUTTER", "VEGETATION", "WATER", "GROUND", "CAR", "IGNORE"),
    ((230, 25, 75), (145, 30, 180), (60, 180, 75), (245, 130, 48), (255, 255, 255), (0, 130, 200), (255, 0, 255)),
    (False,) * 6 + (True,), path="the built-in DroneDeploy classes")


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's photos, masks, class file and split lists are (``splits_dir`` None: the
    dataset has none, and a seeded split is made).

    Scene layouts (``kind`` in :data:`SCENE_KINDS`) as found point at the scenes themselves, their
    split lists holding scene ids; ``datautils.cut_scenes`` returns the same layout pointing at the
    windows cut from them (``windows``: that folder; ``image_dir``, ``mask_dir`` and ``splits_dir``
    there, lists of window ids; ``gsd``: metres per window pixel, None in pixel units), which the
    photo pipeline then reads like any other."""

    root: Path
    kind: str  # "kaggle-archive", "kaggle-folder", "tugraz", "generic", "scenes" or "dronedeploy"
    image_dir: Path
    mask_dir: Path
    class_dict: Path | None
    splits_dir: Path | None
    windows: Path | None = None
    gsd: float | None = None

    @property
    def by_scene(self) -> bool:
        """Whether samples come from scenes (cut into windows): a scene is never split across splits."""
        return self.kind in SCENE_KINDS

    @property
    def group(self) -> Callable[[str], str] | None:
        """What a seeded split keeps together: the scene of a window id (scene layouts), else None."""
        return scene_of_window if self.by_scene else None

    def classes(self, override: str | os.PathLike | None = None) -> ClassSet:
        """The class set: ``override`` (--classes) when given, else the layout's own: the generic
        layout's classes.csv, the DroneDeploy classes (or a classes.csv in its root), or the drone
        classes (colours from its class dict)."""
        if override is not None:
            return read_classes(override)
        if self.kind == "dronedeploy":
            return read_classes(self.class_dict) if self.class_dict is not None else DRONEDEPLOY_CLASSES
        if self.kind in ("generic", "scenes"):
            if self.class_dict is None:
                raise DatasetError(f"{self.root}: no classes.csv; write one row per class in id order "
                                   "(name,r,g,b[,ignore]) or pass --classes FILE")
            return read_classes(self.class_dict)
        return drone_classes(self.class_dict)


def list_by_id(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """The files of ``folder`` with a suffix in ``exts`` (any case; hidden files left out), by id
    (the name without its suffix). Two files of one id (a.jpg and a.png, masks/a.png and
    masks/a.tif) stop with one line naming both: which one pairs would otherwise be chance."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            if p.stem in out:
                raise DatasetError(f"{out[p.stem]} and {p}: two files of the id {p.stem} in {folder}; remove or "
                                   "rename one of them (files pair by their name without its extension)")
            out[p.stem] = p
    return out


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def find_dataset(root: str | os.PathLike | DatasetLayout | None = None,
                 splits_dir: str | os.PathLike | None = None) -> DatasetLayout:
    """Resolve the dataset root (argument, then $DRONE_DATA_ROOT, then the blog's path).

    Raises DatasetError saying where it looked and how to get the data when nothing is found.
    A :class:`DatasetLayout` (e.g. scenes cut into windows) is returned as it is.
    """
    if isinstance(root, DatasetLayout):
        return root
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
    elif (root / "images").is_dir() and any((root / "images").glob("*-ortho.tif")) and \
            ((root / "labels").is_dir() or (root / "index.csv").is_file()):
        # the DroneDeploy benchmark: its scene names, its colours, its official split
        return DatasetLayout(root, "dronedeploy", root / "images", root / "labels", _first_existing(root / "classes.csv"),
                             Path(splits_dir) if splits_dir else (_first_existing(root / "splits") or DRONEDEPLOY_SPLITS))
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        kind = "scenes" if _holds_scenes(root / "images") else "generic"
        return DatasetLayout(root, kind, root / "images", root / "masks", _first_existing(root / "classes.csv"),
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


def seeded_split(ids: list[str], seed: int = 0, fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
                 group: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """train/val/test id lists from the sorted ids, shuffled with ``seed`` (80/10/10 by default;
    val and test get at least one id each when there are three or more). With ``group`` (e.g.
    :func:`scene_of_window`) the groups are split that way and each id goes where its group went:
    the windows of one scene never straddle two splits."""
    if group is not None:
        parts = seeded_split(sorted({group(i) for i in ids}), seed, fractions)
        where = {g: name for name, gs in parts.items() for g in gs}
        return {name: sorted(i for i in ids if where[group(i)] == name) for name in parts}
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


# --------------------------------------------------------------------------- scenes (orthomosaics)


def is_georeferenced(path: str | os.PathLike) -> bool:
    """Whether a raster lies on the ground (a CRS, a geotransform or ground control points): then it is
    a scene, not a photo, for training (here) and for predict.py (ortho.py) alike. Only the header
    is read; rasterio is imported only here. An unreadable file is no scene (the photo path names it)."""
    import warnings

    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a plain TIFF is what is asked about
            with rasterio.open(path) as src:
                return src.crs is not None or not src.transform.is_identity or bool(src.gcps[0])
    except Exception:  # not readable as a raster: the photo path names it
        return False


def _holds_scenes(folder: Path) -> bool:
    """Whether the generic layout's images/ holds georeferenced TIFFs (scenes) rather than photos."""
    return any(is_georeferenced(p) for p in list_by_id(folder, _SCENE_EXTS).values())


def _index_scenes(index: Path) -> list[str]:
    """The scene ids of a DroneDeploy index.csv: a header line, then the space-separated second field."""
    try:
        lines = index.read_text().splitlines()[1:]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{index}: cannot read the scene index ({e}); restore it from the download or delete "
                           "it (the scenes are then the images found)") from None
    return [f[1] for f in (line.split() for line in lines) if len(f) > 1]


def list_scenes(layout: DatasetLayout) -> dict[str, tuple[Path, Path]]:
    """The scenes of a scene layout, sorted by id: scene id -> (image raster, label raster).

    DroneDeploy: images/<id>-ortho.tif with labels/<id>-label.png (index.csv, when present, lists the
    scenes: an image it does not list stops); the generic layout: images/<id>.tif with
    masks/<id>.png or .tif. A scene without its label stops with one line naming the file (as do,
    in the generic layout, a label without its scene and a photo among the scenes)."""
    root = layout.root
    images = root / "images"
    if layout.kind == "dronedeploy":
        labels = root / "labels"
        found = {p.name[:-len("-ortho.tif")]: p for p in sorted(images.glob("*-ortho.tif")) if not p.name.startswith(".")}
        index = root / "index.csv"
        if index.is_file():
            listed = set(_index_scenes(index))
            extra = sorted(set(found) - listed)
            if extra:
                raise DatasetError(f"{found[extra[0]]}: scene {extra[0]} is not in {index} ({len(extra)} image(s) not "
                                   "listed there); add a line for it to the index, or remove the image")
            found = {k: v for k, v in found.items() if k in listed}
        pairs = {s: (found[s], labels / f"{s}-label.png") for s in sorted(found)}
    else:
        labels = root / "masks"
        found = list_by_id(images, _SCENE_EXTS)
        photos = [p for p in sorted(images.iterdir()) if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        if photos:
            raise DatasetError(f"{images}: holds georeferenced scenes (.tif) and photos ({photos[0].name}, ...); put "
                               "the photos in a dataset root of their own")
        masks = list_by_id(labels, _LABEL_EXTS)
        lone = sorted(set(masks) - set(found))
        if lone:
            raise DatasetError(f"{masks[lone[0]]}: a label raster without its scene (no {images / (lone[0] + '.tif')}; "
                               f"{len(lone)} such label(s)); add the scene or remove the label")
        pairs = {s: (found[s], masks.get(s, labels / f"{s}.png")) for s in sorted(found)}
    if not pairs:
        raise DatasetError(f"{images}: no scenes found; expected {'<scene>-ortho.tif' if layout.kind == 'dronedeploy' else '<scene>.tif'} "
                           "GeoTIFFs" + (" listed in index.csv" if (root / "index.csv").is_file() else ""))
    for scene, (image, label) in pairs.items():
        if not label.is_file():
            raise DatasetError(f"{image}: scene {scene} has no label raster ({label} not found); add it, on the "
                               "scene's pixel grid, or remove the scene")
    return pairs


def scene_split_lists(layout: DatasetLayout, scenes: dict[str, tuple[Path, Path]] | None = None
                      ) -> dict[str, list[str]] | None:
    """The split lists of a scene layout as scene ids (only lists with a scene found; None: the
    layout has no lists, and a seeded split by scene is made). The DroneDeploy benchmark's own
    lists are kept to the scenes the root holds; other lists must name scenes that exist. Every
    scene must be in exactly one list: a scene in none, or in two, stops with one line."""
    if layout.splits_dir is None:
        return None
    scenes = list_scenes(layout) if scenes is None else scenes
    folder = Path(layout.splits_dir)
    official = folder.resolve() == DRONEDEPLOY_SPLITS.resolve()
    lists: dict[str, list[str]] = {}
    for name in ("train", "val", "test"):
        path = folder / f"{name}.txt"
        if not path.is_file():
            continue
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        twice = next((i for n, i in enumerate(ids) if i in ids[:n]), None)
        if twice is not None:  # its windows would be trained on, or scored, twice
            raise DatasetError(f"{path}: scene {twice} is listed twice; list each scene once (its windows would "
                               "count twice in training and in the metrics)")
        missing = [i for i in ids if i not in scenes]
        if missing and not official:  # the benchmark's lists name all its scenes; a download may hold some
            raise DatasetError(f"{path}: {len(missing)} scene(s) of the {name} list are not in {layout.root} "
                               f"(first: {missing[0]}); split lists of scenes hold scene ids, one a line")
        if ids := [i for i in ids if i in scenes]:
            lists[name] = ids
    seen: dict[str, str] = {}
    for name, ids in lists.items():
        for i in ids:
            if i in seen and seen[i] != name:
                raise DatasetError(f"{folder}: scene {i} is in both the {seen[i]} and the {name} list; a scene "
                                   "belongs to one split (its windows would leak from one split into another)")
            seen[i] = name
    unlisted = [s for s in scenes if s not in seen]
    if unlisted:
        start = f" (copy {DRONEDEPLOY_SPLITS} to {layout.root / 'splits'} as a start)" if official else ""
        raise DatasetError(f"{layout.root}: scene {unlisted[0]} ({len(unlisted)} scene(s) in all) is in none of the "
                           f"split lists in {folder}: add it to train.txt, val.txt or test.txt there{start}, or "
                           "remove it")
    return lists


#: Metres per degree of latitude (and of longitude at the equator), for rasters in degrees.
M_PER_DEGREE = 111_320.0


def _is_mercator(crs) -> bool:
    """Whether a projected CRS is a (normal-aspect) Mercator projection, whose units are ground
    metres only at its true-scale latitude: PROJ's method ``merc``, which EPSG:3857, 3395, 3785,
    900913 and ESRI:102100 all are, tested on the CRS's PROJ parameters rather than on names
    (UTM is a *Transverse* Mercator, ``utm``/``tmerc``, true to 0.04 %: not scaled)."""
    try:
        if crs.to_epsg() in (3857, 3395, 3785, 900913, 102100, 102113):
            return True
        return crs.to_dict().get("proj") == "merc"
    except Exception:  # a CRS PROJ cannot describe: taken at its units
        return False


def _mercator_scale(src) -> float:
    """Ground metres per Mercator unit at the raster's centre: cos(latitude) / k0 (the sphere's
    formula: exact for Web Mercator, within 0.2 % for the ellipsoidal EPSG:3395)."""
    crs, b = src.crs, src.bounds
    cx, cy = (b.left + b.right) / 2, (b.top + b.bottom) / 2
    params = crs.to_dict()
    k0 = float(params.get("k", params.get("k_0", 1.0)))
    if "lat_ts" in params:  # Mercator (2SP): true scale on the parallel lat_ts
        k0 *= math.cos(math.radians(float(params["lat_ts"])))
    try:
        from rasterio.warp import transform

        lat = transform(crs, "EPSG:4326", [cx], [cy])[1][0]
    except Exception:  # PROJ cannot invert it: the sphere's inverse (false northing and radius from the CRS)
        radius = float(params.get("a", params.get("R", 6378137.0))) * k0
        lat = math.degrees(2 * math.atan(math.exp((cy - float(params.get("y_0", 0.0))) / radius)) - math.pi / 2)
    return math.cos(math.radians(lat)) / k0


def metres_per_unit(src) -> tuple[float, float] | None:
    """Ground metres per CRS unit along x and y at a raster's centre (``src``: an open rasterio
    dataset), the one scale both cutting scenes (datautils) and predicting rasters (ortho.py) use:
    a projected CRS's unit (× cos(latitude) for Mercator projections, see :func:`_is_mercator`);
    about 111 km per degree for a geographic CRS (x × cos(latitude)); None without a CRS, or with
    one whose units are unknown (the raster's pixels are then the unit)."""
    crs = src.crs
    if crs is None:
        return None
    try:
        if crs.is_projected:
            f = float(crs.linear_units_factor[1])
            if _is_mercator(crs):
                f *= _mercator_scale(src)
            return f, f
        if crs.is_geographic:
            lat = (src.bounds.top + src.bounds.bottom) / 2
            return M_PER_DEGREE * max(math.cos(math.radians(lat)), 1e-6), M_PER_DEGREE
    except Exception:  # a CRS without usable units: treated as none
        pass
    return None


_WINDOW_ID = re.compile(r"^(.*)_r\d+_c\d+$")


def scene_of_window(window_id: str) -> str:
    """The scene a window id (``<scene>_r<row>_c<col>``) was cut from."""
    m = _WINDOW_ID.match(window_id)
    return m.group(1) if m else window_id

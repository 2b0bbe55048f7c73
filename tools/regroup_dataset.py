"""Turn a drone-layout dataset into the generic layout with a coarser class set (your-own-data form).

    python tools/regroup_dataset.py ../shared/data/drone-1500x1000 /tmp/drone6 --copy-splits

Writes ``DST/images/<id>.jpg`` (hard links, or symbolic links across file systems: no copy of the
photos), ``DST/masks/<id>.png`` (colour PNGs in the group colours), ``DST/classes.csv`` (6 groups
and an ignored "unlabelled" row) and, with --copy-splits, the source's split lists (so a model
trained on the source's train ids never saw the new val images). Without them the training
scripts make a seeded 80/10/10 split. Used by the tests (on generated data) and for the README's
own-data measurement; nothing of the dataset enters the repository.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from basics import CLASS_NAMES, atomic_write  # noqa: E402
from datautils import PHOTO_EXTS, load_mask  # noqa: E402
from layout import find_dataset, list_by_id, read_split  # noqa: E402

#: group name, colour, and the drone classes it holds; "unlabelled" is ignored
GROUPS = (
    ("unlabelled", (0, 0, 0), ("unlabeled",)),
    ("ground", (128, 64, 128), ("paved-area", "dirt", "gravel", "rocks")),
    ("vegetation", (0, 102, 0), ("grass", "vegetation", "tree", "bald-tree")),
    ("water", (28, 42, 168), ("water", "pool")),
    ("structure", (70, 70, 70), ("roof", "wall", "window", "door", "fence", "fence-pole", "ar-marker", "obstacle")),
    ("vehicle", (9, 143, 150), ("car", "bicycle")),
    ("person-animal", (255, 22, 96), ("person", "dog")),
)
IGNORED = ("unlabelled",)


def group_lut() -> np.ndarray:
    """Drone class id → group row."""
    lut = np.zeros(256, np.uint8)
    for row, (_, _, members) in enumerate(GROUPS):
        for name in members:
            lut[CLASS_NAMES.index(name)] = row
    return lut


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            shutil.copy2(src, dst)


def regroup(src_root: str | os.PathLike, dst: str | os.PathLike, copy_splits: bool = False) -> Path:
    """Write the generic-layout copy of ``src_root`` with the 6 groups to ``dst``; returns it."""
    layout = find_dataset(src_root)
    dst = Path(dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(exist_ok=True)
    photos = list_by_id(layout.image_dir, PHOTO_EXTS)
    masks = list_by_id(layout.mask_dir, (".png",))
    lut, palette = group_lut(), np.asarray([c for _, c, _ in GROUPS], np.uint8)
    classes = layout.classes()
    for i in tqdm(sorted(photos), desc="regrouping", unit="img"):
        _link(photos[i], dst / "images" / photos[i].name)
        ids, _ = load_mask(masks[i], colors=classes)
        with atomic_write(dst / "masks" / f"{i}.png") as tmp:
            Image.fromarray(palette[lut[ids]]).save(tmp, compress_level=1)
    with atomic_write(dst / "classes.csv") as tmp:
        tmp.write_text("name,r,g,b,ignore\n" + "".join(
            f"{name},{r},{g},{b},{1 if name in IGNORED else ''}\n" for name, (r, g, b), _ in GROUPS))
    if copy_splits:
        (dst / "splits").mkdir(exist_ok=True)
        for name in ("train", "val", "test"):
            try:
                ids = [i for i in read_split(name, layout.splits_dir) if i in photos]
            except Exception:
                continue
            if ids:
                with atomic_write(dst / "splits" / f"{name}.txt") as tmp:
                    tmp.write_text("".join(f"{i}\n" for i in ids))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a drone-layout dataset root")
    p.add_argument("dst", help="the generic-layout folder to write (outside the repository)")
    p.add_argument("--copy-splits", action="store_true", help="copy the source's split lists (ids present only)")
    args = p.parse_args()
    print(f"wrote {regroup(args.src, args.dst, args.copy_splits)}")


if __name__ == "__main__":
    main()

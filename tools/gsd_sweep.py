"""Which ground sampling distance should a model run at? Score it on labelled scenes at several.

    python tools/gsd_sweep.py --checkpoint best.pt --data-root ../shared/data/drone-1500x1000 \\
        --split val --scene-gsd 0.02 --factors 1.25,1.67,2,2.5,3,4,5 --work /tmp/gsd

Two steps, both through the code predict.py uses:

1. **Scenes.** Each photo of ``--split`` (the ids the checkpoint recorded for it where it has a
   record, e.g. own data split by seed without split lists; else the dataset's list) with its mask becomes a DroneDeploy-style scene in
   ``WORK/scenes``: ``images/<id>.tif``, an RGBA GeoTIFF in a projected CRS (UTM 33N) with the
   pixel ``--scene-gsd`` metres and a nodata border of ``--border`` pixels (alpha 0), and
   ``masks/<id>.png``, its label raster (class ids, 255 on the border and on ignored rows), with
   the dataset's ``classes.csv`` (the generic "scenes" layout: the same folder trains through
   ``run_experiment.py --data-root WORK/scenes``). The photos have no GSD of their own (they
   were taken 5-30 m above ground), so ``--scene-gsd`` is a nominal one: what the sweep finds is
   the best GSD *relative to* the scene's pixel.
2. **Sweep.** ``ortho.predict_raster`` runs the model at ``--scene-gsd`` times each factor
   (windows of the checkpoint's evaluation size, blended), writes the class map on the scene's
   own grid, and it is scored against the label raster at full resolution: one confusion matrix
   over all scenes per GSD (pixel accuracy and dataset-level mIoU, the ignored label and the
   checkpoint's --ignore-index left out, as in the training report; but against the photos' own
   full-resolution labels, where the training report scores at --score-size, default 600x400,
   and through windows that see the scene's nodata border: expect a point or two below the
   report at the training scale).

The reference factor (``--reference``, default the photos' width over the checkpoint's evaluation
width: 1500/600 = 2.5 for a model trained at 600x400 on the 1500x1000 copy) is the scale the model
was trained at, fixed before anything is scored; every row gives its mIoU minus the reference's
with a paired bootstrap interval over scenes (the same resamples for both), so a row can be read
against the training scale without the bias of comparing with the best of the same scores.

Prints a Markdown table (one row per GSD; the best mIoU marked) and writes ``WORK/gsd_sweep.json``
(per GSD: the metrics with 95 % bootstrap intervals over scenes, per-class IoU, windows and
seconds). Select on val, report on val:
the test split is for the final report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basics import InputError, atomic_write  # noqa: E402
from cli import run_cli  # noqa: E402
from datautils import MASK_EXTS, PHOTO_EXTS, load_pair, photo_size  # noqa: E402
from layout import IGNORE, ClassSet, find_dataset, list_by_id, read_split  # noqa: E402
from metrics import ConfusionMatrix, bootstrap_ci  # noqa: E402

__all__ = ["split_sources", "make_scenes", "score_class_map", "gsd_sweep"]

#: UTM 33N (Graz) and a false origin; scene k lies 10 km east of scene k-1 (no overlap)
CRS = "EPSG:32633"
ORIGIN = (500000.0, 5200000.0)


def _manifest_key(ids: list[str], photos: dict, masks: dict, classes: ClassSet, gsd: float, border: int) -> str:
    """What the scenes are made of: every photo's and mask's path and content, the class rows,
    the pixel and the border; a change in any of them makes the scenes anew."""
    def stamp(p: Path) -> list:  # the content: a copy that keeps size and mtime (cp -p) changes it too
        return [str(Path(p).resolve()), hashlib.sha256(Path(p).read_bytes()).hexdigest()]

    record = {"version": 2, "gsd": gsd, "border": border, "rows": [list(classes.row_names),
              [list(c) for c in classes.row_colors], list(classes.row_ignored)],
              "pairs": [[i, stamp(photos[i]), stamp(masks[i])] for i in ids]}
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


def split_sources(data_root: str | Path | None, split: str, limit: int | None = None,
                  ids: list[str] | None = None) -> tuple:
    """The dataset's layout, class set, the ids of ``split`` (``ids`` when given, e.g. the split a
    checkpoint recorded, else the dataset's split list; the first ``limit``), and the photo and
    mask file of every id."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: at least 1 photo (leave it out for the whole split)")
    layout = find_dataset(data_root)
    if not ids:
        ids = read_split(split, layout.splits_dir) if layout.splits_dir else None
    if not ids:
        raise InputError(f"{layout.root}: no {split} split list, and the checkpoint records none; pass a dataset "
                         "with split lists or a checkpoint of ours trained on this data")
    photos, masks = list_by_id(layout.image_dir, PHOTO_EXTS), list_by_id(layout.mask_dir, MASK_EXTS)
    missing = [i for i in ids if i not in photos or i not in masks]
    if missing:
        raise InputError(f"{layout.root}: {len(missing)} ids of the {split} split lack a photo or mask "
                         f"(e.g. {missing[0]}); pass a complete dataset")
    return layout, layout.classes(), ids[:limit] if limit else ids, photos, masks


def make_scenes(data_root: str | Path | None, split: str, out: str | Path, gsd: float, border: int = 64,
                limit: int | None = None, ids: list[str] | None = None
                ) -> tuple[list[tuple[Path, Path]], ClassSet, list[str]]:
    """Write each photo of ``split`` (the first ``limit``) as a georeferenced scene and its label
    raster under ``out`` (see the module docstring); returns the (scene, label) pairs, the class
    set and the ids. ``out/manifest.json`` records what they were made of: scenes made of the
    same files and settings are kept, any change makes them all anew."""
    import rasterio
    from affine import Affine

    if not (math.isfinite(gsd) and gsd > 0) or border < 0:
        raise InputError(f"--scene-gsd {gsd:g} / --border {border}: the pixel is > 0 metres and the border >= 0")
    layout, classes, ids, photos, masks = split_sources(data_root, split, limit, ids)
    out = Path(out)
    key = _manifest_key(ids, photos, masks, classes, gsd, border)
    manifest = out / "manifest.json"
    if out.exists() and any(out.iterdir()):
        if not manifest.is_file():
            raise InputError(f"{out}: a folder this tool did not write (no manifest.json); pass another --work")
        if json.loads(manifest.read_text()).get("key") != key:  # other photos, masks, classes or settings
            for name in ("images", "masks"):
                shutil.rmtree(out / name, ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    with atomic_write(manifest) as tmp:
        tmp.write_text(json.dumps({"key": key, "data_root": str(layout.root), "split": split, "ids": ids,
                                   "scene_gsd_m": gsd, "border": border}, indent=1))
    with atomic_write(out / "classes.csv") as tmp:  # the label rasters hold these class ids
        tmp.write_text("name,r,g,b\n" + "".join(f"{n},{c[0]},{c[1]},{c[2]}\n"
                                                for n, c in zip(classes.names, classes.colors)))
    pairs = []
    for k, i in enumerate(tqdm(ids, desc="scenes", unit="scene")):
        tif, png = out / "images" / f"{i}.tif", out / "masks" / f"{i}.png"
        pairs.append((tif, png))
        if tif.is_file() and png.is_file():  # written atomically under this manifest's key
            continue
        # photo upright per EXIF, its mask turned the same way; a size mismatch stops
        rgb, label = load_pair(photos[i], masks[i], None, classes)
        h, w = rgb.shape[0] + 2 * border, rgb.shape[1] + 2 * border
        bands = np.zeros((4, h, w), np.uint8)
        bands[:3, border:h - border, border:w - border] = rgb.transpose(2, 0, 1)
        bands[3, border:h - border, border:w - border] = 255
        lab = np.full((h, w), IGNORE, np.uint8)
        lab[border:h - border, border:w - border] = label
        transform = Affine(gsd, 0, ORIGIN[0] + 10000.0 * k, 0, -gsd, ORIGIN[1])
        with atomic_write(png) as tmp:
            Image.fromarray(lab).save(tmp, format="PNG")
        with atomic_write(tif) as tmp:
            with rasterio.open(tmp, "w", driver="GTiff", width=w, height=h, count=4, dtype="uint8", crs=CRS,
                               transform=transform, photometric="RGB", alpha="YES", tiled=True, blockxsize=256,
                               blockysize=256, compress="deflate") as d:
                d.write(bands)
    return pairs, classes, ids


def score_class_map(class_map: str | Path, label: str | Path, matrix: ConfusionMatrix) -> torch.Tensor:
    """Add a class map (predict.py's GeoTIFF) against its label raster (same grid) to ``matrix``
    and return the scene's own confusion matrix; a labelled pixel the class map left without
    data is an error (it would count as no class)."""
    import rasterio

    with rasterio.open(class_map) as d:
        pred = d.read(1)
    truth = np.asarray(Image.open(label))
    if pred.shape != truth.shape:
        raise InputError(f"{class_map}: {pred.shape[1]}x{pred.shape[0]} pixels, its labels {label} "
                         f"{truth.shape[1]}x{truth.shape[0]}; write the class map on the scene's grid (no --out-gsd)")
    labelled = truth < matrix.num_classes
    if (pred[labelled] >= matrix.num_classes).any():
        raise InputError(f"{class_map}: no class at {int((pred[labelled] >= matrix.num_classes).sum())} labelled "
                         "pixels (nodata inside the scene)")
    return matrix.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(truth.astype(np.int64)))


def gsd_sweep(model: torch.nn.Module, pairs: list[tuple[Path, Path]], classes: ClassSet, scene_gsd: float,
              factors: list[float], work: str | Path, *, tile: tuple[int, int], stats: tuple, overlap: float = 0.25,
              batch_size: int = 4, device: str = "cpu", ignore_index: int | None = None,
              reference: float | None = None) -> list[dict]:
    """Run the model on every scene at ``scene_gsd * f`` for each factor and score it: one
    confusion matrix over all scenes per GSD (``confusion``, rows truth), a 95 % bootstrap
    interval over scenes, and, given the ``reference`` factor (one of ``factors``), the interval of
    each row's mIoU minus the reference's on the same resamples (``miou_vs_reference_ci``, a
    paired comparison); returns one row per factor, the best mIoU marked ``best``."""
    if reference is not None and reference not in factors:
        raise InputError(f"--reference {reference:g} is not one of the factors {factors}")
    from ortho import predict_raster

    rows, mats = [], []
    for f in factors:
        gsd = scene_gsd * f
        out = Path(work) / "maps" / f"gsd-{gsd:.6g}"
        if out.exists():  # maps of another model must not be scored as this one's
            shutil.rmtree(out)
        matrix = ConfusionMatrix(classes.num_classes, ignore_index=ignore_index)
        t0, windows, first, per_scene = time.perf_counter(), 0, None, []
        for tif, png in tqdm(pairs, desc=f"GSD {gsd:g} m (x{f:g})", unit="scene"):
            summary = predict_raster(model, tif, out / tif.stem, classes=classes, tile=tile, overlap=overlap,
                                     gsd=gsd, batch_size=batch_size, device=device, stats=stats, progress=False)
            windows += summary["windows_run"]
            first = first or summary
            per_scene.append(score_class_map(summary["outputs"]["classes"], png, matrix))
        m = ConfusionMatrix.metrics_of(matrix.mat, classes.names, ignore_index)
        mats.append(torch.stack(per_scene))
        ci = bootstrap_ci(mats[-1], ignore_index=ignore_index)
        # the grid the model ran on: the asked GSD rounded to whole pixels over the scene
        rows.append({"factor": f, "gsd_m": gsd, "model_gsd_of_first_scene": first["model_gsd"],
                     "model_grid_of_first_scene": first["model_grid_size"], "windows": windows,
                     "seconds": time.perf_counter() - t0, "pixel_accuracy": m["pixel_accuracy"], "miou": m["miou"],
                     "pixel_accuracy_ci": ci["pixel_accuracy"], "miou_ci": ci["miou"],
                     "per_class_iou": m["per_class_iou"], "per_class_pixels": m["per_class_pixels"],
                     "confusion": matrix.mat.tolist()})
        shutil.rmtree(out)  # maps of tens of scenes per GSD: scored, not kept
    best = max(range(len(rows)), key=lambda k: rows[k]["miou"])
    ref = factors.index(reference) if reference is not None else None
    for row, mat in zip(rows, mats):
        row["best"] = row is rows[best]
        if ref is not None:
            row["reference"] = row is rows[ref]
            row["miou_vs_reference"] = row["miou"] - rows[ref]["miou"]
            row["miou_vs_reference_ci"] = bootstrap_ci(mat, ignore_index=ignore_index,
                                                       baseline=mats[ref])["miou_difference"]
    return rows


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
        if not values or any(not (math.isfinite(v) and v >= 1 / 16) for v in values):
            raise ValueError
    except ValueError:
        raise InputError(f"--factors {text!r}: write factors >= 1/16 separated by commas, e.g. 1,2,2.5,3 "
                         "(the scenes have no detail below 1/16 of their pixel)") from None
    return values


def _recorded_ids(path: str, split: str) -> list[str] | None:
    """The ids of ``split`` a checkpoint of ours recorded (None for .onnx or no record)."""
    if str(path).lower().endswith(".onnx"):
        return None
    from checkpoint import read_checkpoint

    return ((read_checkpoint(path, mmap=True).meta.split or {}).get("ids") or {}).get(split) or None


def _checkpoint_facts(path: str, ids: list[str], split: str, ignore_index: int | None) -> int | None:
    """The class left out of the scores (the run's --ignore-index where the checkpoint records
    it), after refusing scenes the checkpoint was trained on (a note where it cannot tell)."""
    unchecked = (f"note: {path} records no training split, so nothing checks that the {split} photos were not "
                 "trained on; make sure they were not")
    if str(path).lower().endswith(".onnx"):
        print(unchecked, file=sys.stderr)
        return ignore_index  # export.py's metadata holds no --ignore-index: the flag says it
    from checkpoint import read_checkpoint

    meta = read_checkpoint(path, mmap=True).meta
    if not (meta.split or {}).get("ids", {}).get("train"):
        print(unchecked, file=sys.stderr)
    trained = set((meta.split or {}).get("ids", {}).get("train", []))
    leaked = [i for i in ids if i in trained]
    if leaked:
        raise InputError(f"{path} was trained on {len(leaked)} of the {split} photos (e.g. {leaked[0]}); "
                         "score it on photos it never saw (its own val split)")
    recorded = (meta.config or {}).get("ignore_index", IGNORE)
    recorded = None if recorded == IGNORE else recorded
    if ignore_index is not None and ignore_index != recorded:
        raise InputError(f"--ignore-index {ignore_index}: {path} was trained with "
                         f"{'none' if recorded is None else recorded}; leave the flag out")
    return recorded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of ours (.pt) or an export.py .onnx file")
    p.add_argument("--data-root", default=None, help="a dataset with split lists (default: as run_experiment.py)")
    p.add_argument("--split", default="val", help="the photos made into scenes (select on val)")
    p.add_argument("--scene-gsd", type=float, default=0.02, help="the scenes' nominal pixel in metres")
    p.add_argument("--factors", default="1.25,1.67,2,2.5,3,4,5",
                   help="GSDs to run the model at, as multiples of --scene-gsd")
    p.add_argument("--reference", type=float, default=None,
                   help="the factor every row is compared with (default: the photos' width over the checkpoint's "
                        "evaluation width, the scale it was trained at; added to --factors)")
    p.add_argument("--border", type=int, default=64, help="nodata border around each scene, pixels")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos of the split")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ignore-index", type=int, default=None,
                   help="a class left out of the scores: a .pt checkpoint's own (its run's --ignore-index) is "
                        "used; an .onnx file records none, so pass it here; 255 is always out")
    p.add_argument("--work", required=True, help="folder for the scenes, the maps (removed once scored) and the json")
    args = p.parse_args(argv)

    def go() -> int:
        from predict import load_model

        (Path(args.work) / "gsd_sweep.json").unlink(missing_ok=True)  # a failed rerun leaves no old result
        factors = _factors(args.factors)
        model, eval_size, info = load_model(args.checkpoint, torch.device("cpu"))
        # own data without split lists: the photos of the split the run itself drew (its record)
        recorded = _recorded_ids(args.checkpoint, args.split)
        _, classes, ids, photos, _ = split_sources(args.data_root, args.split, args.limit, recorded)
        reference = args.reference or round(photo_size(photos[ids[0]])[0] / eval_size[0], 4)
        if not (math.isfinite(reference) and reference >= 1 / 16):
            raise InputError(f"--reference {reference:g}: a factor >= 1/16, e.g. 2.5")
        factors = sorted(set(factors) | {reference})
        if list(info["classes"].names) != list(classes.names):
            raise InputError(f"{args.checkpoint}: trained on other classes than {args.data_root or 'the dataset'}; "
                             "pass the dataset it was trained on")
        ignore_index = _checkpoint_facts(args.checkpoint, ids, args.split, args.ignore_index)
        pairs, classes, ids = make_scenes(args.data_root, args.split, Path(args.work) / "scenes", args.scene_gsd,
                                          args.border, args.limit, recorded)
        rows = gsd_sweep(model, pairs, classes, args.scene_gsd, factors, args.work, tile=tuple(eval_size),
                         stats=(info["mean"], info["std"]), overlap=args.overlap, batch_size=args.batch_size,
                         ignore_index=ignore_index, reference=reference)
        best = next(r for r in rows if r["best"])
        result = {"checkpoint": str(args.checkpoint), "split": args.split, "selected_on": args.split,
                  "reported_on": args.split, "scenes": len(pairs), "scene_gsd_m": args.scene_gsd,
                  "border": args.border, "tile": list(eval_size), "overlap": args.overlap,
                  "ignore_index": ignore_index, "reference_factor": reference, "best_factor": best["factor"],
                  "rows": rows}
        with atomic_write(Path(args.work) / "gsd_sweep.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        print(f"\n{len(pairs)} {args.split} scenes at {args.scene_gsd:g} m; windows {eval_size[0]}x{eval_size[1]}, "
              f"overlap {args.overlap:g}; reference x{reference:g} (the training scale); selected on {args.split}, "
              f"reported on {args.split}")
        print("| GSD (m) | x scene pixel | model grid of a scene | pixel accuracy | mIoU [95 % CI] | "
              "mIoU - reference [95 % CI] | windows | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            g, d = r["model_grid_of_first_scene"], r["miou_vs_reference_ci"]
            mark = " (best)" if r["best"] else ""
            print(f"| {r['gsd_m']:.4f} | {r['factor']:g} | {g[0]}x{g[1]} | {r['pixel_accuracy']:.4f} | "
                  f"{r['miou']:.4f} [{r['miou_ci'][0]:.3f}, {r['miou_ci'][1]:.3f}]{mark} | "
                  f"{r['miou_vs_reference']:+.4f} [{d[0]:+.3f}, {d[1]:+.3f}] | {r['windows']} | {r['seconds']:.0f} |")
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())

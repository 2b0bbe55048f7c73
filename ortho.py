"""Orthomosaics: georeferenced rasters of any size in, georeferenced class maps out.

    python predict.py --checkpoint best.pt --input ortho.tif --out maps/              # a raster
    python predict.py --checkpoint best.pt --input orthos/ --out maps/ --gsd 0.05     # a folder of them
    python predict.py --checkpoint model.onnx --input ortho.tif --out maps/ --vector  # + polygons

predict.py hands every ``--input`` that is a .tif/.tiff raster (or a folder of them) to
:func:`run`. A raster (GeoTIFF, BigTIFF, tiled, COG: anything GDAL reads, through rasterio) is
read window by window on the *model grid*: the raster resampled to the model's ground sampling
distance (``--gsd`` metres per pixel; default the checkpoint's ``train_gsd`` when it has one,
else the raster's own pixel size). RGB or RGBA; alpha, nodata and mask bands mark pixels without
data, and windows without any data are skipped. Overlapping windows are blended: each window's
class scores are weighted by a Hann window and the sums normalised, so no seam shows where they
meet (:func:`seam_score` measures it).

Memory is bounded by the window batch and one overlap band, not by the raster: windows run strip
by strip, left to right; the scores of a strip's finished columns leave at once (to labels, to
the file), and only the band that the next strip overlaps is kept. The class map is written block
row by block row.

Outputs, beside each other in ``--out`` (NAME is the raster's name without its extension):

- ``NAME_classes.tif``: uint8 class ids on the raster's ground (same CRS; the transform of the
  ``--out-gsd`` pixel, default the raster's own, so bounds and transform equal the input's),
  255 where the input has no data, an internal colour map of the class colours, tiled, DEFLATE
  compressed, a Cloud Optimized GeoTIFF with overviews where GDAL's COG driver exists.
- ``NAME_areas.json`` and ``NAME_areas.csv``: pixels, area in m² (projected CRS only) and share
  of the covered ground per class.
- ``NAME_polygons.geojson`` (``--vector``): one polygon per connected region of a class, in the
  raster's CRS, with its class and area.

Without georeference a raster still works in pixel units (``--gsd``/``--out-gsd`` in input pixels,
no areas in m²). rasterio is imported only inside the functions that read or write rasters.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from basics import InputError, atomic_write, get_device, mean as MEAN, put_until_stopped, std as STD, write_json
from datautils import parse_size
from evaluate import TTA, eval_mode, predict_logits
from layout import ClassSet, is_georeferenced, metres_per_unit
from transforms import normalize

__all__ = ["RASTER_EXTS", "PHOTO_ONLY_EXTS", "NODATA", "add_raster_args", "is_raster_input", "list_rasters",
           "raster_outputs", "checkpoint_train_gsd", "window_starts", "window_edges", "blend_window", "seam_score",
           "predict_raster", "run"]

#: Files predict.py hands to this module (a folder holding any of them too).
RASTER_EXTS = (".tif", ".tiff")
#: Photos that keep predict.py's photo pipeline (a folder may not mix them with rasters).
PHOTO_ONLY_EXTS = (".jpg", ".jpeg", ".png")
#: The class map's value where the input has no data.
NODATA = 255
#: Output tile size (pixels) and the rows buffered before a write: one block row of tiles.
_BLOCK = 512
#: GDAL's block cache while reading and writing, in bytes (rasterio passes an int as bytes, so 256
#: would be 256 bytes, and every window read would decode its tiles again): a strip of tiles fits.
_GDAL_CACHE_BYTES = 256 * 2**20

_SUFFIXES = {"classes": "_classes.tif", "areas_json": "_areas.json", "areas_csv": "_areas.csv",
             "polygons": "_polygons.geojson"}


def add_raster_args(p: argparse.ArgumentParser) -> None:
    """predict.py's options for rasters (.tif/.tiff inputs)."""
    g = p.add_argument_group("orthomosaics (--input .tif/.tiff rasters, see docs/orthomosaics.md)")
    g.add_argument("--gsd", type=float, default=None, metavar="METRES",
                   help="ground sampling distance the model runs at, metres per pixel (default: the checkpoint's "
                        "training GSD when it has one, else the raster's own pixel size)")
    g.add_argument("--out-gsd", type=float, default=None, metavar="METRES",
                   help="pixel size of the class map (default: the raster's own, same transform)")
    g.add_argument("--vector", action="store_true", help="also write NAME_polygons.geojson: polygons per class")


# --------------------------------------------------------------------------- inputs


def is_raster_input(src: str | os.PathLike, raster_options: bool = False) -> bool:
    """Whether ``--input`` goes to the raster path: a .tif/.tiff (or a folder holding one) that is
    georeferenced, or any of them when a raster option (--gsd, --out-gsd, --vector) is given. A
    TIFF without georeference and without those options is a photo (predict.py resizes it to the
    model's size, as a JPEG): at its own pixel size a 6000x4000 photo would meet a model trained at
    600x400 ten times too close, a silently wrong scale."""
    src = Path(src)
    files = [src] if src.is_file() else sorted(src.iterdir()) if src.is_dir() else []
    tifs = [p for p in files if p.suffix.lower() in RASTER_EXTS and not p.name.startswith(".")]
    if not tifs:
        return False
    if raster_options:
        return True
    ground = [p for p in tifs if is_georeferenced(p)]  # the rule training uses too
    if ground and len(ground) < len(tifs):  # one path for all: a photo on the raster path meets the wrong scale
        photo = next(p for p in tifs if p not in ground)
        raise InputError(f"{src}: holds georeferenced rasters ({ground[0].name}, ...) and TIFFs without georeference "
                         f"({photo.name}, ...); put the orthomosaics in a folder of their own, or pass --gsd to "
                         "predict all as rasters")
    if ground:
        return True
    from distributed import say
    say(f"{tifs[0].name}{' and the other TIFFs' if len(tifs) > 1 else ''}: no georeference, so predicted as "
        "photos (at the model's size); --gsd, --out-gsd or --vector predict them as rasters, in pixel units")
    return False


def list_rasters(src: str | os.PathLike) -> list[Path]:
    """The rasters of a folder (sorted; our own class maps left out), or the one raster given."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder; pass --input with your orthomosaic(s)")
    if src.is_file():
        return [src]
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")]
    rasters = [p for p in files if p.suffix.lower() in RASTER_EXTS and not p.name.endswith(_SUFFIXES["classes"])]
    photos = [p for p in files if p.suffix.lower() in PHOTO_ONLY_EXTS]
    if photos and rasters:
        raise InputError(f"{src}: holds both photos ({photos[0].name}, ...) and rasters ({rasters[0].name}, ...); "
                         "put the .tif orthomosaics in a folder of their own (photos and rasters are predicted "
                         "differently)")
    if not rasters:
        raise InputError(f"{src}: no rasters (.tif, .tiff) found; pass an orthomosaic or a folder of them")
    seen: dict[str, Path] = {}
    for p in rasters:  # a.tif and a.tiff would both write a_classes.tif
        if p.stem in seen:
            raise InputError(f"{seen[p.stem]} and {p} would write the same {p.stem}{_SUFFIXES['classes']}: rename "
                             "one of them (outputs are named after the raster without its extension)")
        seen[p.stem] = p
    return rasters


def raster_outputs(raster: str | os.PathLike, out: str | os.PathLike, vector: bool = False) -> dict[str, Path]:
    """The files predicting ``raster`` writes into ``out``, by kind."""
    stem, out = Path(raster).stem, Path(out)
    return {k: out / f"{stem}{s}" for k, s in _SUFFIXES.items() if vector or k != "polygons"}


def checkpoint_train_gsd(path: str | os.PathLike, model: torch.nn.Module | None = None) -> float | None:
    """The ground sampling distance (metres per pixel) a checkpoint was trained at: ``train_gsd`` in
    its meta (or an ONNX file's metadata), when present and positive; else None."""
    try:
        if str(path).lower().endswith(".onnx"):  # predict.OnnxModel keeps the metadata; else read it
            meta = getattr(model, "meta", None)
            if meta is None:
                import onnx

                props = onnx.load(str(path), load_external_data=False).metadata_props
                meta = {p.key: json.loads(p.value) for p in props if p.key == "train_gsd"}
        else:  # mmap: only the meta is read, not the weights (checkpoint.py reads every format)
            from checkpoint import read_checkpoint

            meta = read_checkpoint(path, mmap=True).meta.extra
        value = float(meta.get("train_gsd"))
    except Exception:  # no meta, an older or foreign format: the GSD is simply unknown
        return None
    return value if math.isfinite(value) and value > 0 else None


def _quiet() -> None:
    """No NotGeoreferencedWarning: a raster without georeference is expected, and handled in pixels."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # idempotent: an equal filter is replaced


def _open(path: Path):
    """Open a raster for reading, or InputError naming it."""
    import rasterio
    from rasterio.errors import RasterioIOError

    _quiet()
    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        raise InputError(f"{path}: not a raster GDAL can read ({str(e).splitlines()[0][:200]}); pass a GeoTIFF "
                         "(or another GDAL raster) orthomosaic") from None


def _check_raster(src, path: Path) -> None:
    """RGB or RGBA 8-bit, else InputError naming the file and the fix."""
    from rasterio.enums import ColorInterp

    colour = [i for i, c in enumerate(src.colorinterp) if c != ColorInterp.alpha]
    if len(colour) < 3 or colour[:3] != [0, 1, 2]:
        raise InputError(f"{path}: {src.count} band(s) ({', '.join(c.name for c in src.colorinterp)}); the model "
                         "needs RGB: three colour bands first, optionally an alpha band")
    if src.dtypes[0] != "uint8":
        raise InputError(f"{path}: {src.dtypes[0]} pixels; the model reads 8-bit RGB: convert it, e.g. "
                         "gdal_translate -ot Byte -scale IN.tif OUT.tif")


# --------------------------------------------------------------------------- grids and windows


@dataclass(frozen=True)
class _Grid:
    """A grid over the raster's ground: ``fx``/``fy`` raster pixels per grid pixel, its size."""

    fx: float
    fy: float
    width: int
    height: int

    def same_as(self, src) -> bool:
        return (self.fx, self.fy, self.width, self.height) == (1.0, 1.0, src.width, src.height)


def _metres_per_unit(src) -> tuple[float, float] | None:
    """Ground metres per CRS unit along x and y at the raster's centre (Mercator units scaled by
    cos(latitude)); None when metres are unknown. The one helper scenes are cut for training with
    (layout.metres_per_unit), so a model runs at the GSD it was trained at."""
    return metres_per_unit(src)


def _pixel_size(src) -> tuple[float, float]:
    """The raster's pixel width and height in CRS units (rotated transforms included)."""
    t = src.transform
    return math.hypot(t.a, t.d), math.hypot(t.b, t.e)


def _scale_for(src, gsd: float | None) -> tuple[float, float]:
    """Raster pixels per grid pixel for a GSD in metres (in CRS units when metres are unknown)."""
    if gsd is None:
        return 1.0, 1.0
    px, py = _pixel_size(src)
    m = _metres_per_unit(src) or (1.0, 1.0)
    return gsd / m[0] / px, gsd / m[1] / py


def window_starts(n: int, tile: int, overlap: float) -> list[int]:
    """Where windows of ``tile`` pixels start along a side of ``n``: evenly spaced from 0 to
    n - tile, as few as keep every stride within tile × (1 - overlap). Even spacing keeps the
    overlap band (the memory kept between strips) the same everywhere; a short last stride would
    widen it. ``overlap`` 0 pastes windows side by side, the last one flush with the end."""
    tile = min(tile, n)
    if overlap == 0:
        return sorted({*range(0, n - tile, tile), n - tile})
    step = max(1, int(tile * (1 - overlap)))
    k = math.ceil((n - tile) / step)  # strides
    return [round(i * (n - tile) / k) for i in range(k + 1)] if k else [0]


def window_edges(n: int, tile: int, overlap: float) -> list[int]:
    """The pixel lines (between pixel e - 1 and e) where a window starts or ends inside ``n``."""
    tile = min(tile, n)
    return sorted({e for s in window_starts(n, tile, overlap) for e in (s, s + tile) if 0 < e < n})


def _hann(n: int) -> torch.Tensor:
    """One side of the blending window: Hann without its zero ends, floored at 1e-3 so that a pixel
    at the raster's edge, where one window's border alone covers it, keeps a usable weight."""
    return torch.hann_window(n + 2, periodic=False, dtype=torch.float64)[1:-1].clamp(min=1e-3).float()


def blend_window(h: int, w: int) -> torch.Tensor:
    """Weights (h×w) of one window's class scores: a Hann window, high in the middle, low but
    non-zero at the borders. Separable (an outer product), so the weights of all windows summed
    are the outer product of the sums along each side: no per-pixel weight sum is kept."""
    return _hann(h)[:, None] * _hann(w)[None, :]


def _weight_sums(n: int, tile: int, starts: list[int]) -> torch.Tensor:
    """The blending weights of all windows summed along one side (``n`` pixels)."""
    total = torch.zeros(n)
    for s in starts:
        total[s:s + tile] += _hann(tile)
    return total


def seam_score(labels: np.ndarray, x_edges, y_edges, valid: np.ndarray | None = None) -> dict:
    """Label disagreement across window borders against elsewhere: the share of neighbouring pixel
    pairs (both valid) whose labels differ, for pairs straddling a window edge (``x_edges``: columns
    e where the pair (e - 1, e) straddles, ``y_edges`` rows likewise) and for all other pairs.
    ``excess`` = border - elsewhere: about 0 where windows leave no seam."""
    lab = np.asarray(labels)
    ok = np.ones(lab.shape, bool) if valid is None else np.asarray(valid, bool)
    counts = np.zeros((2, 2))  # [border, elsewhere] × [pairs, disagreeing]
    for axis, edges in ((1, x_edges), (0, y_edges)):
        a, b = (lab[:, :-1], lab[:, 1:]) if axis == 1 else (lab[:-1], lab[1:])
        both = (ok[:, :-1] & ok[:, 1:]) if axis == 1 else (ok[:-1] & ok[1:])
        differ = (a != b) & both
        on_edge = np.zeros(lab.shape[axis] - 1, bool)
        on_edge[[e - 1 for e in edges if 0 < e < lab.shape[axis]]] = True
        sel = on_edge[None, :] if axis == 1 else on_edge[:, None]
        for k, s in enumerate((sel, ~sel)):
            counts[k] += (float((both & s).sum()), float((differ & s).sum()))
    border, elsewhere = (c[1] / c[0] if c[0] else 0.0 for c in counts)
    return {"border": border, "elsewhere": elsewhere, "excess": border - elsewhere, "border_pairs": int(counts[0, 0])}


class _GridReader:
    """Colour and validity of a raster on a grid: the raster itself when the grid is its own, else a
    WarpedVRT (average resampling when shrinking, ``up`` when enlarging) with an alpha band, which
    carries the raster's alpha, nodata or mask band and marks ground outside the raster."""

    def __init__(self, src, grid: _Grid, up: str = "bilinear"):
        from affine import Affine
        from rasterio.enums import ColorInterp, Resampling
        from rasterio.vrt import WarpedVRT

        self.src, self.vrt = src, None
        if not grid.same_as(src):
            has_alpha = ColorInterp.alpha in src.colorinterp
            method = Resampling.average if max(grid.fx, grid.fy) > 1 else Resampling[up]
            self.vrt = WarpedVRT(src, transform=src.transform @ Affine.scale(grid.fx, grid.fy), width=grid.width,
                                 height=grid.height, resampling=method, add_alpha=not has_alpha)
            self.alpha = 1 + list(self.vrt.colorinterp).index(ColorInterp.alpha)

    def mask(self, window) -> np.ndarray:
        """Valid pixels (bool H×W) of a rasterio window."""
        if self.vrt is None:
            return self.src.dataset_mask(window=window) > 0
        return self.vrt.read(self.alpha, window=window) > 0

    def rgb(self, window) -> np.ndarray:
        """Colour (uint8 3×H×W) of a rasterio window."""
        return (self.src if self.vrt is None else self.vrt).read([1, 2, 3], window=window)

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()


# --------------------------------------------------------------------------- blending strip by strip


@dataclass
class _Chunk:
    """One read of the reader thread: strip ``i``, chunk ``g`` of consecutive windows; ``starts``
    are the x of the windows with data, ``pixels`` their colour (N×3×th×tw uint8)."""

    i: int
    g: int
    starts: list[int]
    pixels: np.ndarray | None


class _Blender:
    """Hann-weighted sums of window scores on the model grid, strip by strip.

    Windows of a strip arrive in chunks, left to right. A chunk's columns up to the next chunk's
    first window are then complete for this strip: their top rows (up to the next strip's first
    row) are final and leave (:meth:`add` returns them); the rows the next strip overlaps go into
    the band, kept per chunk (chunks cover the same columns in every strip). So the memory is one
    chunk of windows plus the band, never the raster. Buffers are kept and reused: a fresh
    allocation of this size costs page faults every time.

    Weights need no sums of their own: they are separable and the windows form a lattice, so the
    sum at a pixel is ``sum_y[row] * sum_x[column]`` (a window skipped for having no data counts
    there too, but it covers no pixel with data, and only those are kept)."""

    def __init__(self, classes: int, grid: _Grid, tile: tuple[int, int], ys: list[int], xs: list[int],
                 chunks: list[list[int]]):
        self.c, self.grid, self.ys, self.xs, self.chunks = classes, grid, ys, xs, chunks
        self.tw, self.th = tile
        self.weight = blend_window(self.th, self.tw)
        self.sum_y, self.sum_x = _weight_sums(grid.height, self.th, ys), _weight_sums(grid.width, self.tw, xs)
        span = max(max(self.flush_bounds(g)[1], xs[ch[-1]] + self.tw) - self.flush_bounds(g)[0]
                   for g, ch in enumerate(chunks))
        self.buf = torch.zeros(classes, self.th, span)
        self.tail = torch.zeros(classes, self.th, self.tw)  # columns past a chunk's end, for the next chunk
        self.tail_n = 0
        self.band: dict[int, torch.Tensor] = {}
        self.peak_bytes = 0  # the most the buffers and the band held at once

    def flush_bounds(self, g: int) -> tuple[int, int]:
        """Columns [a, f) that chunk ``g`` completes."""
        a = 0 if g == 0 else self.xs[self.chunks[g][0]]
        f = self.xs[self.chunks[g + 1][0]] if g + 1 < len(self.chunks) else self.grid.width
        return a, f

    def add(self, i: int, g: int, starts: list[int], logits: torch.Tensor | None
            ) -> tuple[int, int, int, torch.Tensor]:
        """Add chunk ``g`` of strip ``i`` (``logits`` N×C×th×tw of the windows starting at ``starts``);
        returns the finished block: rows [r0, r1), columns from a, and its summed scores
        C×rows×cols (a view, valid until the next call)."""
        a, f = self.flush_bounds(g)
        end = max(f, self.xs[self.chunks[g][-1]] + self.tw)
        acc = self.buf[:, :, :end - a]
        n = self.tail_n if g > 0 else 0
        acc[:, :, :n].copy_(self.tail[:, :, :n])
        acc[:, :, n:].zero_()
        for k, x0 in enumerate(starts):
            acc[:, :, x0 - a:x0 - a + self.tw].addcmul_(logits[k], self.weight)
        self.tail_n = end - f
        self.tail[:, :, :self.tail_n].copy_(acc[:, :, f - a:])
        block = acc[:, :, :f - a]
        if g in self.band:  # the previous strips' share of this strip's top rows
            b = self.band[g]
            block[:, :b.shape[1]] += b
        last = i + 1 == len(self.ys)
        done = self.th if last else self.ys[i + 1] - self.ys[i]
        if last:
            self.band.pop(g, None)
        elif g in self.band and self.band[g].shape[1] == self.th - done:
            self.band[g].copy_(block[:, done:])  # the usual stride: the band keeps its size
        else:
            self.band[g] = block[:, done:].clone()
        self.peak_bytes = max(self.peak_bytes, 4 * (self.buf.numel() + self.tail.numel() + sum(
            b.numel() for b in self.band.values())))
        r0 = self.ys[i]
        return r0, r0 + done, a, block[:, :done]

    def weights(self, r0: int, r1: int, a: int, f: int) -> torch.Tensor:
        """Summed weights of rows [r0, r1) and columns [a, f)."""
        return self.sum_y[r0:r1, None] * self.sum_x[None, a:f]


def _source_coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel along one side: the two input pixels it lies between and its weight
    toward the second (bilinear, align_corners=False, as F.interpolate)."""
    pos = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    p0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    p1 = np.minimum(p0 + 1, n_in - 1)
    return p0, p1, (pos - p0).astype(np.float32)


class _Resampler:
    """Labels on the output grid from finished blocks of model-grid scores: the argmax of the
    bilinearly interpolated normalised scores (the argmax itself when the grids are one). A block
    also needs the row above it (the previous strip's last row, kept full width) and the column to
    its left (the previous block's last column)."""

    def __init__(self, classes: int, model: _Grid, out: _Grid):
        self.same = (model.width, model.height) == (out.width, out.height)
        self.c, self.out_w = classes, out.width
        self.y0, self.y1, self.wy = _source_coords(out.height, model.height)
        self.x0, self.x1, self.wx = _source_coords(out.width, model.width)
        self.last_row = None if self.same else torch.zeros(classes, model.width)
        self.left: torch.Tensor | None = None

    def rows_of(self, r0: int, r1: int) -> tuple[int, int]:
        """Output rows that model rows [r0, r1) finish."""
        if self.same:
            return r0, r1
        return int(np.searchsorted(self.y1, r0)), int(np.searchsorted(self.y1, r1))

    def labels(self, r0: int, r1: int, a: int, scores: torch.Tensor, weights: torch.Tensor | None
               ) -> tuple[int, int, np.ndarray]:
        """Output labels of the block (model rows [r0, r1), columns from ``a``; summed scores and
        their summed weights, which only a resampling needs): the output columns [c0, c1) and
        their labels for the rows :meth:`rows_of` gives (uint8)."""
        if self.same:
            # max(0).indices: argmax's answer (the first class of a tie) at 2-3x its speed here
            return a, a + scores.shape[-1], scores.max(0).indices.to(torch.uint8).numpy()
        f = a + scores.shape[-1]
        s = scores / weights  # a bilinear mix needs normalised scores (0 where nothing ran)
        ext = s if r0 == 0 else torch.cat([self.last_row[:, None, a:f], s], 1)
        base_y = r0 - (r0 > 0)
        if a > 0:
            ext_all = torch.cat([self.left, ext], 2)
        else:
            ext_all = ext
        base_x = a - (a > 0)
        self.left = ext[:, :, -1:].clone()
        self.last_row[:, a:f] = s[:, -1]
        o0, o1 = self.rows_of(r0, r1)
        c0, c1 = int(np.searchsorted(self.x1, a)), int(np.searchsorted(self.x1, f))
        out = np.empty((o1 - o0, c1 - c0), np.uint8)
        ix0 = torch.from_numpy(self.x0[c0:c1] - base_x)
        ix1 = torch.from_numpy(self.x1[c0:c1] - base_x)
        wx = torch.from_numpy(self.wx[c0:c1])
        for q in range(o0, o1, 32):  # 32 output rows at a time: C×32×columns floats
            rows = slice(q, min(q + 32, o1))
            iy0 = torch.from_numpy(self.y0[rows] - base_y)
            iy1 = torch.from_numpy(self.y1[rows] - base_y)
            t = torch.lerp(ext_all[:, iy0], ext_all[:, iy1], torch.from_numpy(self.wy[rows])[None, :, None])
            u = torch.lerp(t[:, :, ix0], t[:, :, ix1], wx)
            out[q - o0:rows.stop - o0] = u.max(0).indices.to(torch.uint8).numpy()
        return c0, c1, out


class _ClassMapWriter:
    """Writes output rows as they complete, a block row of tiles at a time, with 255 where the
    input has no data; counts the pixels of every class."""

    def __init__(self, dst, out_mask: _GridReader, width: int):
        self.dst, self.mask, self.width = dst, out_mask, width
        self.pending: list[np.ndarray] = []
        self.next_row = 0  # first row not yet written
        self.counts = np.zeros(256, np.int64)

    def put(self, rows: np.ndarray, final: bool = False) -> None:
        if len(rows):
            self.pending.append(rows)
        n = sum(len(p) for p in self.pending)
        if n and (n >= _BLOCK or final):
            buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            take = n if final else n - n % _BLOCK  # whole tiles: a compressed tile is written once
            self._write(buf[:take])
            self.pending = [buf[take:]] if take < n else []

    def _write(self, labels: np.ndarray) -> None:
        from rasterio.windows import Window

        win = Window(0, self.next_row, self.width, len(labels))
        labels = labels.copy()
        labels[~self.mask.mask(win)] = NODATA
        self.counts += np.bincount(labels.ravel(), minlength=256)
        self.dst.write(labels, 1, window=win)
        self.next_row += len(labels)


# --------------------------------------------------------------------------- one raster


def _read_chunks(path: Path, grid: _Grid, tile: tuple[int, int], ys: list[int], xs: list[int],
                 chunks: list[list[int]], out: queue.Queue, stop: threading.Event) -> None:
    """The reader thread (its own dataset handle: GDAL handles are not shared between threads):
    for every strip and chunk, the windows with data and their colour; None at the end, or the
    error that stopped it."""
    import rasterio
    from rasterio.windows import Window

    tw, th = tile
    try:
        with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES), rasterio.open(path) as src:
            reader = _GridReader(src, grid)
            try:
                for i, y0 in enumerate(ys):
                    for g, chunk in enumerate(chunks):
                        x0, x1 = xs[chunk[0]], xs[chunk[-1]] + tw
                        win = Window(x0, y0, x1 - x0, th)
                        valid = reader.mask(win)  # first the mask: no colour is read where there is no data
                        starts = [xs[j] for j in chunk if valid[:, xs[j] - x0:xs[j] - x0 + tw].any()]
                        pixels = None
                        if starts:
                            rgb = reader.rgb(win)
                            pixels = np.stack([rgb[:, :, s - x0:s - x0 + tw] for s in starts])
                        if not put_until_stopped(out, _Chunk(i, g, starts, pixels), stop):
                            return
            finally:
                reader.close()
        put_until_stopped(out, None, stop)
    except BaseException as e:  # the main thread raises it
        put_until_stopped(out, e, stop)


def _colormap(colors) -> dict[int, tuple[int, int, int, int]]:
    cmap = {i: (int(c[0]), int(c[1]), int(c[2]), 255) for i, c in enumerate(colors)}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


def _finish_geotiff(scratch: Path, final: Path) -> bool:
    """Copy the block-written GeoTIFF to ``final`` as a Cloud Optimized GeoTIFF (overviews, tiles in
    order) where GDAL's COG driver exists; else move it there as it is (tiled, compressed)."""
    import rasterio
    import rasterio.shutil

    with rasterio.Env() as env:
        has_cog = "COG" in env.drivers()
    if not has_cog:
        os.replace(scratch, final)
        return False
    rasterio.shutil.copy(scratch, final, driver="COG", compress="DEFLATE", blocksize=_BLOCK,
                         overview_resampling="nearest", bigtiff="IF_SAFER", num_threads="ALL_CPUS")
    return True


def predict_raster(model: torch.nn.Module, raster: str | os.PathLike, out: str | os.PathLike, *,
                   classes: ClassSet, tile: tuple[int, int] = (512, 512), overlap: float = 0.25,
                   gsd: float | None = None, train_gsd: float | None = None, out_gsd: float | None = None,
                   batch_size: int = 4, device: torch.device | str = "cpu", amp: bool = True,
                   stats: tuple = (MEAN, STD), vector: bool = False, progress: bool = True) -> dict:
    """Predict one raster into ``out`` (see the module's docstring for the files).

    ``gsd``: metres per pixel the model runs at (None: ``train_gsd``, the checkpoint's, when the
    raster's CRS gives metres, else the raster's own pixel); ``out_gsd``: the class map's pixel
    (None: the raster's own). Without metres (no CRS) both are in the raster's units (pixels).
    ``tile`` (W, H) windows overlap by ``overlap`` and run ``batch_size`` at a time; ``stats`` is
    the model's input (mean, std). Returns a summary: outputs, grids, windows, seconds, areas.
    """
    import rasterio
    from affine import Affine  # rasterio's own dependency

    raster, out = Path(raster), Path(out)
    t_start = time.perf_counter()
    device = torch.device(device)
    paths = raster_outputs(raster, out, vector)
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES), _open(raster) as src:
        _check_raster(src, raster)
        metres = _metres_per_unit(src)
        notes = []
        if gsd is None and train_gsd is not None:
            if metres is None:
                notes.append(f"{raster.name}: no CRS, so the checkpoint's training GSD ({train_gsd:g} m) cannot "
                             "apply; the model runs at the raster's own pixel (pass --gsd in pixels to change it)")
            else:
                gsd = train_gsd
        fx, fy = _scale_for(src, gsd)
        ox, oy = _scale_for(src, out_gsd)
        for name, f in (("--gsd", min(fx, fy)), ("--out-gsd", min(ox, oy))):
            if f < 1 / 16:
                raise InputError(f"{name}: {1 / f:.0f}x finer than {raster}'s pixels; choose at most 16x finer "
                                 "(the raster has no detail below its own pixel)")
        out_grid = _Grid(ox, oy, max(1, math.ceil(src.width / ox - 1e-6)), max(1, math.ceil(src.height / oy - 1e-6)))
        # the model grid covers exactly the output's ground: its pixel differs from the GSD asked by
        # less than one pixel over the whole raster, and the output pixels map onto it exactly
        mw = max(1, int(out_grid.width * out_grid.fx / fx + 0.5))
        mh = max(1, int(out_grid.height * out_grid.fy / fy + 0.5))
        same = (mw, mh) == (out_grid.width, out_grid.height)
        model_grid = out_grid if same else _Grid(out_grid.width * out_grid.fx / mw,
                                                 out_grid.height * out_grid.fy / mh, mw, mh)
        tw, th = min(tile[0], model_grid.width), min(tile[1], model_grid.height)
        ys, xs = window_starts(model_grid.height, th, overlap), window_starts(model_grid.width, tw, overlap)
        chunks = [list(range(k, min(k + batch_size, len(xs)))) for k in range(0, len(xs), batch_size)]
        georef = src.crs is not None or not src.transform.is_identity
        transform = src.transform @ Affine.scale(out_grid.fx, out_grid.fy)
        profile = dict(driver="GTiff", width=out_grid.width, height=out_grid.height, count=1, dtype="uint8",
                       nodata=NODATA, tiled=True, blockxsize=_BLOCK, blockysize=_BLOCK, compress="deflate",
                       bigtiff="IF_SAFER", num_threads="ALL_CPUS")
        if georef:
            profile.update(crs=src.crs, transform=transform)
        crs = src.crs
        px, py = _pixel_size(src) if georef else (1.0, 1.0)
        facts = {"crs": crs.to_string() if crs is not None else None, "input_size": [src.width, src.height],
                 "output_size": [out_grid.width, out_grid.height],
                 "model_grid_size": [model_grid.width, model_grid.height],
                 "input_pixel": [px, py], "output_pixel": [px * out_grid.fx, py * out_grid.fy],
                 "pixel_units": "metres" if crs is not None and crs.is_projected else
                                "degrees" if crs is not None and crs.is_geographic else "pixels",
                 "model_gsd": _gsd_of(src, model_grid, metres), "megapixels": src.width * src.height / 1e6}
        out_mask = _GridReader(src, out_grid, up="nearest")

        out.mkdir(parents=True, exist_ok=True)
        blender = _Blender(classes.num_classes, model_grid, (tw, th), ys, xs, chunks)
        resampler = _Resampler(classes.num_classes, model_grid, out_grid)
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        reader = threading.Thread(target=_read_chunks, args=(raster, model_grid, (tw, th), ys, xs, chunks, q, stop),
                                  daemon=True)
        windows_run, model_s = 0, 0.0
        bar = tqdm(total=len(ys) * len(xs), desc=raster.name, unit="window", disable=not progress)
        with atomic_write(paths["classes"]) as tmp:
            scratch = tmp.with_name(tmp.name + ".strips.tif")  # block-written; the COG is copied from it
            try:
                reader.start()
                with rasterio.open(scratch, "w", **profile) as dst:
                    dst.write_colormap(1, _colormap(classes.colors))
                    dst.update_tags(1, class_names=json.dumps(list(classes.names)))
                    writer = _ClassMapWriter(dst, out_mask, out_grid.width)
                    strip_rows: np.ndarray | None = None
                    with eval_mode(model), torch.inference_mode():
                        while (item := q.get()) is not None:
                            if isinstance(item, BaseException):
                                raise item
                            logits = None
                            if item.starts:
                                t0 = time.perf_counter()
                                x = normalize(torch.from_numpy(item.pixels).to(device), *stats)
                                logits = predict_logits(model, x, amp, out_size=(th, tw)).cpu()
                                model_s += time.perf_counter() - t0
                                windows_run += len(item.starts)
                            r0, r1, a, scores = blender.add(item.i, item.g, item.starts, logits)
                            o0, o1 = resampler.rows_of(r0, r1)
                            if item.g == 0:
                                strip_rows = np.full((o1 - o0, out_grid.width), NODATA, np.uint8)
                            weights = None if resampler.same else blender.weights(r0, r1, a, a + scores.shape[-1])
                            c0, c1, labels = resampler.labels(r0, r1, a, scores, weights)
                            strip_rows[:, c0:c1] = labels
                            if item.g + 1 == len(chunks):
                                writer.put(strip_rows, final=item.i + 1 == len(ys))
                            bar.update(len(chunks[item.g]))
                    if writer.next_row != out_grid.height:
                        raise RuntimeError(f"wrote {writer.next_row} of {out_grid.height} rows")  # a bug of ours
                t_cog = time.perf_counter()
                cog = _finish_geotiff(scratch, tmp)
                cog_s = time.perf_counter() - t_cog
            finally:
                stop.set()
                bar.close()
                out_mask.close()
                reader.join()
                scratch.unlink(missing_ok=True)
        counts = writer.counts

    pixel_area_units = abs(transform.determinant) if georef else out_grid.fx * out_grid.fy
    projected = crs is not None and crs.is_projected
    m2_per_pixel = pixel_area_units * metres[0] * metres[1] if projected else None
    areas = _area_table(counts, classes, m2_per_pixel)
    summary = {
        "raster": str(raster), "outputs": {k: str(p) for k, p in paths.items()}, "cog": cog, **facts,
        "tile": [tw, th], "overlap": overlap, "windows": len(ys) * len(xs), "windows_run": windows_run,
        "accumulator_peak_bytes": blender.peak_bytes, "model_seconds": model_s, "cog_seconds": cog_s,
        "notes": notes, **areas,
    }
    if vector:
        t_vec = time.perf_counter()
        summary["polygons"] = _write_polygons(paths["classes"], paths["polygons"], classes, m2_per_pixel, progress)
        summary["vector_seconds"] = time.perf_counter() - t_vec
    summary["seconds"] = time.perf_counter() - t_start
    _write_areas(paths, summary)
    return summary


def _gsd_of(src, grid: _Grid, metres) -> dict:
    """The model grid's pixel: in metres when the CRS gives them, else in the raster's units."""
    px, py = _pixel_size(src)
    ux, uy = grid.fx * px, grid.fy * py
    if metres is None:
        return {"x": ux, "y": uy, "units": "raster units (pixels without a transform)"}
    return {"x": ux * metres[0], "y": uy * metres[1], "units": "metres"}


def _area_table(counts: np.ndarray, classes: ClassSet, m2_per_pixel: float | None) -> dict:
    valid = int(counts[:classes.num_classes].sum())
    rows = [{"id": k, "name": name, "pixels": int(counts[k]),
             "area_m2": None if m2_per_pixel is None else float(counts[k]) * m2_per_pixel,
             "percent": 100.0 * float(counts[k]) / valid if valid else 0.0}
            for k, name in enumerate(classes.names)]
    return {"classes": rows, "valid_pixels": valid, "nodata_pixels": int(counts[NODATA]),
            "pixel_area_m2": m2_per_pixel, "total_area_m2": None if m2_per_pixel is None else valid * m2_per_pixel}


def _write_areas(paths: dict[str, Path], summary: dict) -> None:
    """NAME_areas.json (the summary) and NAME_areas.csv (one row per class)."""
    write_json(paths["areas_json"], summary)
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["id", "class", "pixels", "area_m2", "percent"])
    for r in summary["classes"]:
        w.writerow([r["id"], r["name"], r["pixels"], "" if r["area_m2"] is None else f"{r['area_m2']:.4f}",
                    f"{r['percent']:.4f}"])
    with atomic_write(paths["areas_csv"]) as tmp:
        tmp.write_text(text.getvalue())


def _ring_area(ring) -> float:
    """Shoelace area of a closed ring (positive either way round)."""
    p = np.asarray(ring, np.float64)
    p = p - p[0]  # relative to a vertex: map coordinates (5e6 m) would cancel away a 5 cm pixel's area
    return 0.5 * abs(float(np.dot(p[:-1, 0], p[1:, 1]) - np.dot(p[1:, 0], p[:-1, 1])))


def _write_polygons(class_map: Path, path: Path, classes: ClassSet, m2_per_pixel: float | None,
                    progress: bool = True) -> dict:
    """Polygons of every class region of the class map (GDAL's polygonizer: a vertex at every
    corner of the pixel boundary, none between, so areas are exact), streamed into GeoJSON in the
    raster's CRS. Each feature has ``class_id``, ``class``, ``pixels`` and ``area_m2`` (projected
    CRS; else null). Returns polygons and area (m², or pixels) per class."""
    import rasterio
    from rasterio.features import shapes

    per_class: dict[str, dict] = {}
    with rasterio.open(class_map) as ds, atomic_write(path) as tmp, open(tmp, "w") as f:
        transform, crs = ds.transform, ds.crs
        pixel_area = abs(transform.determinant) or 1.0
        head = {"type": "FeatureCollection", "name": class_map.stem}
        if crs is not None:  # the pre-RFC 7946 "crs" member: GDAL and QGIS read it, coordinates stay exact
            epsg = crs.to_epsg()
            head["crs"] = {"type": "name", "properties": {
                "name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()}}
        f.write(json.dumps(head)[:-1] + ', "features": [\n')
        first = True
        bar = tqdm(desc=f"{class_map.name}: polygons", unit="polygon", disable=not progress)
        for geom, value in shapes(rasterio.band(ds, 1), transform=transform):
            value = int(value)
            if value == NODATA or value >= classes.num_classes:
                continue
            rings = geom["coordinates"]
            area = _ring_area(rings[0]) - sum(_ring_area(r) for r in rings[1:])
            pixels = round(area / pixel_area)
            props = {"class_id": value, "class": classes.names[value], "pixels": pixels,
                     "area_m2": None if m2_per_pixel is None else pixels * m2_per_pixel}
            f.write(("" if first else ",\n") + json.dumps({"type": "Feature", "properties": props, "geometry": geom}))
            first = False
            c = per_class.setdefault(classes.names[value], {"polygons": 0, "pixels": 0})
            c["polygons"] += 1
            c["pixels"] += pixels
            bar.update()
        f.write("\n]}\n")
        bar.close()
    return per_class


# --------------------------------------------------------------------------- the command line


def run(args: argparse.Namespace, load_model: Callable) -> str:
    """predict.py for rasters: every raster of ``args.input`` into ``args.out``, the model read by
    predict.py's ``load_model`` (handed over, so that this module does not import predict.py).
    Returns "ok" (all written), "some failed" (named) or "model failed"; bad input raises
    InputError. predict.py turns these into its exit codes 0, 1, 3 and 2."""

    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: windows must overlap by a fraction in [0, 1), e.g. 0.25")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: run at least one window at a time")
    if getattr(args, "infer_size", None):
        raise InputError("--infer-size is for photos; for rasters choose the scale with --gsd (metres per pixel) "
                         "and the window with --tile")
    for name in ("gsd", "out_gsd"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name.replace('_', '-')} {value}: give metres per pixel > 0, e.g. 0.05")
    rasters = list_rasters(args.input)
    for path in rasters:  # every raster's header before any prediction: a bad one stops the run at once
        with _open(path) as src:
            _check_raster(src, path)
    device = get_device(args.device)
    model, size, info = load_model(args.checkpoint, device)
    train_gsd = checkpoint_train_gsd(args.checkpoint, model)
    stats = (tuple(info.get("mean") or MEAN), tuple(info.get("std") or STD))
    if args.tta:
        model = TTA(model)
    tile = parse_size(args.tile, square=True) if args.tile else tuple(size)
    out = Path(args.out)
    vector = bool(getattr(args, "vector", False))
    written, skipped, failed = [], [], {}
    for path in rasters:
        if args.skip_existing and all(p.exists() for p in raster_outputs(path, out, vector).values()):
            skipped.append(path)
            continue
        try:
            res = predict_raster(model, path, out, classes=info["classes"], tile=tile, overlap=args.overlap,
                                 gsd=args.gsd, train_gsd=train_gsd, out_gsd=args.out_gsd,
                                 batch_size=args.batch_size, device=device, amp=not args.no_amp, stats=stats,
                                 vector=vector)
        except InputError:
            raise
        except Exception as e:
            if type(e).__module__.startswith("rasterio"):  # a raster that breaks mid-way: name it, go on
                failed[str(path)] = f"{path}: cannot read or write ({str(e).splitlines()[0][:200]})"
                continue
            traceback.print_exc()
            hint = " (out of memory: lower --batch-size or --tile)" if "out of memory" in str(e) else ""
            print(f"error: prediction stopped at {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  f"{hint}; the class maps written so far are complete: continue with --skip-existing", file=sys.stderr)
            return "model failed"
        for note in res["notes"]:
            print(f"note: {note}", file=sys.stderr)
        written.append(path)
        print(f"wrote {res['outputs']['classes']} ({res['output_size'][0]}x{res['output_size'][1]}, model at "
              f"{res['model_gsd']['x']:.3g} {'m' if res['model_gsd']['units'] == 'metres' else 'units'}/pixel; "
              f"{res['windows_run']} of {res['windows']} windows had data) in {res['seconds']:.1f} s, "
              f"{res['megapixels'] / res['seconds']:.2f} Mpx/s")
    print(f"wrote {len(written)} class map{'s' if len(written) != 1 else ''} to {out.resolve()}"
          + (f"; {len(skipped)} skipped (outputs exist)" if skipped else ""))
    if failed:
        print(f"{len(failed)} raster(s) failed:", file=sys.stderr)
        for msg in failed.values():
            print(f"  {msg}", file=sys.stderr)
        return "some failed"
    return "ok"

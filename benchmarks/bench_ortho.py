"""Orthomosaics through ortho.predict_raster: throughput, peak memory, and seams, by raster size.

    python benchmarks/bench_ortho.py --checkpoint /tmp/sc/model.pt --sizes 4096,16384
    python benchmarks/bench_ortho.py --checkpoint /tmp/sc/model.pt --checkpoint /tmp/sc/model.onnx \
        --sizes 4096,16384,32768 --seams

Rasters: generated once under --workdir (kept for the next run): N×N RGBA GeoTIFFs in EPSG:32633
at 5 cm, tiled 512 and DEFLATE compressed, like an orthomosaic: a periodic 2048-pixel scene of
colour regions repeated without a seam, and alpha 0 outside an ellipse (about a fifth of the
raster has no data, as at a flight's edges). Written block by block, so making a 32768² raster
holds one block in memory.

Per size and checkpoint, one child process runs predict_raster (at the raster's own pixel,
--tile windows overlapping by --overlap, --batch-size at a time) and reports its peak RSS
(VmHWM; the GDAL block cache, 256 MB at most, included) and megapixels per second, then times
the model alone on as many windows as the run had data for (random input, same tile and batch;
the median batch): the model-step floor. --seams also predicts the smallest raster with pasted windows
(--overlap 0) and compares label disagreement across window borders (ortho.seam_score).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from basics import mean as MEAN, std as STD  # noqa: E402
from datautils import parse_size  # noqa: E402
from evaluate import eval_mode, predict_logits  # noqa: E402
from ortho import predict_raster, seam_score, window_edges  # noqa: E402
from predict import load_model  # noqa: E402
from transforms import normalize  # noqa: E402

PIXEL = 0.05  # metres
BLOCK = 512


def _scene(seed: int = 0, n: int = 2048) -> np.ndarray:
    """A 3×n×n uint8 scene of smooth colour regions with a little texture, periodic: its right edge
    continues into its left and its bottom into its top, so tiling it leaves no seam of its own
    (which the seam measurement would count)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n)
    lowpass = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * 0.008 ** 2))  # blobs of some 60 px
    noise = np.fft.ifft2(np.fft.fft2(rng.normal(size=(3, n, n))) * lowpass).real
    noise = (noise - noise.mean()) / noise.std()
    img = 128 + 60 * noise + rng.normal(0, 4, noise.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_raster(path: Path, n: int) -> Path:
    """An n×n RGBA orthomosaic-like GeoTIFF (see the module's docstring), written block by block."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if path.exists():
        return path
    scene = _scene()
    m = scene.shape[1]
    tmp = path.with_name(path.name + ".part.tif")
    profile = dict(driver="GTiff", width=n, height=n, count=4, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(PIXEL, 0, 500000, 0, -PIXEL, 5000000), tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="deflate", zlevel=1, predictor=2, photometric="RGB", alpha="YES",
                   bigtiff="IF_SAFER", num_threads="ALL_CPUS")
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK].astype(np.float32)
    with rasterio.open(tmp, "w", **profile) as dst:
        for by in range(0, n, BLOCK):
            for bx in range(0, n, BLOCK):
                rows, cols = (np.arange(BLOCK) + by) % m, (np.arange(BLOCK) + bx) % m  # the periodic scene, tiled
                rgb = scene[:, rows][:, :, cols]
                ey, ex = (yy + by + 0.5) / n * 2 - 1, (xx + bx + 0.5) / n * 2 - 1
                alpha = np.where(ey ** 2 / 0.95 ** 2 + ex ** 2 / 0.9 ** 2 <= 1, 255, 0).astype(np.uint8)
                dst.write(np.concatenate([rgb, alpha[None]]), window=Window(bx, by, BLOCK, BLOCK))
    os.replace(tmp, path)
    return path


def model_floor(model, windows: int, tile: tuple[int, int], batch: int, stats, reps_min: int = 12) -> float:
    """Seconds the model alone takes for ``windows`` windows of ``tile`` (W, H), ``batch`` at a time,
    input normalised from uint8 as in the pipeline: the median batch of ``reps_min`` (the machine
    may be shared: a median resists another process's burst) times the batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, tile[1], tile[0]), dtype=torch.uint8, generator=g)
    n_batches = math.ceil(windows / batch)
    reps = min(n_batches, max(reps_min, 1))
    times = []
    with eval_mode(model), torch.inference_mode():
        predict_logits(model, normalize(x, *stats))  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            predict_logits(model, normalize(x, *stats))
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * n_batches


def _stats(info: dict) -> tuple:
    """The model's input (mean, std): an ONNX file's metadata, else ImageNet's."""
    return tuple(info.get("mean") or MEAN), tuple(info.get("std") or STD)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike getrusage's ru_maxrss, which
    a child inherits from its parent on Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One raster, one checkpoint: the pipeline, then the floor; prints one JSON line."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, size, info = load_model(args.checkpoint, torch.device("cpu"))
    stats = _stats(info)
    tile = parse_size(args.tile, square=True) if args.tile else tuple(size)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    r = predict_raster(model, args.raster, args.out, classes=info["classes"], tile=tile, overlap=args.overlap,
                       batch_size=args.batch_size, stats=stats, progress=False)
    wall = time.perf_counter() - t0
    rss_peak = peak_rss_mb()
    floor = model_floor(model, r["windows_run"], tuple(r["tile"]), args.batch_size, stats)
    print(json.dumps({
        "engine": "onnx" if str(args.checkpoint).endswith(".onnx") else "torch", "raster": str(args.raster),
        "side": r["input_size"][0], "megapixels": r["megapixels"], "seconds": wall, "mpx_per_s": r["megapixels"] / wall,
        "model_seconds_in_run": r["model_seconds"], "cog_seconds": r["cog_seconds"],
        "floor_seconds": floor, "floor_mpx_per_s": r["megapixels"] / floor,
        "windows": r["windows"], "windows_run": r["windows_run"], "tile": r["tile"], "overlap": args.overlap,
        "rss_mb_after_load": rss_before, "peak_rss_mb": rss_peak,
        "accumulator_peak_mb": r["accumulator_peak_bytes"] / 2**20,
        "class_map_mb": os.path.getsize(r["outputs"]["classes"]) / 2**20, "threads": torch.get_num_threads()}))


def seams(raster: Path, checkpoint: str, out: Path, tile_arg: str | None, batch: int, crop: int = 2048) -> dict:
    """Seams of blended (overlap 0.25) and pasted (overlap 0) windows on one raster: label
    disagreement across window borders beyond elsewhere (ortho.seam_score's excess), less the
    same for one whole prediction of the central ``crop``² (no windows), on that crop but a 32-pixel
    margin: the scene's own edges cross the border lines too."""
    import rasterio
    from rasterio.windows import Window

    model, size, info = load_model(checkpoint, torch.device("cpu"))
    tile = parse_size(tile_arg, square=True) if tile_arg else tuple(size)
    with rasterio.open(raster) as src:
        n = min(crop, src.width, src.height)
        y0, x0 = (src.height - n) // 2, (src.width - n) // 2
        rgb = src.read([1, 2, 3], window=Window(x0, y0, n, n))
        valid = src.dataset_mask(window=Window(x0, y0, n, n)) > 0
    with eval_mode(model), torch.inference_mode():
        whole = predict_logits(model, normalize(torch.from_numpy(rgb)[None], *_stats(info)))[0].max(0).indices.numpy()
    m = 32
    inner = (slice(m, n - m), slice(m, n - m))
    res = {}
    for overlap in (0.25, 0.0):
        r = predict_raster(model, raster, out / f"seams{overlap}", classes=info["classes"], tile=tile,
                           overlap=overlap, batch_size=batch, stats=_stats(info), progress=False)
        with rasterio.open(r["outputs"]["classes"]) as d:
            labels = d.read(1, window=Window(x0, y0, n, n))
        tw, th = r["tile"]
        ex = [e - x0 - m for e in window_edges(r["input_size"][0], tw, overlap) if x0 + m < e < x0 + n - m]
        ey = [e - y0 - m for e in window_edges(r["input_size"][1], th, overlap) if y0 + m < e < y0 + n - m]
        got = seam_score(labels[inner], ex, ey, valid[inner])
        ref = seam_score(whole[inner], ex, ey, valid[inner])
        res[f"overlap {overlap}"] = {"seam": round(got["excess"] - ref["excess"], 5),
                                     "border_disagreement": round(got["border"], 5),
                                     "whole_border_disagreement": round(ref["border"], 5),
                                     "labels_differing_from_whole": round(float((labels != whole)[inner][valid[inner]].mean()), 5)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a .pt checkpoint or an export.py .onnx file; repeat to compare engines")
    p.add_argument("--sizes", default="4096,16384,32768", help="raster sides, comma-separated")
    p.add_argument("--workdir", default="/tmp/bench_ortho", help="where the rasters are generated (kept)")
    p.add_argument("--tile", default=None, help="N or WIDTHxHEIGHT windows (default: the checkpoint's eval size)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: all cores)")
    p.add_argument("--seams", action="store_true", help="also compare seams, blended vs pasted, on the smallest raster")
    p.add_argument("--json", default=None, help="write the results here too")
    # the child process's own options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raster", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.checkpoint = args.checkpoint[0]
        child(args)
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for n in sizes:
        t0 = time.perf_counter()
        raster = make_raster(work / f"ortho_{n}.tif", n)
        print(f"{raster} ({os.path.getsize(raster) / 2**20:.0f} MB on disk; ready in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        for ck in args.checkpoint:
            cmd = [sys.executable, __file__, "--child", "--checkpoint", ck, "--raster", str(raster),
                   "--out", str(work / f"out_{n}"), "--overlap", str(args.overlap), "--batch-size", str(args.batch_size)]
            cmd += ["--tile", args.tile] if args.tile else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"  {r['engine']:5s} {n}²: {r['seconds']:.1f} s, {r['mpx_per_s']:.2f} Mpx/s (model-step floor "
                  f"{r['floor_mpx_per_s']:.2f} Mpx/s), peak RSS {r['peak_rss_mb']:.0f} MB (after loading "
                  f"{r['rss_mb_after_load']:.0f} MB; accumulators {r['accumulator_peak_mb']:.0f} MB), COG "
                  f"{r['cog_seconds']:.1f} s, {r['windows_run']}/{r['windows']} windows had data", flush=True)
    report = {"results": results, "cpu_count": os.cpu_count(), "torch": torch.__version__, "argv": sys.argv}
    if args.seams:
        report["seams"] = seams(work / f"ortho_{min(sizes)}.tif", args.checkpoint[0], work, args.tile, args.batch_size)
        print("seams (excess label disagreement across window borders, less a whole prediction's):",
              json.dumps(report["seams"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

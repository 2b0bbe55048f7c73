"""predict.py on a flight of 6000×4000 photos: the old path vs the pipeline vs the machine's floor.

    python benchmarks/bench_predict.py                                   # SingleConvolution, 8 photos
    python benchmarks/bench_predict.py --checkpoint outputs/single_conv/model.pt \
        --real-checkpoint outputs/unet_lite0/best.pt --real-size 1500x1000

Photos: real photos of the dataset (DRONE_DATA_ROOT / --data-root) upscaled to 6000×4000, else
generated scenes; written once under --workdir. All timings run side by side in this process:
  old    the previous predict.py loop (one photo after another; dense-matrix upsampling of the
         logits, an RGB PNG mask), kept here as it was, on --old-photos photos;
  new    predict.predict_folder (reader/writer threads, strip upsampling, palette PNG);
  floor  what any tool must do per photo: a full JPEG decode plus encoding its outputs (the
         palette PNG mask and the JPEG overlay), one after another on one thread.
Peak memory (max RSS) of the new path over 8 and 64 photos is measured in child processes, one
per count. With --real-checkpoint: photos/s of that model predicting the flight at --real-size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from basics import seed_everything  # noqa: E402
from datautils import load_photo, save_mask  # noqa: E402
from demo import make_demo_dataset  # noqa: E402
from layout import find_dataset  # noqa: E402
from transforms import normalize  # noqa: E402
from figures import colorize  # noqa: E402
from models import SingleConvolution  # noqa: E402
from predict import load_model, predict_folder  # noqa: E402


def make_flight(folder: Path, n: int, size=(6000, 4000), data_root=None) -> list[Path]:
    """n distinct 6000×4000 JPEGs (quality 90), upscaled from real photos when the dataset is found."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sources = sorted(find_dataset(data_root).image_dir.glob("*.jpg"))[:n]
    except Exception:
        sources = []
    if len(sources) < n:
        demo = make_demo_dataset(folder / "demo-src", n=n, size=(750, 500), seed=0)
        sources = sorted((demo / "dataset/semantic_drone_dataset/original_images").glob("*.jpg"))[:n]
    out = []
    for i, src in enumerate(sources):
        p = folder / f"flight{i:03d}.jpg"
        if not p.exists():
            Image.open(src).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(p, quality=90)
        out.append(p)
    return out


# ----------------------------------------------------------------------------- the old path, as it was


def _interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
    i0 = pos.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = (pos - i0).float()
    m = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m


def old_upsample_labels(logits: torch.Tensor, size, strip: int = 128) -> torch.Tensor:
    c, h, w = logits.shape
    big_h, big_w = size
    ry, rx = _interp_matrix(big_h, h), _interp_matrix(big_w, w)
    cols = torch.einsum("chw,Ww->chW", logits.float(), rx)
    out = torch.empty(big_h, big_w, dtype=torch.uint8)
    for r0 in range(0, big_h, strip):
        out[r0:r0 + strip] = torch.einsum("rh,chW->crW", ry[r0:r0 + strip], cols).argmax(0).to(torch.uint8)
    return out


def old_predict(model, photos, out: Path, size) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for path in photos:
            full, (fw, fh) = load_photo(path)
            w, h = size if (fw >= fh) == (size[0] >= size[1]) else size[::-1]
            small = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BILINEAR))
            x = normalize(torch.from_numpy(small.transpose(2, 0, 1).copy())[None])
            labels = old_upsample_labels(model(x)[0], (fh, fw)).numpy()
            color = Image.fromarray(colorize(labels))
            color.save(out / f"{path.stem}_mask.png")
            Image.blend(Image.fromarray(full), color, 0.5).save(out / f"{path.stem}_overlay.jpg", quality=90)


# ----------------------------------------------------------------------------- the floor


def floor(photos, labels: np.ndarray, out: Path) -> float:
    """Seconds per photo of a full decode plus encoding the two outputs, on one thread."""
    out.mkdir(parents=True, exist_ok=True)
    t = 0.0
    for path in photos:
        t0 = time.perf_counter()
        with Image.open(path) as im:
            im.load()
            full = im.convert("RGB")
        color = save_mask(labels, out / f"{path.stem}_mask.png")
        t += time.perf_counter() - t0
        blended = Image.blend(full, color.convert("RGB"), 0.5)  # not encoding: outside the floor
        t0 = time.perf_counter()
        blended.save(out / f"{path.stem}_overlay.jpg", quality=90)
        t += time.perf_counter() - t0
    return t / len(photos)


def peak_memory(checkpoint: str, folder: Path, n: int, out: Path, size=None, batch_size: int = 4) -> float:
    """Max RSS (MB) of a child process predicting the first n photos of ``folder`` (the model at
    ``size``, default the checkpoint's, ``batch_size`` photos at a time)."""
    code = (f"import resource, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
            "from pathlib import Path\nfrom predict import list_photos, load_model, predict_folder\n"
            f"m, size, _ = load_model({checkpoint!r}, 'cpu')\n"
            + (f"size = {tuple(size)!r}\n" if size else "") +
            f"r = predict_folder(m, list_photos({str(folder)!r})[:{n}], {str(out)!r}, size, "
            f"batch_size={batch_size}, progress=False)\n"
            "assert len(r['written']) == " + str(n) + ", r['failed']\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="SingleConvolution model.pt (default: seeded random weights)")
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--old-photos", type=int, default=2)
    p.add_argument("--memory-counts", default="8,64")
    p.add_argument("--memory-size", default=None, help="WIDTHxHEIGHT the model runs at in the memory runs "
                   "(default: the checkpoint's); e.g. 1500x1000, where each photo's logits take 138 MB")
    p.add_argument("--memory-batch-size", type=int, default=4)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "drone-bench-predict"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--real-checkpoint", default=None, help="the best CPU model, e.g. a unet_lite0 best.pt")
    p.add_argument("--real-size", default="1500x1000")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir)
    photos = make_flight(work / "flight", args.photos, data_root=args.data_root)
    seed_everything(0)
    if args.checkpoint:
        model, size, _ = load_model(args.checkpoint, torch.device("cpu"))
        ckpt = args.checkpoint
    else:
        model, size = SingleConvolution(), (600, 400)
        ckpt = str(work / "single_conv_random.pt")
        torch.save({"model": model.state_dict(), "model_name": "single_conv", "model_kwargs": {},
                    "size": list(size)}, ckpt)
    model.eval()
    print(f"{len(photos)} photos 6000x4000 in {work / 'flight'}; model at {size[0]}x{size[1]}; "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    old_predict(model, photos[:args.old_photos], work / "old", size)
    t_old = (time.perf_counter() - t0) / args.old_photos
    print(f"old path:  {t_old:7.3f} s/photo ({args.old_photos} photos)")

    res = predict_folder(model, photos, work / "new", size, progress=False)
    assert not res["failed"], res["failed"]
    t_new = res["seconds"] / len(photos)
    print(f"new path:  {t_new:7.3f} s/photo ({len(photos)} photos, {1 / t_new:.2f} photos/s)")

    labels = np.asarray(Image.open(work / "new" / f"{photos[0].stem}_mask.png"))
    old_labels = np.asarray(Image.open(work / "old" / f"{photos[0].stem}_mask.png").convert("RGB"))
    agree = float((colorize(labels) == old_labels).all(-1).mean())
    t_floor = floor(photos, labels, work / "floor")
    print(f"floor:     {t_floor:7.3f} s/photo (full decode + PNG mask + JPEG overlay, one thread)")
    print(f"old / new = {t_old / t_new:.1f}x faster (target >= 8x); new / floor = {t_new / t_floor:.2f} "
          f"(target <= 2); masks of both paths agree on {agree:.5%} of the pixels of {photos[0].name}")

    counts = [int(c) for c in args.memory_counts.split(",") if c]
    if counts:
        many = work / "many"
        many.mkdir(exist_ok=True)
        for i in range(max(counts)):  # hard links: the same bytes to decode, no extra disk
            link = many / f"p{i:03d}.jpg"
            if not link.exists():
                os.link(photos[i % len(photos)], link)
        msize = tuple(int(v) for v in args.memory_size.split("x")) if args.memory_size else None
        mem = {n: peak_memory(ckpt, many, n, work / f"mem{n}", msize, args.memory_batch_size) for n in counts}
        print(f"peak memory of the new path (model at {args.memory_size or 'its size'}, batch "
              f"{args.memory_batch_size}): " + ", ".join(f"{n} photos {m:.0f} MB" for n, m in mem.items())
              + f" (ratio {mem[counts[-1]] / mem[counts[0]]:.2f})")

    summary = {"old_s_per_photo": t_old, "new_s_per_photo": t_new, "floor_s_per_photo": t_floor,
               "speedup": t_old / t_new, "new_over_floor": t_new / t_floor, "mask_agreement": agree}
    if args.real_checkpoint:
        real, _, _ = load_model(args.real_checkpoint, torch.device("cpu"))
        rs = tuple(int(v) for v in args.real_size.split("x"))
        r = predict_folder(real, photos, work / "real", rs, progress=False)
        summary["real_photos_per_s"] = len(r["written"]) / r["seconds"]
        print(f"{Path(args.real_checkpoint).parent.name} at {rs[0]}x{rs[1]}: "
              f"{summary['real_photos_per_s']:.3f} photos/s on 6000x4000 photos")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""What the crop-placement options cost per training batch, side by side in one process: the
recipe's augmentation (crop 256, scale 0.7-1.4) with crops placed uniformly, around rare classes
(--rare-crops), under a class-share cap (--max-class-share) and both.

    python benchmarks/bench_crops.py --data-root ../shared/data/drone-1500x1000 [--batch 8] [--reps 20]

Batches are drawn from the real train photos (decode-once cache at 600x400: --cache-dir); every
variant augments the same batches with the same seed. Prints seconds per batch and the ratio to
uniform crops, and the share of crop pixels of the rarest classes (those under 1 % of the train
pixels) each variant gives.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datautils import import_drone_dataset  # noqa: E402
from losses import class_pixel_counts  # noqa: E402
from transforms import Augment, rare_class_weights  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--share", type=float, default=0.75)
    args = p.parse_args(argv)

    train = import_drone_dataset(args.data_root, (600, 400), "train", normalize=False, cache_dir=args.cache_dir)
    counts = class_pixel_counts(train, cache_dir=args.cache_dir)
    freq = counts.double() / counts.sum()
    rare = freq < 0.01
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.reps):
        idx = torch.randint(len(train), (args.batch,), generator=g).tolist()
        xs, ys = zip(*(train[i] for i in idx))
        batches.append((torch.stack(xs), torch.stack(ys).long()))
    variants = {
        "uniform": {},
        f"rare-crops {args.temperature:g}": {"class_weights": rare_class_weights(counts, args.temperature)},
        f"max-class-share {args.share:g}": {"max_class_share": args.share},
        "both": {"class_weights": rare_class_weights(counts, args.temperature), "max_class_share": args.share},
    }
    base = None
    print(f"{len(train)} train photos, batch {args.batch}, {args.reps} batches; rare classes: "
          f"{int(rare.sum())} under 1 % of the train pixels ({100 * float(freq[rare].sum()):.2f} % of them in all)")
    for name, kw in variants.items():
        aug = Augment((256, 256), scale=(0.7, 1.4), **kw)
        torch.manual_seed(0)
        aug(*batches[0])  # warm-up (pipelines built on first use)
        torch.manual_seed(1)
        t0, rare_px, px = time.perf_counter(), 0, 0
        for x, y in batches:
            _, ya = aug(x, y)
            valid = ya[ya != 255]
            rare_px += int(rare[valid].sum())
            px += valid.numel()
        dt = (time.perf_counter() - t0) / len(batches)
        base = base or dt
        print(f"{name:22s} {dt:.3f} s/batch  x{dt / base:.2f}  rare-class pixels {100 * rare_px / max(px, 1):.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())

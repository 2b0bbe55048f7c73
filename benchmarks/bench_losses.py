"""What each loss costs per training batch, side by side in one process (forward and backward of
the loss alone, on logits of the recipe's batch: 8 crops of 256x256, 23 classes).

    python benchmarks/bench_losses.py [--batch 8] [--crop 256] [--classes 23] [--present 15] [--reps 5]

The masks hold ``--present`` classes (the Lovasz loss sorts the errors of every pixel once per class
present in the batch, so its cost grows with them) and a border of ignored pixels. Prints seconds
per batch and the ratio to cross-entropy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from losses import make_loss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--classes", type=int, default=23)
    p.add_argument("--present", type=int, default=15)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.classes, args.crop, args.crop, generator=g, requires_grad=True)
    target = torch.randint(0, args.present, (args.batch, args.crop, args.crop), generator=g)
    target[:, :8] = 255
    print(f"{torch.get_num_threads()} threads, batch {args.batch} x {args.crop}x{args.crop}, {args.classes} classes "
          f"({args.present} present), {args.reps} timed repetitions after one warm-up")
    times = {}
    for name in ("ce", "ce+dice", "lovasz", "ce+lovasz", "ohem"):
        loss = make_loss(name)
        for rep in range(args.reps + 1):
            if rep == 1:
                t0 = time.perf_counter()
            logits.grad = None
            loss(logits, target).backward()
        times[name] = (time.perf_counter() - t0) / args.reps
    for name, t in times.items():
        print(f"{name:>10}: {t:.3f} s per batch, {t / times['ce']:.1f}x cross-entropy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

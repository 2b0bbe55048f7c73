"""The README's picture: a photo of a split, its ground truth and a checkpoint's prediction, as a
small JPEG.

    python tools/example_figure.py --checkpoint outputs/unet_lite0/best.pt \
        --data-root ../shared/data/drone-1500x1000 --out docs/example.jpg

The photo is not picked by eye: by default it is the photo of the split (val) whose pixel accuracy
is the split's median under this checkpoint, so the picture shows a typical prediction, neither
the best nor the worst. ``--id`` shows a given photo instead. The model sees the photo at its
evaluation size, as in run_experiment.py's report. Orthomosaic scenes are cut as the model was
trained on them (windows of its training size at its training GSD, in --cache-dir), so the
windows are those of its training run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from basics import InputError, atomic_write, get_device  # noqa: E402
from cli import run_cli  # noqa: E402
from datautils import cut_as_trained, import_drone_dataset  # noqa: E402
from evaluate import ModelEvaluation  # noqa: E402
from layout import find_dataset  # noqa: E402
from ortho import checkpoint_train_gsd  # noqa: E402
from predict import load_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt / model.pt of our scripts")
    p.add_argument("--data-root", default=None, help="the dataset (default $DRONE_DATA_ROOT)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--id", default=None, help="the photo to show (default: the split's median by pixel accuracy)")
    p.add_argument("--out", required=True, help="the .jpg (or .png) to write")
    p.add_argument("--width", type=int, default=1200, help="width of the picture in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def median_index(scores: list[float]) -> int:
    """The index of the score at the median (the lower middle one of an even count)."""
    order = np.argsort(np.asarray(scores), kind="stable")
    return int(order[(len(order) - 1) // 2])


def trained_cut(checkpoint: str, model, eval_size: tuple[int, int]) -> tuple[tuple[int, int], float | None,
                                                                              float | None]:
    """How the checkpoint's run cut scenes: (window: its training size, its --train-gsd as given
    (None: the scenes' own pixel), the GSD in metres it was trained at). An ONNX file records only
    the last: its evaluation size stands for the window."""
    if str(checkpoint).lower().endswith(".onnx"):
        return tuple(eval_size), None, checkpoint_train_gsd(checkpoint, model)
    from checkpoint import read_checkpoint

    meta = read_checkpoint(checkpoint, mmap=True).meta  # only the meta: the weights are loaded already
    config = meta.config or {}
    window = config.get("train_size") or meta.train_size or eval_size
    return tuple(window), config.get("train_gsd"), checkpoint_train_gsd(checkpoint)


def main(argv=None) -> int:
    def run() -> int:
        args = parse_args(argv)
        device = get_device(args.device)
        model, eval_size, info = load_model(args.checkpoint, device)
        layout = find_dataset(args.data_root)
        if layout.by_scene:  # the windows of its training run, not a cut at the evaluation size
            layout = cut_as_trained(layout, *trained_cut(args.checkpoint, model, eval_size), cache_dir=args.cache_dir)
        data = import_drone_dataset(layout, eval_size, splits=args.split, classes=info["classes"],
                                    cache_dir=args.cache_dir)
        evaluation = ModelEvaluation(model, data, device=device)
        if args.id is None:
            index = median_index(evaluation.evaluate_all())
            why = f"the median pixel accuracy of {args.split} ({evaluation.scores[index]:.4f})"
        elif args.id in data.ids:
            index, why = data.ids.index(args.id), "--id"
        else:
            raise InputError(f"--id {args.id}: not in the {args.split} split of {args.data_root}")
        with torch.inference_mode():
            fig = evaluation.show_qualitative(index)
        dpi = args.width / fig.get_figwidth()
        with atomic_write(args.out) as tmp:
            extra = {"pil_kwargs": {"quality": args.quality}} if tmp.suffix.lower() in (".jpg", ".jpeg") else {}
            fig.savefig(tmp, dpi=dpi, **extra)
        size = Path(args.out).stat().st_size
        print(f"{args.split} photo {data.ids[index]} ({why}): wrote {args.out} ({size / 1024:.0f} KB)")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

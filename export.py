"""Export a trained model to ONNX, checked against PyTorch before it is written.

    python export.py outputs/unet_lite0/best.pt --out unet_lite0.onnx
    python predict.py --checkpoint unet_lite0.onnx --input flight/ --out predictions/   # ONNX Runtime

The graph has one input, ``image``: float32 N×3×H×W, RGB normalised as in training,
``(pixel / 255 - mean) / std`` with ImageNet's mean and std (stored in the metadata, and what
predict.py normalises with), and one output, ``logits`` N×C×H×W. Batch, height and width are
free: a model trained at 600×400 runs at 1500×1000, on portrait photos, and on tiles smaller than
its stride (padded as in PyTorch: models.PadToStride). The class names and colours, the model's
name and evaluation size travel as metadata (``predict.onnx_metadata`` reads them;
``predict.OnnxModel`` runs the file).

The export checks itself: ONNX Runtime's logits against PyTorch's on inputs of the checkpoint's
evaluation size (or --size) and its portrait turn; the largest difference is printed, and one
beyond the tolerance fails the export (exit code 1) without writing the file. --size changes only
that check: the metadata keeps the checkpoint's evaluation size, which predict.py runs at.
Bad input: one line, exit 2, and no file written (with --int8, the calibration photos are read
before anything is exported, and the fp32 file appears only together with its int8 copy).

Why torch's dynamo exporter (needs onnxscript): the traced (legacy) exporter computes the
EfficientNet "SAME" padding and the U-Net's pad-to-stride in Python at the traced size and bakes
them in, so its graph would be wrong at any other size; torch.export keeps them symbolic.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from basics import CLASS_COLORS, CLASS_NAMES, InputError, atomic_write, mean as MEAN, std as STD
from checkpoint import encode_onnx_values, onnx_props, read_checkpoint
from cli import run_cli
from datautils import parse_size
from models import ChannelsLast
from predict import load_model, onnx_session

__all__ = ["export_onnx", "quantize_onnx", "copy_metadata", "calibration_inputs", "ExportMismatch", "main"]



class ExportMismatch(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's beyond the tolerance: the file is not written."""


def _check_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """(H, W) inputs the export is checked at: the evaluation size and its portrait turn."""
    w, h = size
    return [(h, w), (w, h)] if w != h else [(h, w), (h + 32, w + 17)]


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU in eval mode. The caller's model is neither moved nor
    switched to eval, not even for a while (it may be training, or on a GPU); weights already
    on the CPU are shared, not copied."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        cpu = t.detach().cpu()
        memo[id(t)] = nn.Parameter(cpu, t.requires_grad) if isinstance(t, nn.Parameter) else cpu
    return copy.deepcopy(model, memo).eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int] = (600, 400), *,
                eval_size: tuple[int, int] | None = None, class_names=CLASS_NAMES, class_colors=CLASS_COLORS,
                model_name: str = "model", mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                tolerance: float = 1e-4, verbose: bool = False, extra: dict | None = None) -> dict:
    """Write ``model`` as ONNX with free batch, height and width, its classes in the metadata,
    after checking ONNX Runtime against PyTorch at ``size`` (W, H) and its portrait turn.

    ``eval_size`` (W, H; default ``size``) is the size the metadata says the model runs at
    (predict.py's default); ``mean`` and ``std`` the input normalisation the model was trained
    with (ImageNet's here), stored for predict.py to normalise with; ``extra`` further entries
    (e.g. ``train_gsd``: the metres per pixel orthomosaics run at). ``model`` itself is left
    where and as it is (a CPU copy in eval mode is exported).
    Returns ``{"max_abs_diff": {"HxW": d, ...}, "seconds": s}``. A difference beyond
    ``tolerance`` × the largest |logit| (at least 1) raises :class:`ExportMismatch` and writes
    nothing; so does a graph that fails at the other size (a size baked in)."""
    import onnx

    t0 = time.perf_counter()
    model = _cpu_eval_copy(model)
    path = Path(path)
    w, h = size
    ew, eh = eval_size or size
    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, h, w, generator=g)
    free = torch.export.Dim.DYNAMIC
    with atomic_write(path) as tmp:
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=({0: free, 2: free, 3: free},),
                                    verbose=verbose)
        proto = program.model_proto
        meta = onnx_props(class_names=class_names, class_colors=class_colors, model_name=model_name,
                          eval_size=(ew, eh), mean=mean, std=std, **(extra or {}))  # the schema predict.py reads back
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
        session = onnx_session(tmp)
        diffs = {}
        for hh, ww in _check_sizes(size):
            x = torch.randn(2, 3, hh, ww, generator=g)
            with torch.inference_mode():
                want = model(x)
            want = (want["out"] if isinstance(want, dict) else want).numpy()
            try:
                got = session.run(None, {"image": x.numpy()})[0]
            except Exception as e:
                raise ExportMismatch(f"the ONNX graph fails at {ww}x{hh} ({str(e).splitlines()[0][:200]}): "
                                     "a size was baked in at export") from None
            if got.shape != want.shape:
                raise ExportMismatch(f"at {ww}x{hh} ONNX gives logits {got.shape}, PyTorch {want.shape}")
            diffs[f"{ww}x{hh}"] = float(np.abs(got - want).max())
            if diffs[f"{ww}x{hh}"] > tolerance * max(1.0, float(np.abs(want).max())):
                raise ExportMismatch(f"ONNX Runtime's logits differ from PyTorch's by {diffs[f'{ww}x{hh}']:.3g} at "
                                     f"{ww}x{hh} (tolerance {tolerance:g} x the largest logit); not written")
        del session
    return {"max_abs_diff": diffs, "seconds": time.perf_counter() - t0}


def calibration_inputs(root: str | os.PathLike | None, size: tuple[int, int], n: int = 8, split: str = "train",
                       split_seed: int = 0, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                       run_split: dict[str, Sequence[str]] | None = None, *,
                       window: tuple[int, int] | None = None, gsd: float | None = None,
                       train_gsd: float | None = None,
                       cache_dir: str | os.PathLike | None = None) -> list[np.ndarray]:
    """The first ``n`` photos of a dataset's ``split`` at ``size`` (W, H), normalised as the
    model's input (``mean``, ``std``): what static int8 quantisation calibrates its activation
    ranges on. The dataset is read as training reads it (``import_drone_dataset``): its split
    lists, or where it has none (your own data) the seeded split of ``split_seed`` the training
    scripts make; photos are paired by id with their masks, never by a glob that could pick a
    sidecar file. ``run_split`` (ids per split, as a checkpoint records its run's split) replaces
    the seeded split of a dataset without lists: the photos the model trained on, never its val or
    test photos. Bad or missing data raises DatasetError naming the file.

    Scenes (orthomosaics) are cut as the model was trained (``datautils.cut_as_trained``): into
    windows of ``window`` (its training size; default ``size``) at ``gsd`` (its --train-gsd) or,
    where that gives another scale, at ``train_gsd`` (the metres it was trained at), in
    ``cache_dir`` (default the cache folder): its training cut is found again, not a second one
    made. Those windows are then read at ``size``."""
    from datautils import cut_as_trained, import_drone_dataset
    from layout import find_dataset

    if n < 1:
        raise InputError(f"--calib {n}: calibrate on at least one photo (8 by default)")
    layout = cut_as_trained(find_dataset(root), window or size, gsd, train_gsd, cache_dir=cache_dir)
    seeded = layout.splits_dir is None
    data = import_drone_dataset(layout, size, split, mean=mean, std=std, cache=False, split_seed=split_seed,
                                split_ids=run_split if seeded and run_split else None)
    return [data[i][0][None].numpy() for i in range(min(n, len(data)))]


def quantize_onnx(fp32: str | os.PathLike, out: str | os.PathLike, calibration: list[np.ndarray]) -> Path:
    """int8 copy of an exported model: ONNX Runtime's static quantisation (QDQ, per-channel int8
    weights, uint8 activations whose ranges come from ``calibration`` inputs), metadata kept.
    Faster on this CPU for unet_lite0 at some accuracy cost (README); opt-in (export.py --int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    out = Path(out)
    with atomic_write(out) as tmp:
        pre = tmp.with_name(tmp.name + ".pre.onnx")  # shape-inferred input of the quantiser
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            pre.unlink(missing_ok=True)
        copy_metadata(fp32, tmp, int8=f"static QDQ, per-channel weights, calibrated on {len(calibration)} photos")
    return out


def copy_metadata(src: str | os.PathLike, dst: str | os.PathLike, **extra) -> None:
    """Give the ONNX file ``dst`` (e.g. a quantised copy) the metadata of ``src``, plus ``extra``."""
    import onnx

    model = onnx.load(str(dst))
    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    onnx.helper.set_model_props(model, {**meta, **encode_onnx_values(extra)})
    onnx.save(model, str(dst))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="best.pt / last.pt / model.pt written by our scripts")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT the export is checked at (default: the checkpoint's "
                   "evaluation size); the metadata keeps the checkpoint's evaluation size, which predict.py runs at")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| / max |logit|")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT.int8.onnx: static int8 quantisation, faster on CPUs at some accuracy cost")
    p.add_argument("--calib-root", default=None, help="dataset whose train photos calibrate --int8 (default "
                   "$DRONE_DATA_ROOT)")
    p.add_argument("--calib", type=int, default=8, help="number of calibration photos for --int8")
    p.add_argument("--split-seed", type=int, default=None, help="for --calib-root data without split lists: the "
                   "seed of its 80/10/10 split whose train photos calibrate (default: the training run's own split, "
                   "as the checkpoint records it)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out}: name the file *.onnx")
    if str(args.checkpoint).lower().endswith(".onnx"):
        raise InputError(f"{args.checkpoint}: already ONNX; pass the .pt checkpoint it came from")
    model, eval_size, info = load_model(args.checkpoint, torch.device("cpu"))
    if isinstance(model, ChannelsLast):  # predict's memory layout means nothing in an ONNX graph
        model = model.model.to(memory_format=torch.contiguous_format)
    eval_size = tuple(eval_size)
    check_size = parse_size(args.size) if args.size else eval_size  # --size: the check only, never the metadata
    classes = info["classes"]
    int8 = out.with_suffix(".int8.onnx") if args.int8 else None
    # everything that can fail on bad input is read before any file is written
    # without --split-seed, data without split lists calibrates on the run's own train photos (its record)
    meta = read_checkpoint(args.checkpoint, mmap=True).meta  # only the meta: the weights stay on disk
    run_split = None if args.split_seed is not None else (meta.split or {}).get("ids")
    # a model trained on orthomosaic scenes runs them at its training GSD, from the .onnx too
    extra = {"train_gsd": meta.extra["train_gsd"]} if meta.extra.get("train_gsd") is not None else {}
    # scenes: cut as in training (its windows, its GSD), so its cut in the cache is found again
    trained = meta.config or {}
    calib = calibration_inputs(args.calib_root, eval_size, args.calib, split_seed=args.split_seed or 0,
                               run_split=run_split, window=tuple(trained.get("train_size") or meta.train_size
                                                                 or eval_size),
                               gsd=trained.get("train_gsd"), train_gsd=meta.extra.get("train_gsd")) if int8 else None
    try:
        with atomic_write(out) as tmp:  # the fp32 file appears only once its int8 copy (if asked) is written
            report = export_onnx(model, tmp, check_size, eval_size=eval_size, model_name=info["model_name"],
                                 tolerance=args.tolerance, class_names=classes.names, class_colors=classes.colors,
                                 extra=extra)
            if int8:
                quantize_onnx(tmp, int8, calib)
    except ExportMismatch as e:
        print(f"error: {out}: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"{k}: {v:.2g}" for k, v in report["max_abs_diff"].items())
    print(f"wrote {out.resolve()} ({out.stat().st_size / 2**20:.1f} MB) in {report['seconds']:.0f} s; "
          f"max |ONNX Runtime - PyTorch| logit difference {diffs}")
    if int8:
        print(f"wrote {int8.resolve()} ({int8.stat().st_size / 2**20:.1f} MB): int8, calibrated on {len(calib)} "
              "train photos; check its accuracy on val before use (benchmarks/bench_engines.py)")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

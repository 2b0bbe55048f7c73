"""Export a trained model to ONNX, checked against PyTorch before it is written.

    python export.py outputs/unet_lite0/best.pt --out unet_lite0.onnx
    python predict.py --checkpoint unet_lite0.onnx --input flight/ --out predictions/   # ONNX Runtime

The graph has one input, ``image``: float32 N×3×H×W, RGB normalised as in training,
``(pixel / 255 - mean) / std`` with ImageNet's mean and std (stored in the metadata), and one
output, ``logits`` N×C×H×W. Batch, height and width are free: a model trained at 600×400 runs at
1500×1000 and on portrait photos (U-Net models need H and W of at least 32). The class names and
colours, the model's name and evaluation size travel as metadata (``predict.onnx_metadata`` reads them;
``predict.OnnxModel`` runs the file).

The export checks itself: ONNX Runtime's logits against PyTorch's on inputs of the checkpoint's
evaluation size and its portrait turn; the largest difference is printed, and one beyond the
tolerance fails the export (exit code 1) without writing the file. Bad input: one line, exit 2.

Why torch's dynamo exporter (needs onnxscript): the traced (legacy) exporter computes the
EfficientNet "SAME" padding and the U-Net's pad-to-stride in Python at the traced size and bakes
them in, so its graph would be wrong at any other size; torch.export keeps them symbolic.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from basics import CLASS_COLORS, CLASS_NAMES, InputError, atomic_write, mean as MEAN, std as STD
from cli import run_cli
from datautils import parse_size
from models import ChannelsLast
from predict import PRODUCER, load_model, onnx_session

__all__ = ["export_onnx", "quantize_onnx", "copy_metadata", "calibration_inputs", "ExportMismatch", "main"]



class ExportMismatch(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's beyond the tolerance: the file is not written."""


def _check_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """(H, W) inputs the export is checked at: the evaluation size and its portrait turn."""
    w, h = size
    return [(h, w), (w, h)] if w != h else [(h, w), (h + 32, w + 17)]


def export_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int] = (600, 400), *,
                class_names=CLASS_NAMES, class_colors=CLASS_COLORS, model_name: str = "model",
                tolerance: float = 1e-4, verbose: bool = False) -> dict:
    """Write ``model`` as ONNX with free batch, height and width, its classes in the metadata,
    after checking ONNX Runtime against PyTorch at ``size`` (W, H) and its portrait turn.

    Returns ``{"max_abs_diff": {"HxW": d, ...}, "seconds": s}``. A difference beyond
    ``tolerance`` × the largest |logit| (at least 1) raises :class:`ExportMismatch` and writes
    nothing; so does a graph that fails at the other size (a size baked in)."""
    import onnx

    t0 = time.perf_counter()
    model = model.cpu().eval()
    path = Path(path)
    w, h = size
    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, h, w, generator=g)
    free = torch.export.Dim.DYNAMIC
    with atomic_write(path) as tmp:
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=({0: free, 2: free, 3: free},),
                                    verbose=verbose)
        proto = program.model_proto
        meta = {"producer": PRODUCER, "class_names": json.dumps(list(class_names)),
                "class_colors": json.dumps([list(c) for c in class_colors]), "mean": json.dumps(list(MEAN)),
                "std": json.dumps(list(STD)), "model_name": json.dumps(model_name), "eval_size": json.dumps([w, h]),
                "input": json.dumps("image: float32 N×3×H×W RGB, (pixel / 255 - mean) / std")}
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


def calibration_inputs(root: str | os.PathLike | None, size: tuple[int, int], n: int = 8, split: str = "train"
                       ) -> list[np.ndarray]:
    """``n`` photos of a dataset's ``split`` at ``size`` (W, H), normalised as the model's input:
    what static int8 quantisation calibrates its activation ranges on."""
    from datautils import load_photo
    from layout import find_dataset, read_split
    from transforms import normalize

    layout = find_dataset(root)
    ids = read_split(split, layout.splits_dir)[:n]
    return [normalize(torch.from_numpy(load_photo(next(layout.image_dir.glob(f"{i}.*")), size)[0]
                                       .transpose(2, 0, 1).copy()))[None].numpy() for i in ids]


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
    onnx.helper.set_model_props(model, {**meta, **{k: json.dumps(v) for k, v in extra.items()}})
    onnx.save(model, str(dst))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="best.pt / last.pt / model.pt written by our scripts")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT the export is checked at (default: the checkpoint's)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| / max |logit|")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT.int8.onnx: static int8 quantisation, faster on CPUs at some accuracy cost")
    p.add_argument("--calib-root", default=None, help="dataset whose train photos calibrate --int8 (default "
                   "$DRONE_DATA_ROOT)")
    p.add_argument("--calib", type=int, default=8, help="number of calibration photos for --int8")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out}: name the file *.onnx")
    if str(args.checkpoint).lower().endswith(".onnx"):
        raise InputError(f"{args.checkpoint}: already ONNX; pass the .pt checkpoint it came from")
    model, size, info = load_model(args.checkpoint, torch.device("cpu"))
    if isinstance(model, ChannelsLast):  # predict's memory layout means nothing in an ONNX graph
        model = model.model.to(memory_format=torch.contiguous_format)
    size = parse_size(args.size) if args.size else tuple(size)
    classes = info["classes"]
    try:
        report = export_onnx(model, out, size, model_name=info["model_name"], tolerance=args.tolerance,
                             class_names=classes.names, class_colors=classes.colors)
    except ExportMismatch as e:
        print(f"error: {out}: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"{k}: {v:.2g}" for k, v in report["max_abs_diff"].items())
    print(f"wrote {out.resolve()} ({out.stat().st_size / 2**20:.1f} MB) in {report['seconds']:.0f} s; "
          f"max |ONNX Runtime - PyTorch| logit difference {diffs}")
    if args.int8:
        q = quantize_onnx(out, out.with_suffix(".int8.onnx"), calibration_inputs(args.calib_root, size, args.calib))
        print(f"wrote {q.resolve()} ({q.stat().st_size / 2**20:.1f} MB): int8, calibrated on {args.calib} train "
              "photos; check its accuracy on val before use (benchmarks/bench_engines.py)")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

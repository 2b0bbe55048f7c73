"""Inference engines side by side: torch eager, torch channels_last, ONNX Runtime fp32 and int8.

    python benchmarks/bench_engines.py                                    # random weights, generated photos
    python benchmarks/bench_engines.py --lite0 /path/unet_lite0/best.pt --single-conv /path/single_conv/model.pt \
        --data-root ../shared/data/drone-1500x1000

For each model (SingleConvolution and unet_lite0; trained checkpoints when given, else seeded
random weights) and each input size (600x400, 1500x1000), in this one process:
  model step  seconds per forward of a batch of --batch-size photos, best of --repeats, per engine;
  agreement   max |logit - torch eager logit| and the share of equal argmax labels;
  flight      photos/s of predict.predict_folder over --photos 6000x4000 photos per engine, and
              the share of mask pixels equal to torch eager's masks;
  val         with --data-root and a trained checkpoint: val pixel accuracy and mIoU per engine
              (the checkpoint's evaluation size).
int8: ONNX Runtime's static quantisation (QDQ, per-channel weights, calibrated on --calib photos
of the train split, or generated ones) and dynamic quantisation (int8 weights), each measured
like the others. Prints one JSON line at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import make_flight  # noqa: E402
from datautils import import_drone_dataset, load_photo  # noqa: E402
from layout import find_dataset, read_split  # noqa: E402
from transforms import normalize  # noqa: E402
from evaluate import evaluate_loader  # noqa: E402
from export import calibration_inputs, copy_metadata, export_onnx, quantize_onnx  # noqa: E402
from predict import OnnxModel  # noqa: E402
from models import ChannelsLast, get_model  # noqa: E402
from predict import load_model, predict_folder  # noqa: E402


def quantize(fp32: Path, out: Path, kind: str, calib: list[np.ndarray]) -> Path:
    """int8 ONNX model: 'static' (export.quantize_onnx, what export.py --int8 writes) or 'dynamic'
    (int8 weights, activations quantised on the fly; measured here, not offered)."""
    if kind == "static":
        return quantize_onnx(fp32, out, calib)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    copy_metadata(fp32, out)  # keep export.py's classes and normalisation
    return out


def step_time(model, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = model(x)  # warm-up (first-run allocations, ORT's arena)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out = model(x)
            best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lite0", default=None, help="a trained unet_lite0 checkpoint (default: ImageNet-free random)")
    p.add_argument("--single-conv", default=None, help="a trained SingleConvolution model.pt")
    p.add_argument("--data-root", default=None, help="the dataset, for val scores and calibration photos")
    p.add_argument("--sizes", default="600x400,1500x1000")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--photos", type=int, default=4, help="6000x4000 photos per flight run (0: none)")
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--int8", default="static,dynamic", help="int8 kinds to try ('' for none)")
    p.add_argument("--models", default="single_conv,unet_lite0")
    p.add_argument("--no-val", action="store_true")
    p.add_argument("--layout-models", default="",
                   help="also time eager vs channels_last (random weights, largest size) for these registered models")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "drone-bench-engines"))
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    try:
        layout = find_dataset(args.data_root)
    except Exception:
        layout = None
    flight = make_flight(work / "flight", args.photos, data_root=args.data_root) if args.photos else []
    summary = {}
    for name in [m for m in args.models.split(",") if m]:
        ckpt = {"single_conv": args.single_conv, "unet_lite0": args.lite0}[name]
        if ckpt:
            loaded, eval_size, _ = load_model(ckpt, torch.device("cpu"))  # predict.py's engine: channels_last
            base = loaded.model if isinstance(loaded, ChannelsLast) else loaded
            model = copy.deepcopy(base).to(memory_format=torch.contiguous_format)  # plain eager
        else:
            torch.manual_seed(0)
            model, eval_size = get_model(name), (600, 400)
        model.eval()
        fp32 = work / f"{name}.onnx"
        rep = export_onnx(model, fp32, tuple(eval_size), model_name=name)
        print(f"\n{name} ({'trained: ' + ckpt if ckpt else 'random weights'}): exported in {rep['seconds']:.0f} s, "
              f"check {rep['max_abs_diff']}")
        if layout is not None:
            calib = calibration_inputs(args.data_root, tuple(eval_size), args.calib)
        else:
            g = torch.Generator().manual_seed(0)
            calib = [torch.randn(1, 3, eval_size[1], eval_size[0], generator=g).numpy() for _ in range(args.calib)]
        engines = {"torch": model, "torch_channels_last": ChannelsLast(copy.deepcopy(model)).eval()}
        engines["onnx_fp32"] = OnnxModel(fp32)
        for kind in [k for k in args.int8.split(",") if k]:
            try:
                engines[f"onnx_int8_{kind}"] = OnnxModel(quantize(fp32, work / f"{name}.int8.{kind}.onnx", kind, calib))
            except Exception as e:  # report, go on with the others
                print(f"int8 {kind}: quantisation failed ({type(e).__name__}: {str(e)[:200]})")
        res = summary.setdefault(name, {})
        for w, h in sizes:
            if layout is not None:  # real val photos, read as the dataset reads them
                ids = read_split("val", layout.splits_dir)[:args.batch_size]
                x = torch.stack([normalize(torch.from_numpy(load_photo(layout.image_dir / f"{i}.jpg", (w, h))[0]
                                                            .transpose(2, 0, 1).copy())) for i in ids])
            else:
                x = torch.randn(args.batch_size, 3, h, w, generator=torch.Generator().manual_seed(1))
            ref_t, ref = step_time(engines["torch"], x, args.repeats)
            for engine, m in engines.items():
                t, out = (ref_t, ref) if engine == "torch" else step_time(m, x, args.repeats)
                agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
                res[f"{engine}@{w}x{h}"] = {"step_s": t, "speedup_vs_torch": ref_t / t,
                                            "max_abs_logit_diff": float((out - ref).abs().max()), "label_agreement": agree}
                print(f"  {w}x{h} {engine:22s} {t:7.3f} s/step ({ref_t / t:4.2f}x torch)  max|diff| "
                      f"{res[f'{engine}@{w}x{h}']['max_abs_logit_diff']:.2e}  labels equal {agree:.4%}")
        for w, h in sizes if flight else []:
            masks = {}
            for engine, m in engines.items():
                out = work / f"pred-{name}-{engine}-{w}x{h}"
                r = predict_folder(m, flight, out, (w, h), batch_size=1, progress=False, overlay=True)
                assert not r["failed"], r["failed"]
                from PIL import Image
                masks[engine] = [np.asarray(Image.open(out / f"{p.stem}_mask.png")) for p in flight]
                agree = float(np.mean([(a == b).mean() for a, b in zip(masks[engine], masks["torch"])]))
                res[f"flight_{engine}@{w}x{h}"] = {"photos_per_s": len(flight) / r["seconds"], "mask_agreement": agree}
                print(f"  flight of {len(flight)} 6000x4000 photos, model at {w}x{h}, {engine:22s} "
                      f"{len(flight) / r['seconds']:.3f} photos/s, masks equal to torch's on {agree:.4%} of pixels")
        if ckpt and layout is not None and not args.no_val:
            val = import_drone_dataset(args.data_root, tuple(eval_size), "val", normalize=False, cache=False)
            loader = torch.utils.data.DataLoader(val, batch_size=2)
            for engine, m in engines.items():
                t = time.perf_counter()
                met = evaluate_loader(m, loader, "cpu", amp=False)["metrics"]
                res[f"val_{engine}"] = {"pixel_accuracy": met["pixel_accuracy"], "miou": met["miou"]}
                print(f"  val at {eval_size[0]}x{eval_size[1]}, {engine:22s} pixel accuracy {met['pixel_accuracy']:.4f}, "
                      f"mIoU {met['miou']:.4f} ({time.perf_counter() - t:.0f} s)")
    for name in [m for m in args.layout_models.split(",") if m]:
        torch.manual_seed(0)
        plain = get_model(name).eval()
        w, h = sizes[-1]
        x = torch.randn(args.batch_size, 3, h, w, generator=torch.Generator().manual_seed(1))
        t_plain, _ = step_time(plain, x, args.repeats)
        t_cl, _ = step_time(ChannelsLast(copy.deepcopy(plain)).eval(), x, args.repeats)
        summary.setdefault("layout", {})[name] = {"eager_s": t_plain, "channels_last_s": t_cl}
        print(f"{name:22s} at {w}x{h}: eager {t_plain:.3f} s, channels_last {t_cl:.3f} s ({t_plain / t_cl:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

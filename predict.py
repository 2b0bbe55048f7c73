"""Predict class masks (and overlays) for a folder of photos, at their full size (6000×4000 included).

    python predict.py --checkpoint outputs/unet/best.pt --input flight/ --out predictions/
    python predict.py --checkpoint best.pt --input flight/ --out pred/ --infer-size 1500x1000 --tile 512
    python predict.py --checkpoint best.pt --input flight/ --out pred/ --skip-existing   # after an interruption

Each photo is read at the size the model works at (default: the checkpoint's evaluation size,
turned to the photo's orientation) exactly as the training data was, predicted whole or tile by
tile (--tile), and its labels are upsampled to the photo's full size strip by strip
(evaluate.upsample_labels). Writes NAME_mask.png, a palette PNG whose pixel values are the class
ids and whose palette holds the class colours (datautils.load_mask reads it back as ids), and
NAME_overlay.jpg (photo and mask blended; --no-overlay skips it). With a .onnx file (export.py)
ONNX Runtime runs the model, at the evaluation size, with the classes and the input normalisation
(mean, std) its metadata gives.

The folder runs as a pipeline: reader threads decode the next photos while the model works,
writer threads encode the finished ones, and bounded queues between them keep memory flat over
any number of photos. Photos that share a size are batched (--batch-size). A photo that cannot be
read is reported by name and the others go on. Outputs are written under a temporary name and
renamed, so an interrupted run leaves no half-written file (a second Ctrl-C included).

Exit codes: 0 every photo written; 1 some photos could not be read or written (named on stderr),
the others were; 2 bad input (an option, the checkpoint, the folder), nothing predicted; 3 the
model or the pipeline failed (e.g. out of memory), the run stopped: the photos written so far are
complete, continue with --skip-existing; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from basics import (CLASS_COLORS, InputError, atomic_write, get_device, mean as MEAN, put_until_stopped,
                    remove_temporaries, std as STD)
from checkpoint import load_state, read_checkpoint, read_onnx_props
from cli import run_cli
from datautils import PHOTO_EXTS, load_photo, open_photo, parse_size, photo_size, save_mask, unreadable_photo
from evaluate import TTA, eval_mode, sliding_window_logits, upsample_labels
from layout import ClassSet, DatasetError
from models import ChannelsLast, SingleConvolution, get_model
from ortho import add_raster_args, is_raster_input, run as run_rasters
from transforms import normalize

__all__ = ["load_model", "OnnxModel", "onnx_session", "onnx_metadata", "list_photos", "output_paths", "predict_folder", "main",
           "EXIT_PHOTOS_FAILED", "EXIT_BAD_INPUT", "EXIT_MODEL_FAILED"]

MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.jpg"

#: Exit codes besides 0 (every photo written) and 130 (interrupted).
EXIT_PHOTOS_FAILED = 1  # some photos could not be read or written; the others were
EXIT_BAD_INPUT = 2  # an option, the checkpoint or the input folder is wrong: nothing was predicted
EXIT_MODEL_FAILED = 3  # the model or the pipeline failed (e.g. out of memory): the run stopped


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="best.pt / last.pt / model.pt written by our scripts, or a .onnx file written by export.py "
                        "(then ONNX Runtime runs the model)")
    p.add_argument("--input", required=True, help="a folder of photos (or one photo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--infer-size", default=None, help="WIDTHxHEIGHT the model runs at (default: the checkpoint's)")
    p.add_argument("--tile", default=None, help="sliding-window tile N or WIDTHxHEIGHT (default: whole image)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring tiles, 0 <= overlap < 1")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/90° turns (8× slower)")
    p.add_argument("--batch-size", type=int, default=4, help="photos of one size predicted together")
    p.add_argument("--workers", type=int, default=3, help="reader threads, and as many writer threads")
    p.add_argument("--no-overlay", action="store_true", help="write only the masks")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the overlays (1-95)")
    p.add_argument("--skip-existing", action="store_true", help="leave photos whose outputs exist (resume a folder)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--device", default=None)
    add_raster_args(p)  # --gsd, --out-gsd, --vector: .tif/.tiff rasters (orthomosaics) go to ortho.py
    return p.parse_args(argv)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session on the CPU (or CUDA, where onnxruntime-gpu provides it), with
    ``threads`` intra-op threads (default: torch's thread count, i.e. the machine's cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own classes for every kind of bad file
        raise InputError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]}); export one with "
                         "export.py CHECKPOINT --out FILE.onnx") from None


def onnx_metadata(path: str | os.PathLike, session=None) -> dict:
    """The metadata export.py stored in an ONNX file (checkpoint.onnx_props): class names and
    colours, mean, std, model name, evaluation size (W, H). Raises InputError naming the file
    when it has none."""
    return read_onnx_props((session or onnx_session(path, 1)).get_modelmeta().custom_metadata_map, path)


class OnnxModel(nn.Module):
    """An exported model run by ONNX Runtime behind the interface of our torch models: normalised
    float N×3×H×W in, float32 logits out (on the input's device). So predict.py's pipeline, tiles
    and TTA run unchanged over it."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(path, threads)
        self.meta = onnx_metadata(path, self.session)
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3:
            raise InputError(f"{path}: input {inp.name} has shape {inp.shape}, expected N×3×H×W; "
                             "export the checkpoint with export.py")
        self.input_name = inp.name
        #: the input normalisation ``(pixel / 255 - mean) / std`` the metadata gives (ImageNet's in ours)
        self.mean, self.std = (_stats(path, self.meta, k) for k in ("mean", "std"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def _stats(path, meta: dict, key: str) -> tuple[float, float, float]:
    """The metadata's ``mean`` or ``std``: three numbers (std's positive), else InputError naming the file."""
    value = meta.get(key)
    try:
        value = tuple(float(v) for v in value)
        if len(value) != 3 or not all(np.isfinite(value)) or (key == "std" and min(value) <= 0):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"{path}: its metadata's {key} {value!r} is not three numbers (per RGB channel"
                         f"{', positive' if key == 'std' else ''}); export the checkpoint again with "
                         "export.py") from None
    return value


def load_model(path: str | os.PathLike, device: torch.device
               ) -> tuple[torch.nn.Module, tuple[int, int], dict]:
    """The model a checkpoint of ours describes, with its weights, its evaluation size (W, H), and
    ``{"model_name", "classes", "mean", "std"}`` (the class set it was trained on: names and
    colours, for the palette masks; the input normalisation). A ``.onnx`` file written by
    export.py gives the same from its metadata, run by ONNX Runtime."""
    if str(path).lower().endswith(".onnx"):

        model = OnnxModel(path)
        classes = ClassSet.from_dict({"names": model.meta["class_names"], "colors": model.meta["class_colors"]})
        return model, tuple(model.meta["eval_size"]), {"model_name": model.meta["model_name"], "classes": classes,
                                                       "mean": model.mean, "std": model.std}
    ck = read_checkpoint(path)
    meta = ck.meta
    model = get_model(meta.model_name, num_classes=meta.classes.num_classes, **meta.model_kwargs)
    load_state(model, ck.weights, path)
    # channels_last: as fast or faster on the CPU for every model here (up to 1.8x) but the single
    # convolution, which it slows (benchmarks/bench_engines.py --layout-models)
    model = model.to(device) if isinstance(model, SingleConvolution) else ChannelsLast(model.to(device))
    return model, tuple(meta.eval_size), {"model_name": meta.model_name, "classes": meta.classes, "mean": tuple(MEAN),
                                          "std": tuple(STD)}


def list_photos(src: str | os.PathLike) -> list[Path]:
    """The photos of a folder (sorted; our own outputs left out), or the one photo given."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder; pass --input with your photos")
    if src.is_file():
        return [src]
    photos = sorted(p for p in src.iterdir() if p.suffix.lower() in PHOTO_EXTS and not p.name.startswith(".")
                    and not p.name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX)))
    if not photos:
        raise DatasetError(f"{src}: no photos (.jpg, .jpeg, .png) found; pass a folder of photos with --input")
    seen: dict[str, Path] = {}
    for p in photos:  # a.jpg and a.png would both write a_mask.png: one result lost without a word
        key = p.stem.casefold()  # and a.jpg, A.JPG too, on a case-insensitive file system (Windows, macOS)
        if key in seen:
            raise InputError(f"{seen[key]} and {p} would write the same {p.stem}{MASK_SUFFIX}: rename one "
                             "of them (outputs are named after the photo without its extension, and some file "
                             "systems do not tell upper from lower case)")
        seen[key] = p
    return photos


def output_paths(photo: Path, out: Path, overlay: bool = True) -> list[Path]:
    """The files predicting ``photo`` writes into ``out``."""
    paths = [out / f"{photo.stem}{MASK_SUFFIX}"]
    return paths + [out / f"{photo.stem}{OVERLAY_SUFFIX}"] if overlay else paths


@dataclass
class _Item:
    path: Path
    small: np.ndarray | None = None  # the model's input, H×W×3 uint8
    size: tuple[int, int] = (0, 0)  # full (W, H), upright
    error: str | None = None


_DONE = object()


def _read(path: Path, model_size: tuple[int, int]) -> _Item:
    try:
        fw, fh = photo_size(path)
        w, h = model_size if (fw >= fh) == (model_size[0] >= model_size[1]) else model_size[::-1]
        small, _ = load_photo(path, (w, h))  # the very pixels the dataset gives at this size
        return _Item(path, small, (fw, fh))
    except DatasetError as e:
        return _Item(path, error=str(e))
    except Exception as e:  # anything else a photo can do to a decoder: report it, go on
        return _Item(path, error=str(unreadable_photo(path, e)))


def _write(item: _Item, labels: np.ndarray, out: Path, overlay: bool, alpha: float, quality: int,
           colors=CLASS_COLORS) -> None:
    mask_path, *overlay_path = output_paths(item.path, out, overlay)
    color = save_mask(labels, mask_path, colors)
    if overlay:
        # the full photo is decoded here, by the writer, so that only the writers' photos are
        # ever held at full size (memory stays flat whatever the queue holds)
        full = open_photo(item.path)
        # composite with a constant mask equals blend, and unlike blend it releases the GIL,
        # so the other threads keep working meanwhile
        opacity = Image.new("L", full.size, round(255 * alpha))
        blended = Image.composite(color.convert("RGB"), full, opacity)
        with atomic_write(overlay_path[0]) as tmp:
            blended.save(tmp, format="JPEG", quality=quality)


def _infer(model: torch.nn.Module, batch: list[_Item], device: torch.device, tile, overlap: float,
           amp: bool, stats: tuple = (MEAN, STD)) -> list[torch.Tensor]:
    """Logits of a batch of photos of one size, one tensor of its own per photo: a view into the
    batch's logits would keep all of them alive (552 MB per batch of 4 at 1500×1000) for as long
    as any one photo waits in a queue or a writer. ``stats``: the model's input (mean, std)."""
    x = torch.from_numpy(np.stack([b.small for b in batch]).transpose(0, 3, 1, 2).copy())
    x = normalize(x.to(device), *stats)
    h, w = x.shape[-2:]
    logits = sliding_window_logits(model, x, tile or (w, h), overlap, amp=amp)
    return [lg.clone() for lg in logits]


class _Flight:
    """One predict_folder call: three steps joined by two bounded queues. Reader threads decode
    photos at the model's size (``read``: jobs → ready); the calling thread batches them through
    the model (``infer``: ready → finished); writer threads upsample the labels and write the
    files (``write``: finished → disk). ``stop`` ends the readers early (an error, Ctrl-C);
    ``abort`` (a second Ctrl-C) makes the writers drop what they hold."""

    def __init__(self, todo: list[Path], out: Path, size, workers: int, queue_size: int, progress: bool,
                 write_options: tuple):
        self.out, self.size, self.write_options = out, size, write_options
        self.jobs: queue.Queue = queue.Queue()
        for path in todo:
            self.jobs.put(path)
        self.ready: queue.Queue = queue.Queue(maxsize=queue_size)  # bounded: decoded photos wait here
        self.finished: queue.Queue = queue.Queue(maxsize=queue_size)  # and predicted ones here
        self.lock, self.stop, self.abort = threading.Lock(), threading.Event(), threading.Event()
        self.written: list[Path] = []
        self.failed: dict[str, str] = {}
        self.bar = tqdm(total=len(todo), desc="predicting", unit="photo", disable=not progress)
        self.readers = [threading.Thread(target=self.read, daemon=True) for _ in range(workers)]
        self.writers = [threading.Thread(target=self.write, daemon=True) for _ in range(workers)]

    def read(self) -> None:
        """A reader thread: photos from the job list, decoded at the model's size."""
        while not self.stop.is_set():
            try:
                path = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not put_until_stopped(self.ready, _read(path, self.size), self.stop):
                return
        put_until_stopped(self.ready, _DONE, self.stop)

    def infer(self, model, device, batch_size: int, tile, overlap: float, amp: bool, stats: tuple = (MEAN, STD)
              ) -> None:
        """The calling thread: batches of decoded photos of one size through the model, its
        input normalised with ``stats`` (mean, std)."""
        with eval_mode(model), torch.inference_mode():
            pending, open_readers = None, len(self.readers)
            while open_readers or pending is not None:
                batch, pending, open_readers = self._next_batch(pending, open_readers, batch_size)
                if not batch:
                    continue
                for item, logits in zip(batch, _infer(model, batch, device, tile, overlap, amp, stats)):
                    put_until_stopped(self.finished, (item, logits), self.stop)
                del item, logits

    def _next_batch(self, pending, open_readers: int, batch_size: int) -> tuple[list, object, int]:
        """Up to batch_size photos of one size: waits for the first, takes only what is decoded."""
        batch = [pending] if pending is not None else []
        pending = None
        while len(batch) < batch_size and open_readers:
            try:
                item = self.ready.get() if not batch else self.ready.get_nowait()
            except queue.Empty:
                break
            if item is _DONE:
                open_readers -= 1
            elif item.error is not None:
                self.failed[str(item.path)] = item.error
                self.bar.update()
            elif batch and item.small.shape != batch[0].small.shape:
                pending = item  # another size: it starts the next batch
                break
            else:
                batch.append(item)
        return batch, pending, open_readers

    def write(self) -> None:
        """A writer thread: labels at the photo's full size, then the mask and overlay files."""
        while True:
            got = self.finished.get()
            if got is _DONE:
                return
            item, logits = got
            if self.abort.is_set():  # a second Ctrl-C: write nothing more
                continue
            try:  # upsampling here, not in the model's thread: torch releases the GIL, so writers run it in parallel
                labels = upsample_labels(logits, item.size[::-1]).cpu().numpy()
                _write(item, labels, self.out, *self.write_options)
                with self.lock:
                    self.written.append(item.path)
            except Exception as e:  # a full disk, a bad folder: name the photo, go on with the others
                with self.lock:
                    self.failed[str(item.path)] = f"{item.path}: cannot write its outputs to {self.out} ({e})"
            self.bar.update()

    def finish(self) -> None:
        """Wait for the readers, then let the writers finish what they hold."""
        try:
            for t in self.readers:
                t.join()
            for _ in self.writers:
                put_until_stopped(self.finished, _DONE, self.abort)
            for t in self.writers:
                t.join()
        except KeyboardInterrupt:  # a second Ctrl-C while the writers finish: stop them, leave nothing half-written
            self.abort.set()
            remove_temporaries(self.out)
            raise
        finally:
            self.bar.close()


def _input_stats(model: nn.Module, mean, std) -> tuple:
    """(mean, std) to normalise ``model``'s input with: those given, else an OnnxModel's own
    (found under wrappers such as TTA), else ImageNet's."""
    own = next((m for m in model.modules() if isinstance(m, OnnxModel)), None)
    return (tuple(mean) if mean is not None else own.mean if own is not None else tuple(MEAN),
            tuple(std) if std is not None else own.std if own is not None else tuple(STD))


def predict_folder(model: torch.nn.Module, photos: list[Path], out: str | os.PathLike, size: tuple[int, int], *,
                   device: torch.device | str = "cpu", tile: tuple[int, int] | None = None, overlap: float = 0.25,
                   batch_size: int = 4, workers: int = 3, overlay: bool = True, alpha: float = 0.5,
                   quality: int = 90, skip_existing: bool = False, amp: bool = True, queue_size: int = 2,
                   progress: bool = True, colors=CLASS_COLORS, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> dict:
    """Predict every photo into ``out``: read (decode at the model's size) → infer (batches
    through the model) → write (labels at full size, mask and overlay files), see :class:`_Flight`.

    ``size`` (W, H) is the model's input size for landscape photos (turned for portrait ones);
    ``colors`` are the class colours of the palette masks and overlays (the model's class set).
    ``mean``/``std`` normalise the model's input (default: the model's own, an :class:`OnnxModel`'s
    metadata, also under TTA; else ImageNet's, what every checkpoint here was trained with).
    Returns ``{"written": [...], "skipped": [...], "failed": {path: message}, "seconds": s}``;
    a photo that cannot be read or written lands in ``failed`` and the others go on.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [p for p in photos if skip_existing and all(o.exists() for o in output_paths(p, out, overlay))]
    todo = [p for p in photos if p not in set(skipped)]
    flight = _Flight(todo, out, size, max(1, workers), queue_size, progress, (overlay, alpha, quality, colors))
    for t in flight.readers + flight.writers:
        t.start()
    t0 = time.perf_counter()
    try:
        flight.infer(model, torch.device(device), batch_size, tile, overlap, amp, _input_stats(model, mean, std))
    except BaseException:
        flight.stop.set()  # readers blocked on a full queue give up; writers finish what they hold
        raise
    finally:
        flight.finish()
    return {"written": flight.written, "skipped": skipped, "failed": flight.failed,
            "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> int:
    raster_options = args.gsd is not None or args.out_gsd is not None or args.vector
    if is_raster_input(args.input, raster_options):  # orthomosaics: window by window on the ground
        outcome = run_rasters(args, load_model)  # predict.py's model loader (.pt or .onnx), handed over
        return {"ok": 0, "some failed": EXIT_PHOTOS_FAILED, "model failed": EXIT_MODEL_FAILED}[outcome]
    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap {args.overlap}: tiles must overlap by a fraction in [0, 1), e.g. 0.25")
    if not 1 <= args.quality <= 100:
        raise InputError(f"--quality {args.quality}: JPEG quality is 1..100 (95 and above gain little)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: predict at least one photo at a time")
    device = get_device(args.device)
    photos = list_photos(args.input)
    model, size, info = load_model(args.checkpoint, device)
    if args.tta:
        model = TTA(model)
    if args.infer_size:
        size = parse_size(args.infer_size)
    tile = None
    if args.tile:
        tile = parse_size(args.tile, square=True)
    out = Path(args.out)
    try:
        res = predict_folder(model, photos, out, size, device=device, tile=tile, overlap=args.overlap,
                             batch_size=args.batch_size, workers=args.workers, overlay=not args.no_overlay,
                             alpha=args.alpha, quality=args.quality, skip_existing=args.skip_existing,
                             amp=not args.no_amp, colors=info["classes"].colors, mean=info.get("mean"),
                             std=info.get("std"))
    except Exception as e:  # the model or the pipeline, not a photo: say so apart from failed photos
        traceback.print_exc()
        hint = " (out of memory: lower --batch-size, --infer-size or use --tile)" if "out of memory" in str(e) else ""
        print(f"error: prediction stopped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}; "
              "the outputs written so far are complete: continue with --skip-existing", file=sys.stderr)
        return EXIT_MODEL_FAILED
    n = len(res["written"])
    rate = f", {n / res['seconds']:.2f} photos/s" if n and res["seconds"] > 0 else ""
    print(f"wrote {n} mask{'s' if n != 1 else ''}{'' if args.no_overlay else ' and overlays'} to "
          f"{out.resolve()}{rate}" + (f"; {len(res['skipped'])} skipped (outputs exist)" if res["skipped"] else ""))
    if res["failed"]:
        print(f"{len(res['failed'])} photo(s) failed:", file=sys.stderr)
        for msg in res["failed"].values():
            print(f"  {msg}", file=sys.stderr)
        return EXIT_PHOTOS_FAILED
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""The one training loop every script uses: ``train(model, epochs, train_loader, loss_func, optimizer, acc_metric)``."""
from __future__ import annotations

import math
import sys
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from basics import NUM_CLASSES, device as default_device
from datautils import prepare_batch
from evaluate import evaluate_loader
from metrics import pixel_accuracy

__all__ = ["train", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "add_data_args",
           "short_error", "run_cli", "load_splits"]


def rng_state() -> dict:
    """Every random generator's state, for exact resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **payload) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise FileNotFoundError(f"{path}: cannot read checkpoint ({e}); pass an existing .pt file") from None


def train(model: nn.Module, epochs: int, train_loader, loss_func: Callable, optimizer: torch.optim.Optimizer,
          acc_metric: Callable = pixel_accuracy, *, val_loader=None, scheduler=None,
          scheduler_per_batch: bool | None = None, device: torch.device | str | None = None,
          amp: bool = True, grad_clip: float | None = None, augment: Callable | None = None,
          checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          best_path: str | os.PathLike | None = None, select_metric: str = "miou",
          num_classes: int = NUM_CLASSES, ignore_index: int | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Train ``model`` for ``epochs`` epochs and return its history.

    history has per-epoch ``train_loss`` and ``train_acc`` (mean of ``acc_metric`` over
    batches, weighted by batch size), ``lr`` and ``epoch_time_s``; with ``val_loader`` also
    ``val_loss``, ``val_acc`` (pixel accuracy) and ``val_miou`` (dataset-level). Options:
    ``scheduler`` (stepped per batch for OneCycle/poly-style schedulers, else per epoch; force
    with ``scheduler_per_batch``), bf16 autocast on CUDA (``amp``), gradient clipping,
    ``augment(x_uint8, y) -> (x_float01, y)`` on the device, ``checkpoint`` (model, optimizer,
    scheduler, epoch, history and RNG states, written atomically after each epoch), ``resume``
    from such a file (the result equals an uninterrupted run on CPU with the same seed),
    ``best_path`` (the checkpoint with the best ``val_<select_metric>``).
    A NaN or infinite loss stops training with an error naming the epoch and batch.
    """
    device = torch.device(device) if device is not None else default_device
    model.to(device)
    use_amp = amp and device.type == "cuda"
    if scheduler_per_batch is None:
        scheduler_per_batch = isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR,
                                                     torch.optim.lr_scheduler.PolynomialLR,
                                                     torch.optim.lr_scheduler.LambdaLR))
    history: dict[str, list] = {"train_loss": [], "train_acc": [], "lr": [], "epoch_time_s": []}
    if val_loader is not None:
        history.update(val_loss=[], val_acc=[], val_miou=[])
    start, best = 0, -math.inf
    if resume is not None and Path(resume).exists():
        ck = load_checkpoint(resume, map_location=device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        history, start, best = ck["history"], ck["epoch"], ck.get("best", -math.inf)
        set_rng_state(ck["rng"])

    for epoch in range(start, epochs):
        model.train()
        t0, loss_sum, acc_sum, seen = time.perf_counter(), 0.0, 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for b, batch in enumerate(bar):
            x, y = prepare_batch(batch, device, augment)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(x)
                loss = loss_func(out, y)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(
                    f"loss is {lv} at epoch {epoch + 1}, batch {b + 1}: training diverged. Lower the "
                    "learning rate (--lr), enable gradient clipping, or check the inputs of that batch.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None and scheduler_per_batch:
                scheduler.step()
            n = x.shape[0]
            loss_sum, seen = loss_sum + lv * n, seen + n
            acc_sum += float(acc_metric(out.detach(), y)) * n
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        if scheduler is not None and not scheduler_per_batch:
            scheduler.step()
        history["train_loss"].append(loss_sum / max(seen, 1))
        history["train_acc"].append(acc_sum / max(seen, 1))
        history["lr"].append(optimizer.param_groups[0]["lr"])
        line = f"epoch {epoch + 1}/{epochs}: train loss {history['train_loss'][-1]:.4f}, acc {history['train_acc'][-1]:.4f}"
        if val_loader is not None:
            res = evaluate_loader(model, val_loader, device, loss_func=loss_func, num_classes=num_classes,
                                  ignore_index=ignore_index, amp=use_amp)
            m = res["metrics"]
            history["val_loss"].append(res["loss"])
            history["val_acc"].append(m["pixel_accuracy"])
            history["val_miou"].append(m["miou"])
            line += f" | val loss {res['loss']:.4f}, acc {m['pixel_accuracy']:.4f}, mIoU {m['miou']:.4f}"
        history["epoch_time_s"].append(time.perf_counter() - t0)
        if progress:
            tqdm.write(line + f" ({history['epoch_time_s'][-1]:.1f} s)")
        score = history.get(f"val_{select_metric}", [None])[-1] if val_loader is not None else None
        if score is not None and best_path is not None and score > best:
            best = score
            save_checkpoint(best_path, model=model.state_dict(), epoch=epoch + 1, history=history,
                            best=best, select_metric=select_metric)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            epoch=epoch + 1, history=history, best=best, rng=rng_state())
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history


# --------------------------------------------------------------------------- script plumbing
# Shared by run_single_conv.py and run_experiment.py: the data options, loading, the error
# handling of a command, and the output folder's files.


def add_data_args(parser, out_default: str) -> None:
    """The options every experiment script takes."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--data-root", default=None,
                   help="dataset root (archive root, semantic_drone_dataset/ or training_set/); "
                        "default $DRONE_DATA_ROOT, else ../dataset/semantic_drone_dataset")
    g.add_argument("--demo", action="store_true", help="run on generated SYNTHETIC demo data (no dataset needed)")
    g.add_argument("--eval-split", choices=["test", "val"], default="test", help="split evaluated at the end")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader and cache-build processes")
    g.add_argument("--cache-dir", default=None, help="cache folder (default $DRONE_CACHE_DIR or ~/.cache/drone-seg)")
    g.add_argument("--no-cache", action="store_true", help="decode every photo on every access")
    g.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")


def short_error(e: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader wraps around it."""
    text = str(e)
    if "Original Traceback" in text:
        marker = f"{type(e).__name__}: "
        text = text[text.rfind(marker) + len(marker):] if marker in text else text.strip().splitlines()[-1]
    return text.strip()


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's main: bad input ends with a short message on stderr and exit code 2."""
    from datautils import DatasetError

    try:
        return main()
    except (DatasetError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def load_splits(args, size: tuple[int, int], train_split: str = "train"):
    """(train_set, eval_set) as uint8 datasets (normalised later on the device), demo or real."""
    from datautils import demo_dataset, import_drone_dataset

    root = args.data_root
    if args.demo:
        root = demo_dataset(args.cache_dir)
        print(f"using SYNTHETIC demo data (not the drone dataset) at {root}")
    return import_drone_dataset(root, size, splits=(train_split, args.eval_split), normalize=False,
                                cache=not args.no_cache, cache_dir=args.cache_dir, num_workers=args.num_workers)

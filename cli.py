"""Script plumbing shared by run_single_conv.py, run_experiment.py and predict.py: the data and
run options, loading the splits a run needs (real or demo), and turning bad input into one
line and exit code 2.

No training or evaluation happens here.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from basics import InputError

__all__ = ["add_data_args", "short_error", "run_cli", "resolve_eval_split", "load_splits"]


def add_data_args(parser, out_default: str) -> None:
    """The options every experiment script takes."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--data-root", default=None,
                   help="dataset root (archive root, semantic_drone_dataset/ or training_set/, or your own data: "
                        "images/, masks/, classes.csv); default $DRONE_DATA_ROOT, else ../dataset/semantic_drone_dataset")
    g.add_argument("--classes", default=None, help="class file (name,r,g,b[,ignore] per row) instead of the dataset's")
    g.add_argument("--splits-dir", default=None, help="folder of train.txt/val.txt/test.txt instead of the dataset's")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the 80/10/10 split made for a dataset without split lists")
    g.add_argument("--demo", action="store_true", help="run on generated SYNTHETIC demo data (no dataset needed)")
    g.add_argument("--eval-split", choices=["auto", "test", "val"], default="auto",
                   help="split of the final report (selection is always on val); auto: test where the dataset has "
                        "its test photos, else val, said in one line")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader and cache-build processes")
    g.add_argument("--cache-dir", default=None, help="cache folder (default $DRONE_CACHE_DIR or ~/.cache/drone-seg)")
    g.add_argument("--no-cache", action="store_true", help="decode every photo on every access")
    g.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch-norm statistics over all processes' batches (SyncBatchNorm)")


def short_error(e: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader wraps around it."""
    text = str(e)
    if "Original Traceback" in text:
        marker = f"{type(e).__name__}: "
        text = text[text.rfind(marker) + len(marker):] if marker in text else text.strip().splitlines()[-1]
    return text.strip()


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's main: bad input (:class:`basics.InputError`, a missing file, a diverged
    loss) ends with a short message on stderr and exit code 2; anything else is a bug and keeps
    its traceback."""
    from distributed import close_distributed, rank, world_size

    ok = False
    try:
        code = main()
        ok = True
        return code
    except (InputError, FileNotFoundError, FloatingPointError) as e:
        # under torchrun the failing rank says so; torchrun then ends the other ranks
        where = f" (rank {rank()} of {world_size()})" if world_size() > 1 else ""
        print(f"error{where}: {short_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_distributed(ok)


def resolve_eval_split(args) -> str:
    """``--eval-split auto`` made concrete, in ``args`` too: ``test`` where the dataset has its test
    photos (the demo data and a seeded split always do), else ``val``, said in one line (the shared
    1500x1000 copy holds its test photos out; the report is then on the split selection used)."""
    from datautils import PHOTO_EXTS
    from distributed import say
    from layout import MissingSplit, find_dataset, list_by_id, read_split

    if args.eval_split != "auto":
        return args.eval_split
    split = "test"
    if not args.demo:
        layout = find_dataset(args.data_root, getattr(args, "splits_dir", None))
        if layout.splits_dir is not None:  # without split lists a seeded split is made, with a test part
            try:
                ids = read_split("test", layout.splits_dir)
            except MissingSplit:
                ids = None
            photos = list_by_id(layout.image_dir, PHOTO_EXTS)
            missing = len(ids) - sum(i in photos for i in ids) if ids is not None else None
            if missing != 0:
                split = "val"
                why = "has no test list" if ids is None else f"lacks {missing} of its {len(ids)} test photos"
                say(f"--eval-split auto: {layout.root} {why}, so the final report is on val, the split the "
                    "checkpoint is selected on (--eval-split test insists on test)")
    args.eval_split = split
    return split


def load_splits(args, size: tuple[int, int], train_split: str | None = "train",
                eval_size: tuple[int, int] | None = None, extra: tuple[str, tuple[int, int]] | None = None,
                eval_mask_size: tuple[int, int] | None = None):
    """(train_set, eval_set) as uint8 datasets (normalised later on the device), demo or real;
    the eval split (``args.eval_split``) at ``eval_size`` when given, its masks at
    ``eval_mask_size`` when given. ``extra=(split, size)`` appends a third dataset (e.g. val at
    the model's size) from the same root. ``train_split=None``: the eval split alone, ``(eval_set,)``."""
    from datautils import PHOTO_EXTS, import_drone_dataset
    from demo import demo_dataset
    from distributed import is_main, main_first
    from layout import find_dataset, list_by_id, seeded_split, write_split

    with main_first():  # under torchrun rank 0 writes the demo data and the caches; the others then open them
        root = args.data_root
        if args.demo:
            root = demo_dataset(args.cache_dir)
            if is_main():
                print(f"using SYNTHETIC demo data (not the drone dataset) at {root}")
        splits_dir = getattr(args, "splits_dir", None)
        layout = find_dataset(root, splits_dir)
        resolve_eval_split(args)
        if layout.splits_dir is None:  # no split lists: a seeded split, written where the run's outputs go
            ids = list(list_by_id(layout.image_dir, PHOTO_EXTS))
            splits_dir = Path(args.out) / "splits"
            if is_main():
                write_split(seeded_split(ids, args.split_seed), splits_dir)
                print(f"{layout.root} has no split lists: made a seeded 80/10/10 split of its {len(ids)} images "
                      f"(--split-seed {args.split_seed}), written to {splits_dir}")
            else:
                splits_dir = None  # the same split, made in memory (this machine may not see rank 0's --out)
        kw = dict(normalize=False, cache=not args.no_cache, cache_dir=args.cache_dir, num_workers=args.num_workers,
                  splits_dir=splits_dir, classes=getattr(args, "classes", None),
                  split_seed=getattr(args, "split_seed", 0))
        sets = (import_drone_dataset(root, size, splits=train_split, **kw),) if train_split else ()
        sets += (import_drone_dataset(root, eval_size or size, splits=args.eval_split, mask_size=eval_mask_size, **kw),)
        if extra is not None:
            sets += (import_drone_dataset(root, extra[1], splits=extra[0], **kw),)
    return sets

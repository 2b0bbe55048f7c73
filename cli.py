"""Script plumbing shared by run_single_conv.py, run_experiment.py and predict.py: the data and
run options, loading the splits a run needs (real or demo; a dataset without split lists gets a
seeded split, which is part of the run: written with it, read back by --resume and --eval-only),
and turning bad input into one line and exit code 2.

No training or evaluation happens here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from basics import InputError

__all__ = ["command_line", "recorded_command", "add_data_args", "short_error", "run_cli", "resolve_eval_split",
           "load_splits", "Splits", "read_split_lists", "save_split", "check_scene_gsd"]

#: the split lists a run records
SPLIT_NAMES = ("train", "val", "test")


def add_data_args(parser, out_default: str) -> None:
    """The options every experiment script takes."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--data-root", default=None,
                   help="dataset root (archive root, semantic_drone_dataset/ or training_set/, or your own data: "
                        "images/, masks/, classes.csv); default $DRONE_DATA_ROOT, else ../dataset/semantic_drone_dataset")
    g.add_argument("--classes", default=None, help="class file (name,r,g,b[,ignore] per row) instead of the dataset's")
    g.add_argument("--splits-dir", default=None, help="folder of train.txt/val.txt/test.txt instead of the dataset's")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of the 80/10/10 split made for a dataset without split lists (default 0); --resume "
                        "and --eval-only read the run's own split back (another seed given there stops)")
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


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command a run records (command.txt, metrics.json, its checkpoints): the process's own
    for a script run (``argv`` None), else the script with the ``argv`` its ``main`` was given (a
    run started from Python: a notebook, a test), so the record says how to run it again."""
    import shlex

    return shlex.join(sys.argv if argv is None else [script, *argv])


def recorded_command(args, script: str) -> str:
    """``args.command`` (what a script's main sets from :func:`command_line`), else this process's
    command (the script's ``run(args)`` called directly)."""
    return getattr(args, "command", None) or command_line(script, None)


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
    from layout import MissingSplit, find_dataset, list_by_id, list_scenes, read_split

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
            # scenes: their lists name scenes (the DroneDeploy benchmark's may name scenes a download lacks)
            photos = list_scenes(layout) if layout.by_scene else list_by_id(layout.image_dir, PHOTO_EXTS)
            missing = len(ids) - sum(i in photos for i in ids) if ids is not None else None
            # none of the test photos (a copy that holds them out): val; some of them: a broken
            # dataset, which loading test then names
            if ids is None or missing == len(ids):
                split = "val"
                why = "has no test list" if ids is None else f"holds none of the {len(ids)} photos of its test list"
                say(f"--eval-split auto: {layout.root} {why}, so the final report is on val, the split the "
                    "checkpoint is selected on (--eval-split test insists on test)")
    args.eval_split = split
    return split


class Splits(tuple):
    """The datasets :func:`load_splits` returns (a tuple: unpack it), and ``record``, the split
    they come from as checkpoints store it: ``{"ids": {name: ids}, "seed": the --split-seed that
    made it (None: not made here), "lists": the dataset's split-list folder (None: a split made
    here, for a dataset without lists)}``. ``gsd``: for scenes cut into windows, the metres per
    pixel they were cut at (the training GSD; None for photos and for scenes in pixel units);
    ``scenes``: whether the data are scenes cut into windows."""

    record: dict
    gsd: float | None
    scenes: bool

    def __new__(cls, sets, record: dict, gsd: float | None = None, scenes: bool = False):
        obj = super().__new__(cls, sets)
        obj.record = record
        obj.gsd = gsd
        obj.scenes = scenes
        return obj


def read_split_lists(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The ids of the split lists (train, val, test) in ``folder`` that exist and are not empty."""
    from layout import DatasetError, read_split

    out = {}
    for name in SPLIT_NAMES:
        try:
            out[name] = read_split(name, folder)
        except DatasetError:  # no such list, or an empty one: not part of the record
            pass
    return out


def _same_split(theirs: dict[str, list[str]], lists: dict[str, list[str]], layout, checkpoint) -> None:
    """Stop with one line where the dataset's split lists differ from the split ``checkpoint`` was trained with."""
    folder = Path(layout.splits_dir)
    for name in SPLIT_NAMES:
        if name in theirs and name in lists and set(theirs[name]) != set(lists[name]):
            diff = sorted(set(theirs[name]) ^ set(lists[name]))
            if layout.by_scene:  # the lists compared are the cut's window lists; --splits-dir takes scene ids
                raise InputError(f"{layout.root}: another {name} split than the one {checkpoint} was trained with "
                                 f"({len(diff)} window(s) differ, e.g. {diff[0]}): restore the scenes it was trained "
                                 "on and their scene lists (train/val/test.txt of scene ids, in the root's splits/ or "
                                 "--splits-dir), not the window lists its run wrote")
            raise InputError(f"{folder / (name + '.txt')}: another {name} split than the one {checkpoint} was trained "
                             f"with ({len(diff)} id(s) differ, e.g. {diff[0]}): pass the split lists of its run with "
                             "--splits-dir, or the data it was trained on")


def check_scene_gsd(checkpoint, trained: float | None, splits: Splits, root) -> None:
    """Stop with one line where the scenes of ``root`` were cut (``splits``: :func:`load_splits`'
    datasets) at another GSD (metres per pixel; None: pixel units) than the one ``checkpoint``'s
    model was trained at (``trained``, its meta's ``train_gsd``; None: unknown, nothing to
    compare), beyond 1e-6 relative: e.g. scenes replaced by others of another pixel size, whose
    windows would be scored or trained at another scale without a word. Photos are not checked."""
    cut = splits.gsd
    if trained is None or not splits.scenes or (cut is not None and abs(cut - trained) <= 1e-6 * trained):
        return
    now = f"at {cut:g} m per pixel" if cut is not None else "in pixel units (no georeference in metres)"
    root = root or os.environ.get("DRONE_DATA_ROOT") or "the dataset"
    raise InputError(f"{root}: its scenes are cut {now} but {checkpoint} was trained at {trained:g} m per pixel (its "
                     "scenes replaced by others of another pixel size?): restore the scenes it was trained on, or "
                     "train a new model on these")


def _the_split(args, layout, run_split: dict | None, checkpoint) -> dict:
    """The split this invocation uses (see :class:`Splits`): the dataset's lists, a new seeded
    split, or, resuming or re-scoring a run (``checkpoint``), the run's own split."""
    from datautils import PHOTO_EXTS
    from distributed import say
    from layout import list_by_id, seeded_split

    seed = getattr(args, "split_seed", None)
    if layout.splits_dir is not None:
        lists = read_split_lists(layout.splits_dir)
        if checkpoint is not None and run_split:
            _same_split(run_split["ids"], lists, layout, checkpoint)
        return {"ids": lists, "seed": None, "lists": str(layout.splits_dir)}
    photos = list(list_by_id(layout.image_dir, PHOTO_EXTS))
    if checkpoint is None:  # a new run: a new split
        seed = 0 if seed is None else seed
        # scenes are split, not their windows: a scene's windows all land in one split
        what = (f"{len({layout.group(i) for i in photos})} scenes ({len(photos)} windows)" if layout.by_scene
                else f"{len(photos)} images")
        say(f"{layout.root} has no split lists: made a seeded 80/10/10 split of its {what} "
            f"(--split-seed {seed}), written to the output folder's splits/ with the run's first results")
        return {"ids": seeded_split(photos, seed, group=layout.group), "seed": seed, "lists": None}
    where = checkpoint
    if not run_split:  # a checkpoint from before runs recorded their split: the copy beside it
        folder = Path(checkpoint).parent / "splits"
        run_split = {"ids": read_split_lists(folder), "seed": None}
        if not run_split["ids"]:
            way = ("restore the scene lists it was trained with (scene ids) in the root's splits/ or with "
                   "--splits-dir" if layout.by_scene else "pass that run's split lists with --splits-dir")
            raise InputError(f"{checkpoint}: {layout.root} has no split lists, and neither the checkpoint nor its "
                             f"folder ({folder}) records the split it was trained on: {way}")
        where = folder
    made = run_split.get("seed")
    if seed is not None and made is not None and seed != made:
        raise InputError(f"--split-seed {seed}: {checkpoint} was trained on the split of --split-seed {made}; pass "
                         f"--split-seed {made}, or leave it out: the run's own split is read back")
    known = {i for ids in run_split["ids"].values() for i in ids}
    added = sorted(set(photos) - known)
    sizes = ", ".join(f"{len(v)} {k}" for k, v in run_split["ids"].items())
    seeded = f", --split-seed {made}" if made is not None else ""
    say(f"{layout.root} has no split lists: the run's split ({sizes}{seeded}), read back from {where}")
    if added:
        say(f"{len(added)} photo(s) of {layout.image_dir} are in none of the run's splits ({', '.join(added[:5])}"
            f"{', ...' if len(added) > 5 else ''}: added since the run began): left out")
    return {"ids": {k: list(v) for k, v in run_split["ids"].items()}, "seed": made, "lists": None}


def save_split(record: dict, out: str | os.PathLike) -> None:
    """Write a split made here (no dataset lists: ``record["lists"]`` None) to ``out``/splits, the
    run's readable copy (its checkpoints hold the ids too). On rank 0, with the run's first
    results (a checkpoint, the model): bad input, also a mask found bad while training, leaves
    nothing behind."""
    from distributed import is_main
    from layout import write_split

    if record["lists"] is None and is_main():
        write_split(record["ids"], Path(out) / "splits")


def load_splits(args, size: tuple[int, int], train_split: str | None = "train",
                eval_size: tuple[int, int] | None = None, extra: tuple[str, tuple[int, int]] | None = None,
                eval_mask_size: tuple[int, int] | None = None, run_split: dict | None = None,
                checkpoint: str | os.PathLike | None = None, window: tuple[int, int] | None = None,
                gsd: float | None = None) -> Splits:
    """(train_set, eval_set) as uint8 datasets (normalised later on the device), demo or real;
    the eval split (``args.eval_split``) at ``eval_size`` when given, its masks at
    ``eval_mask_size`` when given. ``extra=(split, size)`` appends a third dataset (e.g. val at
    the model's size) from the same root. ``train_split=None``: the eval split alone, ``(eval_set,)``.

    The split: the dataset's lists; without lists a seeded split (``args.split_seed``), or, when
    resuming or re-scoring the run of ``checkpoint``, that run's own split (``run_split``, the
    checkpoint's record; else the copy in the checkpoint's folder): photos added since are left
    out, another --split-seed stops, and split lists other than the run's stop too. The
    returned :class:`Splits` carries the record; :func:`save_split` writes a new one. Nothing is
    written here but the demo data and the caches.

    Scenes (orthomosaics) are cut into windows of ``window`` (default ``size``: pass the training
    size when ``size`` is another) at ``gsd`` metres per pixel (default the scenes' own), once,
    in the cache folder (``datautils.cut_scenes``); every dataset then reads those windows."""
    from datautils import cut_scenes, import_drone_dataset
    from demo import demo_dataset
    from distributed import is_main, main_first
    from layout import find_dataset

    with main_first():  # under torchrun rank 0 writes the demo data and the caches; the others then open them
        root = args.data_root
        if args.demo:
            root = demo_dataset(args.cache_dir)
            if is_main():
                print(f"using SYNTHETIC demo data (not the drone dataset) at {root}")
        splits_dir = getattr(args, "splits_dir", None)
        layout = find_dataset(root, splits_dir)
        resolve_eval_split(args)
        if gsd is not None and not layout.by_scene:
            raise InputError(f"--train-gsd {gsd:g}: {layout.root} holds photos, not georeferenced scenes (orthomosaics); "
                             "the option sets the scale scenes are cut at: leave it out")
        if layout.by_scene:  # cut once; the datasets below read the windows (root: the cut layout itself)
            layout = root = cut_scenes(layout, window or size, gsd, getattr(args, "classes", None), args.cache_dir)
        record = _the_split(args, layout, run_split, checkpoint)
        kw = dict(normalize=False, cache=not args.no_cache, cache_dir=args.cache_dir, num_workers=args.num_workers,
                  splits_dir=splits_dir, classes=getattr(args, "classes", None),
                  split_ids=record["ids"] if record["lists"] is None else None)
        sets = (import_drone_dataset(root, size, splits=train_split, **kw),) if train_split else ()
        sets += (import_drone_dataset(root, eval_size or size, splits=args.eval_split, mask_size=eval_mask_size, **kw),)
        if extra is not None:
            sets += (import_drone_dataset(root, extra[1], splits=extra[0], **kw),)
    return Splits(sets, record, layout.gsd, layout.by_scene)

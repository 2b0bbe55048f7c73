"""Budget runs side by side: val pixel accuracy and mIoU against training minutes, and a table.

    python tools/budget_report.py /work/runs/budget15 /work/runs/budget30 /work/runs/budget60 \
        /work/runs/budget90 --out budgets.png

Each argument is the --out folder of a ``run_experiment.py --time-limit`` run (history.json,
metrics.json). Prints one Markdown row per run: the budget, epochs, steps and minutes run, the last
epoch's val numbers (which no choice touched) and the val-selected epoch's (best val mIoU: the
selection is made on val and reported on val, so it is optimistic by that choice). Where several
runs share a budget (repeats of one command), a second table gives each budget's spread: the mean,
lowest and highest of those numbers over its runs. Saves the figure (``figures.plot_budgets``:
curves of every run over wall-clock minutes, validation included).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basics import InputError  # noqa: E402
from figures import plot_budgets  # noqa: E402

__all__ = ["budget_rows", "budget_spread"]


def _read(run: Path) -> tuple[dict, dict]:
    try:
        return (json.loads((run / "history.json").read_text()), json.loads((run / "metrics.json").read_text()))
    except (OSError, ValueError) as e:
        raise InputError(f"{run}: not a finished run_experiment.py output ({e}); pass its --out folder") from None


def budget_rows(runs: list[Path]) -> list[dict]:
    """Per run: budget, epochs, minutes, and val numbers at the last and at the val-selected epoch."""
    rows = []
    for run in runs:
        h, m = _read(run)
        at = h.get("val_epoch") or list(range(1, len(h["val_acc"]) + 1))
        best = max(range(len(at)), key=lambda i: h["val_miou"][i])
        minutes = [sum(h["epoch_time_s"][:e]) / 60 for e in at]
        budget = m.get("time_limit", m.get("time_limit_min"))  # the key of runs before RunConfig
        label = f"{run.name} ({budget:g} min)" if budget else run.name  # runs of one budget differ by folder
        # a resumed run's train_time_s is its last invocation only; runs before budget_used_s existed
        # still have every counted epoch in the history
        used = m.get("budget_used_s") or max(m["train_time_s"], sum(h["epoch_time_s"]))
        rows.append({"run": str(run), "budget_min": budget, "label": label, "epochs_run": m.get("epochs_run"),
                     "steps_run": m.get("steps_run", sum(h.get("train_steps", []))),
                     "train_min": used / 60, "last_epoch": at[-1], "last_acc": h["val_acc"][-1],
                     "last_miou": h["val_miou"][-1], "best_epoch": at[best], "best_acc": h["val_acc"][best],
                     "best_miou": h["val_miou"][best], "minutes": minutes, "acc": h["val_acc"], "miou": h["val_miou"],
                     "tta": m.get("tta"), "report_acc": m["pixel_accuracy"], "report_miou": m["miou"]})
    return rows


_SPREAD_KEYS = ("steps_run", "last_acc", "last_miou", "best_acc", "best_miou")


def budget_spread(rows: list[dict]) -> list[dict]:
    """Rows grouped by budget (in the order given): the number of runs, and the mean, lowest and
    highest of steps run and of the last and val-selected val numbers, as ``{key: (mean, lo, hi)}``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["budget_min"], []).append(r)
    spread = []
    for budget, runs in groups.items():
        row = {"budget_min": budget, "runs": len(runs)}
        for k in _SPREAD_KEYS:
            v = [r[k] for r in runs]
            row[k] = (sum(v) / len(v), min(v), max(v))
        spread.append(row)
    return spread


def _spread_cell(v: tuple, fmt: str) -> str:
    mean, lo, hi = v
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo != hi else f"{mean:{fmt}}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", default="budgets.png", help="figure file")
    args = p.parse_args(argv)
    try:
        rows = budget_rows(args.runs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| run | budget | epochs run | steps | minutes | last epoch: val acc / mIoU | "
          "val-selected epoch: val acc / mIoU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['budget_min']:g} min | {r['epochs_run']:.1f} | {r['steps_run']} | "
              f"{r['train_min']:.1f} | {r['last_acc']:.4f} / {r['last_miou']:.4f} (epoch {r['last_epoch']}) | "
              f"{r['best_acc']:.4f} / {r['best_miou']:.4f} (epoch {r['best_epoch']}) |")
    spread = budget_spread(rows)
    if any(g["runs"] > 1 for g in spread):
        print("\nSpread over the runs of each budget: mean [lowest, highest]\n")
        print("| budget | runs | steps | last: val acc | last: val mIoU | selected: val acc | selected: val mIoU |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for g in spread:
            print(f"| {g['budget_min']:g} min | {g['runs']} | {_spread_cell(g['steps_run'], '.0f')} | "
                  + " | ".join(_spread_cell(g[k], ".4f") for k in _SPREAD_KEYS[1:]) + " |")
    plot_budgets(rows, args.out)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-class IoU of several runs side by side, to read a choice class by class.

    python tools/class_table.py /work/runs/screen/base /work/runs/screen/cel --labels ce ce+lovasz

Each argument is the --out folder of a ``run_experiment.py`` run (its metrics.json: the final
evaluation, on the split it names). Prints one Markdown row per class: its share of the scored
pixels (of the first run; runs scored on one split share it) and each run's IoU, then mIoU and
pixel accuracy; a last column gives the last run's IoU minus the first's. Classes absent from the
scored split show "absent".
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basics import InputError  # noqa: E402
from cli import run_cli  # noqa: E402

__all__ = ["class_table"]


def _metrics(run: Path) -> dict:
    try:
        return json.loads((Path(run) / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{run}: no readable metrics.json ({e}); pass a run_experiment.py --out folder") from None


def _fmt(v: float) -> str:
    return "absent" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def class_table(runs: list[Path], labels: list[str] | None = None) -> str:
    """The Markdown table (see the module docstring) of the runs' per-class IoU."""
    ms = [_metrics(r) for r in runs]
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(ms):
        raise InputError(f"--labels: {len(labels)} label(s) for {len(ms)} run(s); give one per run")
    names = list(ms[0]["per_class_iou"])
    if any(list(m["per_class_iou"]) != names for m in ms[1:]):
        raise InputError("the runs have other class sets; compare runs of one dataset")
    pixels = ms[0].get("per_class_pixels") or {}
    total = sum(pixels.values()) or 1
    head = ["class", "share of pixels", *labels] + (["last - first"] if len(ms) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        ious = [m["per_class_iou"][n] for m in ms]
        share = f"{100 * pixels[n] / total:.2f} %" if n in pixels else "?"
        diff = []
        if len(ms) > 1:
            a, b = ious[0], ious[-1]
            diff = [f"{b - a:+.3f}" if None not in (a, b) and not (math.isnan(a) or math.isnan(b)) else ""]
        lines.append("| " + " | ".join([n, share, *map(_fmt, ious), *diff]) + " |")
    for key, name in (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")):
        vals = [m[key] for m in ms]
        diff = [f"{vals[-1] - vals[0]:+.4f}"] if len(ms) > 1 else []
        lines.append("| " + " | ".join([f"**{name}**", "", *(f"{v:.4f}" for v in vals), *diff]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run_experiment.py --out folders")
    p.add_argument("--labels", nargs="+", default=None, help="a column title per run (default: folder names)")
    args = p.parse_args(argv)

    def go() -> int:
        print(class_table(args.runs, args.labels))
        return 0
    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())

"""The README's Quick start cannot rot: its commands run as written on generated data, with the
shared copy's path replaced by that data and a tiny budget, and give what the README promises."""
import json
import re
import shlex

import numpy as np
import pytest

from conftest import REPO
from demo import make_demo_dataset

SHARED_PATH = "../shared/data/drone-1500x1000"


def quick_start_commands() -> list[str]:
    """The `python ...` lines of the bash blocks under the README's "## Quick start" heading."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    assert not any(line.endswith("\\") for line in lines), "one command a line: the test runs each line"
    return [line for line in lines if line.startswith("python ")]


def _main(script: str):
    import export
    import predict
    import run_experiment
    import run_single_conv
    return {"run_single_conv.py": run_single_conv.main, "run_experiment.py": run_experiment.main,
            "predict.py": predict.main, "export.py": export.main}[script]


def test_quick_start_names_the_four_steps_and_the_short_best_command():
    commands = [shlex.split(c) for c in quick_start_commands()]
    assert {c[1] for c in commands} == {"run_single_conv.py", "run_experiment.py", "predict.py", "export.py"}
    (best,) = [c for c in commands if c[1] == "run_experiment.py"]
    # the best recipe is the default: the command names only the data and the budget
    assert best[2:] == ["--data-root", SHARED_PATH, "--time-limit", best[5]] and float(best[5]) > 0


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    root = make_demo_dataset(tmp_path / "data", n=6, size=(120, 80), seed=4, split_counts=(4, 1, 1))
    monkeypatch.chdir(tmp_path)  # outputs/ of the commands land here
    said = {}
    for line in quick_start_commands():
        argv = [a.replace(SHARED_PATH, str(root)) for a in shlex.split(line)[1:]]
        script, args = argv[0], argv[1:]
        if "--time-limit" in args:  # a tiny budget
            args[args.index("--time-limit") + 1] = "0.05"
        if script == "run_single_conv.py":  # its budget is epochs
            args += ["--epochs", "1"]
        code = _main(script)(args)
        said[script] = capsys.readouterr()
        assert code == 0, (line, said[script].err[-2000:])

    # the best command trained the measured budget recipe and reported on test (the data has its photos)
    m = json.loads((tmp_path / "outputs" / "unet_lite0" / "metrics.json").read_text())
    assert (m["model"], m["pretrained"], m["crop"], m["scale"], m["encoder_lr_mult"], m["batch_size"], m["lr"],
            m["train_size"]) == ("unet_lite0", True, [256, 256], [0.7, 1.4], 0.5, 8, 2e-3, [600, 400])
    assert m["eval_split"] == "test" and m["selected_on"] == "val" and m["time_limit"] == 0.05
    for name in ("best.pt", "last.pt", "history.json", "curves.png", "confusion.png", "qualitative.png"):
        assert (tmp_path / "outputs" / "unet_lite0" / name).stat().st_size > 0, name

    # predictions of the .pt and of its ONNX export: a palette mask per photo, the same labels
    from datautils import PHOTO_EXTS, load_mask
    from layout import find_dataset, list_by_id
    photos = list_by_id(find_dataset(root).image_dir, PHOTO_EXTS)
    outs = {}
    for name in ("flight", "flight_onnx"):
        folder = tmp_path / "outputs" / name
        masks = sorted(folder.glob("*_mask.png"))
        assert [p.name[:-len("_mask.png")] for p in masks] == sorted(photos)
        assert all(load_mask(p)[1] == (120, 80) for p in masks)  # each photo's own size, not the model's
        assert sorted(p.name[:-len("_overlay.jpg")] for p in folder.glob("*_overlay.jpg")) == sorted(photos)
        outs[name] = np.stack([load_mask(p)[0] for p in masks])
    assert (outs["flight"] == outs["flight_onnx"]).mean() > 0.99

    # the demo run: the blog's report, on synthetic data that says so
    out = tmp_path / "outputs" / "single_conv"
    for name in ("metrics.json", "history.json", "curves.png", "qualitative.png", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert {"mean_pixel_accuracy", "pixel_accuracy", "miou", "per_class_iou", "per_image", "wall_time_s", "device",
            "seed", "args"} <= set(m)
    assert m["synthetic_demo_data"] is True and m["device"] == "cpu" and m["eval_split"] == "test"
    assert 0.3 < m["mean_pixel_accuracy"] <= 1.0  # the synthetic scenes are learnable, even in one epoch
    printed = said["run_single_conv.py"].out
    assert "644" in printed and "[-1, 23, 400, 600]" in printed and "SYNTHETIC" in printed
    assert "running on the CPU" in printed


@pytest.mark.parametrize("name", ["README.md"])
def test_readme_shows_the_ci_test_command(name):
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in (REPO / name).read_text()


def test_example_figure_shows_the_median_photo_small(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    import example_figure
    import run_single_conv
    from PIL import Image

    assert example_figure.median_index([0.9, 0.1, 0.5, 0.7]) == 2 and example_figure.median_index([3.0]) == 0
    root = make_demo_dataset(tmp_path / "data", n=8, size=(96, 64), seed=5, split_counts=(4, 3, 1))
    assert run_single_conv.main(["--data-root", str(root), "--epochs", "1", "--size", "96x64",
                                 "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "example.jpg"
    capsys.readouterr()
    assert example_figure.main(["--checkpoint", str(tmp_path / "run" / "model.pt"), "--data-root", str(root),
                                "--out", str(out), "--width", "600"]) == 0
    said = capsys.readouterr().out
    assert "median pixel accuracy of val" in said
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.width == 600
    assert out.stat().st_size < 300 * 1024
    assert example_figure.main(["--checkpoint", str(tmp_path / "run" / "model.pt"), "--data-root", str(root),
                                "--out", str(out), "--id", "nope"]) == 2

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from datautils import make_demo_dataset
import run_single_conv

MODULES = ["basics", "datautils", "metrics", "evaluate", "train", "models"]


@pytest.mark.parametrize("module", MODULES)
def test_star_import_in_fresh_interpreter(module, tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        t = time.perf_counter()
        import {module} as mod
        ns = {{}}
        exec("from {module} import *", ns)
        names = set(ns) - {{"__builtins__"}}
        assert names == set(mod.__all__), names ^ set(mod.__all__)
        assert all(not n.startswith("_") for n in names)
        print(len(names))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DRONE_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(REPO / "run_single_conv.py"), "--demo", "--epochs", "2", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("metrics.json", "history.json", "curves.png", "qualitative.png", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert {"mean_pixel_accuracy", "pixel_accuracy", "miou", "per_class_iou", "per_image", "wall_time_s", "device",
            "seed", "args"} <= set(m)
    assert m["synthetic_demo_data"] is True and m["device"] == "cpu"
    assert 0.5 < m["mean_pixel_accuracy"] <= 1.0  # the synthetic scenes are learnable
    assert len(json.loads((out / "history.json").read_text())["train_loss"]) == 2
    assert "644" in r.stdout and "[-1, 23, 400, 600]" in r.stdout and "SYNTHETIC" in r.stdout
    assert "running on the CPU" in r.stdout


def test_missing_root_exits_cleanly(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "run_single_conv.py"), "--data-root", str(tmp_path / "nope")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "nope" in r.stderr and "DRONE_DATA_ROOT" in r.stderr and "--demo" in r.stderr


def _damage(root, what):
    sds = root / "dataset/semantic_drone_dataset"
    if what == "photo-without-mask":
        (sds / "label_images_semantic/003.png").unlink()
        return "003.jpg"
    if what == "mask-without-photo":
        (sds / "original_images/003.jpg").unlink()
        return "003.png"
    if what == "split-ids-missing":
        (root / "splits/test.txt").write_text("777\n")
        return "--eval-split val"
    if what == "truncated-photo":
        p = sds / "original_images/000.jpg"
        p.write_bytes(p.read_bytes()[:150])
        return "000.jpg"
    if what == "mask-values":
        from PIL import Image
        Image.new("L", (48, 32), 40).save(sds / "label_images_semantic/000.png")
        return "000.png"
    if what == "size-mismatch":
        from PIL import Image
        Image.new("L", (40, 30), 1).save(sds / "label_images_semantic/000.png")
        return "000.png"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["photo-without-mask", "mask-without-photo", "split-ids-missing",
                                  "truncated-photo", "mask-values", "size-mismatch"])
@pytest.mark.parametrize("cache", [True, False])
def test_bad_input_gives_short_message_and_exit_code(tmp_path, capsys, what, cache):
    root = make_demo_dataset(tmp_path / "d", n=6, size=(48, 32), split_counts=(4, 1, 1))
    needle = _damage(root, what)
    capsys.readouterr()
    argv = ["--data-root", str(root), "--size", "24x16", "--epochs", "1", "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c")] + ([] if cache else ["--no-cache"])
    code = run_single_conv.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and needle in err and "Traceback" not in err
    assert len(err) < 1200

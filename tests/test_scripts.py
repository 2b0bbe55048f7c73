import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from demo import make_demo_dataset
import run_single_conv

MODULES = ["basics", "datautils", "layout", "cache", "transforms", "demo", "metrics", "evaluate", "figures", "losses", "train", "ortho",
           "cli", "distributed", "models", "checkpoint", "predict", "export"]


def test_star_imports_give_the_public_names_and_importing_is_light(tmp_path):
    # one fresh interpreter for all modules (one per module cost ~3 s each): a star import gives
    # exactly __all__ whatever was imported before; importing every module of ours loads no
    # package beyond the dependencies imported first (matplotlib, onnx, torch's compiler stay
    # lazy) and writes nothing
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy, PIL.Image, torch, torchvision, tqdm  # the dependencies' own import is theirs
        before = set(sys.modules)
        mods = {{m: __import__(m) for m in {MODULES!r}}}
        loaded = sorted(m for m in set(sys.modules) - before if m.split(".")[0] not in mods)
        bad = {{}}
        for name, mod in mods.items():
            ns = {{}}
            exec(f"from {{name}} import *", ns)
            names = set(ns) - {{"__builtins__"}}
            if names != set(mod.__all__) or any(n.startswith("_") for n in names):
                bad[name] = sorted(names ^ set(mod.__all__)) or sorted(names)
        print(json.dumps({{"loaded": loaded, "bad": bad, "sizes": [len(m.__all__) for m in mods.values()]}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bad"] == {}
    heavy = [m for m in out["loaded"] if m.split(".")[0] != "tqdm" and not m.startswith("torch._C")]
    assert heavy == [], heavy
    assert all(n > 0 for n in out["sizes"]) and len(out["sizes"]) == len(MODULES)
    assert list(tmp_path.iterdir()) == []


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
    if what == "split-ids-missing":
        argv += ["--eval-split", "test"]  # asked for by name (auto would report on val, said in one line)
    code = run_single_conv.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and needle in err and "Traceback" not in err
    assert len(err) < 1200


def _experiment(root, out, *extra):
    import run_experiment
    argv = ["--model", "single_conv", "--data-root", str(root), "--train-size", "48x32", "--crop", "32",
            "--batch-size", "4", "--epochs", "3", "--lr", "0.05", "--out", str(out), "--cache-dir",
            str(out.parent / "cache"), *extra]
    assert run_experiment.main(argv) == 0
    return json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_selection_is_made_on_val_and_reported_on_eval_split(tmp_path):
    from datautils import import_drone_dataset, make_loader
    from evaluate import evaluate_loader
    from models import get_model
    from checkpoint import load_checkpoint
    root = make_demo_dataset(tmp_path / "d", n=12, size=(96, 64), seed=4, split_counts=(8, 2, 2))
    m = _experiment(root, tmp_path / "o", "--eval-split", "test")
    assert m["selected_on"] == "val" and m["eval_split"] == "test"
    best = load_checkpoint(tmp_path / "o" / "best.pt")
    hist = best["history"]
    assert best["best"] == max(hist["val_miou"]) and m["best_epoch"] == best["epoch"]
    # the val scores that chose the epoch are the val split's, not the reported split's
    model = get_model("single_conv")
    model.load_state_dict(best["model"])
    val = import_drone_dataset(root, (48, 32), "val", normalize=False, cache=False)
    res = evaluate_loader(model, make_loader(val, 4, shuffle=False), "cpu")
    assert res["metrics"]["miou"] == pytest.approx(best["best"], abs=1e-12)
    assert len(m["per_image"]) == 2 and set(m["per_image"]) == set((root / "splits/test.txt").read_text().split())


def test_without_a_val_split_the_last_epoch_is_reported(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n=10, size=(96, 64), seed=4, split_counts=(8, 0, 2))
    (root / "splits/val.txt").unlink(missing_ok=True)
    m = _experiment(root, tmp_path / "o", "--eval-split", "test")
    assert m["selected_on"] == "last_epoch" and m["best_epoch"] == m["epochs_run"] == 3
    assert not (tmp_path / "o" / "best.pt").exists()


def test_predict_rejects_an_overlap_of_one(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import predict
    from models import SingleConvolution
    from checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "m.pt", model=SingleConvolution().state_dict(), model_name="single_conv",
                    model_kwargs={}, size=[48, 32])
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(photos / "a.jpg")
    args = ["--checkpoint", str(tmp_path / "m.pt"), "--input", str(photos), "--out", str(tmp_path / "p")]
    assert predict.main(args + ["--overlap", "0.5"]) == 0  # everything else is fine
    capsys.readouterr()
    assert predict.main(args + ["--overlap", "1"]) == 2
    assert "--overlap 1" in capsys.readouterr().err


def test_summary_runs_on_a_cpu_copy_and_returns_the_table(monkeypatch):
    import torchsummary
    from basics import summary
    from models import SingleConvolution
    calls = []

    def fake(m, size, batch_size, device):
        calls.append((m, device))
        print("the table")

    monkeypatch.setattr(torchsummary, "summary", fake)
    model = SingleConvolution()
    table = summary(model, (3, 8, 8))
    (copy, device), = calls
    assert device == "cpu" and copy is not model and next(copy.parameters()).device.type == "cpu"
    assert table == "the table" and repr(table) == "the table"  # print(summary(...)) prints the table, not None


def test_seed_everything_leaves_pythonhashseed_alone(monkeypatch):
    from basics import seed_everything
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed_everything(5)
    assert "PYTHONHASHSEED" not in os.environ


def test_encoder_learning_rate_and_frozen_first_epochs(tmp_path):
    import torch
    from basics import seed_everything
    from models import get_model
    from checkpoint import load_checkpoint
    root = make_demo_dataset(tmp_path / "d", n=8, size=(96, 64), seed=4, split_counts=(4, 2, 2))
    out = tmp_path / "o"
    import run_experiment
    assert run_experiment.main(["--model", "unet_lite0", "--data-root", str(root), "--train-size", "64x64",
                                "--crop", "64", "--batch-size", "4", "--epochs", "1", "--lr", "0.01",
                                "--encoder-lr-mult", "0.1", "--freeze-encoder-epochs", "1", "--no-pretrained",
                                "--out", str(out),
                                "--eval-split", "val"]) == 0
    ck = load_checkpoint(out / "last.pt")
    assert [g["max_lr"] for g in ck["optimizer"]["param_groups"]] == pytest.approx([0.001, 0.01])
    hist = json.loads((out / "history.json").read_text())  # "lr" is --lr's group; the encoder's is named
    assert hist["lr"][0] == pytest.approx(10 * hist["lr_encoder"][0]) and hist["lr"][0] > hist["lr_encoder"][0]
    seed_everything(0)
    init = dict(get_model("unet_lite0").named_parameters())
    trained = ck["model"]
    enc = [k for k in init if k.startswith("net.encoder.")]
    assert enc and all(torch.equal(init[k], trained[k]) for k in enc)  # frozen for its first epoch
    assert not torch.equal(init["net.classifier.weight"], trained["net.classifier.weight"])


def test_no_module_imports_a_private_name_of_another():
    import ast
    ours = {p.stem for p in REPO.glob("*.py")} | {"models"}
    offences = []
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "models").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours | {""}:
                offences += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and a.name != "__future__"]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                offences.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_the_blog_names_come_from_where_the_blog_imports_them():
    namespace = {}
    exec("from datautils import *\nfrom metrics import *\nfrom evaluate import *\nfrom train import *\n"
         "from models import *", namespace)
    for name in ("import_drone_dataset", "DroneDataset", "pixel_accuracy", "ModelEvaluation", "train",
                 "SingleConvolution"):
        assert name in namespace, name


def _module_ast(path):
    import ast
    return ast.parse(path.read_text())


def test_every_public_name_has_one_home():
    """A name in a module's __all__ is defined there (the models package's __init__ presents its
    submodules' classes: that is the package's one face)."""
    import ast
    offences = []
    for path in sorted(REPO.glob("*.py")):
        tree = _module_ast(path)
        defined, public = set(), []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names = t.elts if isinstance(t, ast.Tuple) else [t]
                    defined.update(n.id for n in names if isinstance(n, ast.Name))
                    if isinstance(t, ast.Name) and t.id == "__all__":
                        public = [e.value for e in node.value.elts]
        if path.name == "basics.py":  # the blog's toolkit: what its notebooks use after `from basics import *`
            import basics
            defined.update(basics.TOOLKIT)
        else:
            offences += [f"{path.name}: {n} (basics' toolkit)" for n in public if n in {"torch", "nn", "np", "time",
                                                                                    "tqdm", "DataLoader", "summary"}]
        offences += [f"{path.name}: {n}" for n in public if n not in defined]
    assert not offences, offences


def test_no_two_modules_import_each_other():
    """Also through imports inside functions: the module graph has no cycle."""
    import ast
    ours = {p.stem for p in REPO.glob("*.py")} | {"models"}
    graph = {}
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "models").glob("*.py")):
        name = "models" if path.parent.name == "models" else path.stem
        deps = graph.setdefault(name, set())
        for node in ast.walk(_module_ast(path)):
            mods = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            deps.update(m.split(".")[0] for m in mods if m.split(".")[0] in ours and m.split(".")[0] != name)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(graph)) if c]
    assert not cycles, cycles[0]


def test_eval_split_auto_reports_on_val_where_the_test_photos_are_held_out(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "d", n=6, size=(48, 32), split_counts=(4, 1, 1))
    sds = root / "dataset" / "semantic_drone_dataset"
    argv = ["--data-root", str(root), "--size", "24x16", "--epochs", "1", "--cache-dir", str(tmp_path / "c")]
    (root / "splits" / "test.txt").write_text("777\n778\n")  # held out, as in the shared copy
    assert run_single_conv.main(argv + ["--out", str(tmp_path / "o")]) == 0
    said = capsys.readouterr()
    assert "holds none of the 2 photos of its test list, so the final report is on val" in said.out
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["eval_split"] == "val" and list(m["per_image"]) == (root / "splits" / "val.txt").read_text().split()
    # some test photos there, some not: a broken dataset, named, not a quiet switch to val
    (root / "splits" / "test.txt").write_text(f"{sorted(p.stem for p in (sds / 'original_images').iterdir())[-1]}\n777\n")
    assert run_single_conv.main(argv + ["--out", str(tmp_path / "o2")]) == 2
    assert "777" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert run_single_conv.main(argv + ["--out", str(tmp_path / "o3"), "--eval-split", "test"]) == 2

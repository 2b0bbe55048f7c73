"""Your own aerial data: the generic layout, any class set (with an ignored colour), seeded splits,
the class set travelling with the model, --init-from, and one-line errors for bad input."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import run_experiment
import run_single_conv
from conftest import REPO
from datautils import import_drone_dataset, load_mask
from demo import make_demo_dataset
from layout import IGNORE, read_classes
from models import get_model
from train import load_checkpoint, save_checkpoint

sys.path.insert(0, str(REPO / "tools"))
from regroup_dataset import GROUPS, regroup  # noqa: E402

NAMES = [g[0] for g in GROUPS[1:]]  # the 6 trained classes; "unlabelled" is ignored
TINY = ["--model", "unet", "--base", "8", "--depth", "2", "--train-size", "48x32", "--crop", "32",
        "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """A 6-class dataset in the generic layout: colour masks, an ignored colour, no split lists."""
    folder = tmp_path_factory.mktemp("own")
    demo = make_demo_dataset(folder / "demo", n=12, size=(96, 64), seed=6, mask_form="index")
    root = regroup(demo, folder / "six")
    for path in (root / "masks").glob("*.png"):  # an unlabelled border in every mask: the ignored colour
        arr = np.asarray(Image.open(path).convert("RGB")).copy()
        arr[:3], arr[:, :3] = 0, 0
        Image.fromarray(arr).save(path)
    return root


def _copy(six, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(six, dst)
    return dst


def test_the_generic_layout_reads_its_class_set_ignores_a_colour_and_splits_by_seed(six):
    classes = read_classes(six / "classes.csv")
    assert list(classes.names) == NAMES and classes.num_classes == 6
    train, val, test = import_drone_dataset(six, (96, 64), ("train", "val", "test"), cache=False, normalize=False)
    assert (len(train), len(val), len(test)) == (10, 1, 1)  # 80/10/10 of 12, at least one each
    assert not set(train.ids) & set(val.ids) and not set(train.ids) & set(test.ids)
    again = import_drone_dataset(six, (96, 64), "val", cache=False, normalize=False, split_seed=0)
    other = import_drone_dataset(six, (96, 64), "val", cache=False, normalize=False, split_seed=1)
    assert again.ids == val.ids and (other.ids != val.ids or len(val) == 1)
    _, mask = train[0]
    rgb = np.asarray(Image.open(six / "masks" / f"{train.ids[0]}.png").convert("RGB"))
    black = (rgb == 0).all(-1)
    assert black.any() and (mask.numpy()[black] == IGNORE).all()  # the "unlabelled" colour: never trained on
    assert mask.numpy()[~black].max() < 6
    from losses import class_weights
    assert class_weights(train, cache_dir=six.parent / "w").shape == (6,)  # --loss wce on 6 classes


def test_a_run_on_own_data_names_its_classes_and_predict_draws_them(six, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_experiment.main(TINY + ["--data-root", str(six), "--epochs", "2", "--out", str(out),
                                       "--eval-split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "no split lists: made a seeded 80/10/10 split" in printed and (out / "splits" / "val.txt").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == NAMES and list(m["per_class_iou"]) == NAMES
    assert m["class_colors"] == [list(g[1]) for g in GROUPS[1:]]
    assert load_checkpoint(out / "best.pt")["meta"]["classes"]["names"] == NAMES
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(six / "images" / f"{m['per_image'].popitem()[0]}.jpg", photos / "a.jpg")
    assert predict.main(["--checkpoint", str(out / "best.pt"), "--input", str(photos), "--out",
                         str(tmp_path / "pred")]) == 0
    im = Image.open(tmp_path / "pred" / "a_mask.png")
    assert im.mode == "P" and list(im.getpalette()[:18]) == [v for g in GROUPS[1:] for v in g[1]]
    ids, _ = load_mask(tmp_path / "pred" / "a_mask.png")
    assert ids.max() < 6  # read back as ids of the 6 classes


def test_init_from_a_23_class_checkpoint_and_refusal_without_it(six, tmp_path, capsys):
    torch.manual_seed(0)
    drone = get_model("unet", base=8, depth=2)  # 23 classes
    ck = tmp_path / "drone.pt"
    save_checkpoint(ck, model=drone.state_dict(), meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2}})
    common = TINY + ["--data-root", str(six), "--epochs", "1", "--eval-split", "val", "--no-cache"]
    assert run_experiment.main(common + ["--weights", str(ck), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error") == 1 and "trained on 23 classes" in err and err.endswith(f"--init-from {ck} instead")
    assert run_experiment.main(common + ["--init-from", str(ck), "--out", str(tmp_path / "i")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--init-from"))
    own = get_model("unet", num_classes=6, base=8, depth=2).state_dict()
    new = [k for k, v in own.items() if v.shape != drone.state_dict()[k].shape]  # the classifier
    assert new and f"loaded {len(own) - len(new)} of {len(own)} tensors" in line
    assert line.endswith("; new (other shape): " + ", ".join(new))


def _rewrite_mask(root, i, fn):
    path = sorted((root / "masks").glob("*.png"))[i]
    arr = np.asarray(Image.open(path))
    Image.fromarray(fn(arr.copy())).save(path)
    return path


def _bad(kind, root):
    """Damage the dataset at ``root``; returns the name that the one-line error must mention."""
    csv = root / "classes.csv"
    if kind == "value_beyond_classes":
        path = _rewrite_mask(root, 0, lambda a: np.where((a == 0).all(-1), 9, 1).astype(np.uint8))  # index PNG
        return [path.name, "found 9", "classes.csv"]
    if kind == "colour_not_in_classes":
        def paint(a):
            a[:2, :2] = (1, 2, 3)
            return a
        return [_rewrite_mask(root, 0, paint).name, "RGB(1, 2, 3)", "classes.csv"]
    if kind == "duplicate_name":
        csv.write_text(csv.read_text() + "ground,1,2,3\n")
        return ["classes.csv", "'ground' appears twice"]
    if kind == "duplicate_colour":
        csv.write_text(csv.read_text() + "road,128,64,128\n")
        return ["classes.csv", "(128, 64, 128) appears twice"]
    if kind == "missing_columns":
        csv.write_text(csv.read_text() + "road,1,2\n")
        return ["classes.csv", "line 9", "name,r,g,b"]
    if kind == "photo_without_mask":
        path = sorted((root / "masks").glob("*.png"))[0]
        path.unlink()
        return [path.stem, "without a mask"]
    if kind == "mask_without_photo":
        path = sorted((root / "images").glob("*.jpg"))[0]
        path.unlink()
        return [path.stem, "without a photo"]
    if kind == "empty_split":
        (root / "splits").mkdir()
        first = sorted((root / "images").glob("*.jpg"))[0].stem
        for name, ids in (("train", f"{first}\n"), ("val", ""), ("test", "")):
            (root / "splits" / f"{name}.txt").write_text(ids)
        return ["val.txt", "empty"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["value_beyond_classes", "colour_not_in_classes", "duplicate_name", "duplicate_colour",
                                  "missing_columns", "photo_without_mask", "mask_without_photo", "empty_split"])
def test_bad_own_data_gives_one_line_naming_the_file(six, tmp_path, capsys, kind):
    root = _copy(six, tmp_path)
    words = _bad(kind, root)
    rc = run_single_conv.main(["--data-root", str(root), "--epochs", "1", "--size", "48x32", "--no-cache",
                               "--out", str(tmp_path / "o"), "--eval-split", "val"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("error") == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # progress bars may come before it
    assert last.startswith("error: ") and all(w in last for w in words), (words, last)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_tif_files_and_other_header_spellings(six, tmp_path):
    root = _copy(six, tmp_path)
    photo = sorted((root / "images").glob("*.jpg"))[0]
    Image.open(photo).save(photo.with_suffix(".tif"))
    photo.unlink()
    mask = root / "masks" / f"{photo.stem}.png"
    Image.open(mask).save(mask.with_suffix(".tif"))
    mask.unlink()
    csv = root / "classes.csv"
    csv.write_text(csv.read_text().replace("name,r,g,b,ignore", "class_name,R,G,B,ignore"))
    ds = import_drone_dataset(root, (96, 64), "trainval", cache=False, normalize=False)
    assert len(ds) == 11 and ds.classes.num_classes == 6
    tif = import_drone_dataset(root, (96, 64), "train", cache=False, normalize=False)
    assert photo.stem in ds.ids and all(m.suffix in (".png", ".tif") for _, m in tif.pairs)

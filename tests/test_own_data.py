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
from layout import IGNORE, ClassSet, read_classes
from models import get_model
from checkpoint import load_checkpoint, save_checkpoint

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


def six_ids(root):
    return sorted(p.stem for p in (root / "images").glob("*.jpg"))


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
    # the same seed, the same split; another seed, another choice of held-out photos (compared
    # on the whole split: val alone holds one id, which two seeds may share)
    again = import_drone_dataset(six, (96, 64), ("train", "val", "test"), cache=False, normalize=False, split_seed=0)
    other = import_drone_dataset(six, (96, 64), ("train", "val", "test"), cache=False, normalize=False, split_seed=1)
    assert [d.ids for d in again] == [train.ids, val.ids, test.ids]
    assert set(other[0].ids) != set(train.ids) and sorted(sum((d.ids for d in other), [])) == sorted(six_ids(six))
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
    # read back with the model's class set (its 6 classes, no ignored row): the pixel values are
    # the class ids, and each pixel's palette colour is its class's colour
    model_classes = ClassSet.from_dict(load_checkpoint(out / "best.pt")["meta"]["classes"])
    ids, _ = load_mask(tmp_path / "pred" / "a_mask.png", colors=model_classes)
    assert np.array_equal(ids, np.asarray(im)) and ids.max() < 6
    rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb, np.asarray(model_classes.colors, np.uint8)[ids])


def test_init_from_a_23_class_checkpoint_and_refusal_without_it(six, tmp_path, capsys):
    torch.manual_seed(0)
    drone = get_model("unet", base=8, depth=2)  # 23 classes
    ck = tmp_path / "drone.pt"
    save_checkpoint(ck, model=drone.state_dict(), meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2}})
    common = TINY + ["--data-root", str(six), "--epochs", "1", "--eval-split", "val", "--no-cache"]
    assert run_experiment.main(common + ["--weights", str(ck), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error") == 1 and "trained on 23 classes" in err and err.endswith(f"--init-from {ck} instead")
    assert not (tmp_path / "w").exists()  # refused before anything was written (the seeded split included)
    assert run_experiment.main(common + ["--init-from", str(ck), "--out", str(tmp_path / "i")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--init-from"))
    own = get_model("unet", num_classes=6, base=8, depth=2).state_dict()
    new = [k for k, v in own.items() if v.shape != drone.state_dict()[k].shape]  # the classifier
    assert new and f"loaded {len(own) - len(new)} of {len(own)} tensors" in line
    # the two drone classes of the same name keep their rows; the others start fresh
    assert line.endswith(f"; classifier ({', '.join(new)}): rows of 2 of 6 classes taken by name (vegetation, "
                         "water), new: ground, structure, vehicle, person-animal")


def test_init_from_takes_the_classifier_rows_by_class_name(six, tmp_path, capsys):
    """The same class count in another order, one name other: each class gets its own row of the
    old classifier, the new name a fresh one, and the line says so (not "loaded 66 of 66")."""
    theirs = ["vegetation", "ground", "water", "structure", "person-animal", "boat"]
    torch.manual_seed(123)  # not the run's seed: its fresh rows differ from these
    old = get_model("unet", num_classes=6, base=8, depth=2)
    ck = tmp_path / "other_order.pt"
    colors = [[i, i, i] for i in range(6)]
    save_checkpoint(ck, model=old.state_dict(), meta={"model_name": "unet", "model_kwargs": {"base": 8, "depth": 2},
                                                      "classes": {"names": theirs, "colors": colors}})
    out = tmp_path / "i"
    # --lr 0: the weights stay as --init-from set them
    assert run_experiment.main(TINY + ["--data-root", str(six), "--epochs", "1", "--eval-split", "val", "--no-cache",
                                       "--lr", "0", "--init-from", str(ck), "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--init-from"))
    n = len(old.state_dict())
    assert f"loaded {n - 2} of {n} tensors" in line
    assert line.endswith("; classifier (net.out.weight, net.out.bias): rows of 5 of 6 classes taken by name "
                         "(ground, vegetation, water, structure, person-animal), new: vehicle")
    trained, before = load_checkpoint(out / "last.pt")["model"], old.state_dict()
    for j, name in enumerate(NAMES):
        for key in ("net.out.weight", "net.out.bias"):
            if name in theirs:
                assert torch.equal(trained[key][j], before[key][theirs.index(name)]), (name, key)
            else:  # a fresh row, none of the old ones
                assert not any(torch.equal(trained[key][j], row) for row in before[key]), (name, key)


def test_init_from_refuses_a_checkpoint_of_which_no_parameter_fits(six, tmp_path, capsys):
    # another width: only the batch norms' num_batches_tracked counters match by name and shape
    ck = tmp_path / "wide.pt"
    save_checkpoint(ck, model=get_model("unet", base=16, depth=2).state_dict(),
                    meta={"model_name": "unet", "model_kwargs": {"base": 16, "depth": 2}})
    capsys.readouterr()
    assert run_experiment.main(TINY + ["--data-root", str(six), "--epochs", "1", "--eval-split", "val", "--no-cache",
                                       "--init-from", str(ck), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert err.count("error") == 1 and str(ck) in last and "no parameter" in last and "--base" in last, err
    assert not (tmp_path / "o").exists()


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
    assert not (tmp_path / "o").exists()  # nothing written before the bad input was found (no seeded split either)


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


@pytest.fixture(scope="module")
def void(six, tmp_path_factory):
    """``six`` with 8-bit index masks (values are class-file rows): the ignored first row on the
    border, and a patch of the value 255 (the usual "void") in every mask."""
    root = tmp_path_factory.mktemp("void") / "data"
    shutil.copytree(six, root)
    colors = np.asarray([g[1] for g in GROUPS], np.int64)
    for path in (root / "masks").glob("*.png"):
        rgb = np.asarray(Image.open(path).convert("RGB"), np.int64)
        rows = np.argmax((rgb[..., None, :] == colors).all(-1), -1).astype(np.uint8)
        rows[10:20, 30:50] = IGNORE
        Image.fromarray(rows, "L").save(path)
    return root


def test_run_single_conv_trains_on_ignored_rows_and_void_pixels(void, tmp_path):
    """An ignored class-file row and the index value 255 both become 255: the blog's script must
    leave those pixels out of its loss as every other script does (not stop with 'Target 255 is
    out of bounds', or a device-side assert on CUDA)."""
    _, mask = import_drone_dataset(void, (48, 32), "train", cache=False, normalize=False)[0]
    assert (mask == IGNORE).any() and mask[mask != IGNORE].max() < 6
    out = tmp_path / "o"
    assert run_single_conv.main(["--data-root", str(void), "--epochs", "1", "--size", "48x32", "--batch-size", "4",
                                 "--no-cache", "--out", str(out), "--eval-split", "val"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["per_class_iou"]) == NAMES and np.isfinite(load_checkpoint(out / "model.pt")["history"]["train_loss"][0])


def test_an_ignore_index_below_255_on_data_with_void_pixels(void, tmp_path):
    """--ignore-index 0 on data holding 255 (ignored rows): both labels are left out of the loss
    and the metrics (and the crop padding is one of them)."""
    out = tmp_path / "o"
    assert run_experiment.main(TINY + ["--data-root", str(void), "--epochs", "1", "--no-cache", "--out", str(out),
                                       "--eval-split", "val", "--ignore-index", "0", "--loss", "ce+dice"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ignore_index"] == 0 and m["per_class_iou"][NAMES[0]] is None  # class 0 counts nowhere
    assert np.isfinite(json.loads((out / "history.json").read_text())["train_loss"][0])


def test_class_weights_follow_the_class_file_not_only_its_length(six, tmp_path):
    """Two class files of one length, rows in another order: the cached weights of one are not
    the other's, they are the same weights permuted."""
    from losses import class_weights

    lines = (six / "classes.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    swapped = [rows[0], rows[3], rows[2], rows[1], *rows[4:]]  # ground <-> water (ids 0 and 2)
    other = tmp_path / "swapped.csv"
    other.write_text("\n".join([header, *swapped]) + "\n")
    cache = tmp_path / "cache-w"
    a = class_weights(import_drone_dataset(six, (48, 32), "train", cache=False, normalize=False), cache_dir=cache)
    b = class_weights(import_drone_dataset(six, (48, 32), "train", cache=False, normalize=False, classes=other),
                      cache_dir=cache)
    assert not torch.equal(a[0], a[2])
    assert torch.equal(b, a[[2, 1, 0, 3, 4, 5]])


def test_a_start_that_trained_on_this_runs_held_out_photos_is_named(six, tmp_path, capsys):
    data = _copy(six, tmp_path)
    a = tmp_path / "a"
    assert run_experiment.main(TINY + ["--data-root", str(data), "--epochs", "1", "--split-seed", "0",
                                       "--out", str(a)]) == 0
    capsys.readouterr()
    common = TINY + ["--data-root", str(data), "--epochs", "1", "--init-from", str(a / "best.pt")]
    assert run_experiment.main(common + ["--split-seed", "0", "--out", str(tmp_path / "same")]) == 0
    assert "warning" not in capsys.readouterr().out  # the same split: nothing held out was trained on
    assert run_experiment.main(common + ["--split-seed", "1", "--out", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert "of this run's val/test ids" in out and f"were training photos of {a / 'best.pt'}" in out


def test_weights_from_a_bare_state_dict_train(six, tmp_path, capsys):
    """A state dict of ours without meta (or a backbone's) is no checkpoint with a split to compare:
    --weights loads it and trains."""
    import torch
    from models import get_model
    data = _copy(six, tmp_path)
    bare = tmp_path / "bare.pt"
    torch.save(get_model("unet", num_classes=len(NAMES), base=8, depth=2).state_dict(), bare)
    assert run_experiment.main(TINY + ["--data-root", str(data), "--epochs", "1", "--weights", str(bare),
                                       "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    assert f"from {bare}" in capsys.readouterr().out

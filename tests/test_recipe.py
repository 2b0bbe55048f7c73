import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from basics import CLASS_COLORS
from conftest import REPO
from datautils import import_drone_dataset
from transforms import Augment
from evaluate import resize_predictor, sliding_window_logits
from checkpoint import read_checkpoint
from metrics import ConfusionMatrix, bootstrap_ci
from losses import DiceCELoss, class_weights, make_loss

PALETTE = torch.tensor(CLASS_COLORS, dtype=torch.uint8)


def _blocks(b=3, h=96, w=96, seed=0, k=16):
    """Masks of k×k class blocks and photos whose colour is the class colour: alignment is checkable."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 23, (b, h // k, w // k), generator=g)
    y = small.repeat_interleave(k, 1).repeat_interleave(k, 2)
    x = PALETTE[y].permute(0, 3, 1, 2).contiguous()
    return x, y


def _agreement(x, y):
    """Share of labelled pixels whose photo colour is nearest to their own class colour."""
    colors = x.permute(0, 2, 3, 1)[y < 23].float()
    nearest = torch.cdist(colors, PALETTE.float()).argmin(1)
    return float((nearest == y[y < 23]).float().mean())


def test_augment_moves_photo_and_mask_together():
    torch.manual_seed(0)
    x, y = _blocks()
    aug = Augment(crop=(64, 64), scale=(0.5, 2.0), color=0.0)
    for _ in range(10):
        xa, ya = aug(x, y)
        assert xa.shape == (3, 3, 64, 64) and ya.shape == (3, 64, 64)
        assert xa.dtype == torch.uint8 and ya.dtype == torch.int64
        assert _agreement(xa, ya) > 0.9  # only block borders blend under bilinear scaling
        pad = ya == 255
        assert bool((xa.permute(0, 2, 3, 1)[pad] == 0).all())  # padding: black photo, ignored mask
    # a deliberate misalignment is caught by the same measure
    assert _agreement(xa, torch.flip(ya, (-1,))) < 0.3


def test_augment_samples_differ_within_a_batch_and_repeat_with_seed():
    x, y = _blocks(b=4)
    x = x[:1].repeat(4, 1, 1, 1)
    y = y[:1].repeat(4, 1, 1)
    torch.manual_seed(1)
    xa, ya = Augment(crop=(24, 24))(x, y)
    assert len({bytes(v.numpy().tobytes()) for v in ya}) > 1  # independent crops per sample
    torch.manual_seed(1)
    xb, yb = Augment(crop=(24, 24))(x, y)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 23, 8, 8), torch.randint(0, 23, (2, 8, 8))
    assert make_loss("ce")(logits, target) == pytest.approx(float(nn.functional.cross_entropy(logits, target)))
    w = torch.rand(23) + 0.5
    assert make_loss("wce", w)(logits, target) == pytest.approx(
        float(nn.functional.cross_entropy(logits, target, weight=w)))
    with pytest.raises(ValueError, match="needs class weights"):
        make_loss("wce")
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal")
    # ignored pixels change nothing, whatever their logits
    t2 = target.clone()
    t2[:, :2] = 255
    l2 = logits.clone()
    l2[:, :, :2] = 100 * torch.randn(2, 23, 2, 8)
    for name in ("ce", "ce+dice"):
        loss = make_loss(name)
        assert float(loss(logits, t2)) == pytest.approx(float(loss(l2, t2)), rel=1e-5)
    # perfect, confident predictions: dice term ~0, and worse predictions cost more
    perfect = 50 * nn.functional.one_hot(target, 23).permute(0, 3, 1, 2).float()
    dice = DiceCELoss()
    assert float(dice(perfect, target)) < 0.01 < float(dice(logits, target))


def test_dice_counts_only_classes_in_the_truth_or_the_prediction():
    # a one-class mask (class 2) and flat logits: argmax predicts class 0, so the Dice mean is over
    # classes 0 and 2 alone, not all 23 (softmax is never exactly 0, so "present" must not mean p > 0)
    logits, target = torch.zeros(1, 23, 8, 8), torch.full((1, 8, 8), 2)
    n, p = 64, 1 / 23
    dice2 = (2 * n * p + 1) / (n * p + n + 1)
    dice0 = 1 / (n * p + 1)
    ce = float(nn.functional.cross_entropy(logits, target))
    assert float(DiceCELoss()(logits, target)) == pytest.approx(ce + 1 - (dice0 + dice2) / 2, rel=1e-6)


def test_class_weights_from_frequencies_cached(demo_root, tmp_path):
    ds = import_drone_dataset(demo_root, (48, 32), "train", cache=False)
    w1 = class_weights(ds, cache_dir=tmp_path)
    files = list(tmp_path.glob("class-weights-*.json"))
    assert len(files) == 1
    counts = torch.tensor(json.loads(files[0].read_text()))
    assert counts.sum() == len(ds) * 48 * 32
    common, rare = int(counts.argmax()), int(torch.nonzero(counts).flatten()[counts[counts > 0].argmin()])
    assert w1[rare] > w1[common]
    files[0].write_text(json.dumps([1.0] * 23))  # the cached counts are what is used next time
    assert torch.allclose(class_weights(ds, cache_dir=tmp_path), torch.full((23,), float(1 / np.log(1.02 + 1 / 23))))


def test_sliding_window_equals_whole_image():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, 70)
    pointwise = nn.Conv2d(3, 23, 1)
    whole = pointwise(x)
    assert torch.equal(sliding_window_logits(pointwise, x, tile=(80, 60)), whole)  # one tile
    tiled = sliding_window_logits(pointwise, x, tile=(32, 24), overlap=0.5, tile_batch=3)
    assert torch.allclose(tiled, whole, atol=1e-5)
    conv3 = nn.Conv2d(3, 23, 3, padding=1)
    tiled3 = sliding_window_logits(conv3, x, tile=(32, 24), overlap=0.5)
    assert tiled3.shape == whole.shape
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert (tiled3 - conv3(x))[inner].abs().mean() < 0.05  # only tile seams differ, and little


def test_resize_predictor_scores_larger_masks():
    model = nn.Conv2d(3, 23, 1)
    predict = resize_predictor((30, 20))
    out = predict(model, torch.randn(1, 3, 80, 120), (80, 120))
    assert out.shape == (1, 23, 80, 120)


def test_bootstrap_interval():
    # against a plain re-implementation of the percentile bootstrap: resample images with the same
    # draws, recompute both metrics from the summed matrices (numpy), take the 2.5 and 97.5 % points
    g = torch.Generator().manual_seed(0)
    mats = torch.randint(0, 50, (30, 4, 4), generator=g)
    ci = bootstrap_ci(mats, n_boot=200, seed=3)
    draws = torch.randint(30, (200, 30), generator=torch.Generator().manual_seed(3)).numpy()
    m = mats.numpy().astype(np.float64)
    pa, miou = [], []
    for row in draws:
        cm = m[row].sum(0)
        tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
        pa.append(tp.sum() / cm.sum())
        miou.append(np.mean(tp[union > 0] / union[union > 0]))
    assert ci["pixel_accuracy"] == pytest.approx(list(np.percentile(pa, [2.5, 97.5])), rel=1e-12)
    assert ci["miou"] == pytest.approx(list(np.percentile(miou, [2.5, 97.5])), rel=1e-12)
    assert ci["pixel_accuracy"][0] < ci["pixel_accuracy"][1]
    # an ignored class is in no mean: as the metrics of each resampled matrix say
    ci = bootstrap_ci(mats, n_boot=200, seed=3, ignore_index=1)
    want = [ConfusionMatrix.metrics_of(torch.from_numpy(m[row].sum(0)), ignore_index=1, confusions=False)["miou"]
            for row in draws]
    assert ci["miou"] == pytest.approx(list(np.percentile(want, [2.5, 97.5])), rel=1e-12)
    assert ci["pixel_accuracy"] == pytest.approx(list(np.percentile(pa, [2.5, 97.5])), rel=1e-12)
    same = bootstrap_ci(mats[:1].repeat(10, 1, 1), n_boot=50)  # identical images: no spread
    assert same["miou"][0] == pytest.approx(same["miou"][1])
    # paired: the other setting's matrices resampled with the same draws, the differences' points
    other = torch.randint(0, 50, (30, 4, 4), generator=g)
    ci = bootstrap_ci(mats, n_boot=200, seed=3, baseline=other)
    o = other.numpy().astype(np.float64)
    diff = []
    for row, mi in zip(draws, miou):
        cm = o[row].sum(0)
        tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
        diff.append(mi - np.mean(tp[union > 0] / union[union > 0]))
    assert ci["miou_difference"] == pytest.approx(list(np.percentile(diff, [2.5, 97.5])), rel=1e-9)
    assert bootstrap_ci(mats, n_boot=50, baseline=mats)["miou_difference"] == [0.0, 0.0]
    # with an ignored class: both sides leave it out of their means, as metrics_of does
    ci = bootstrap_ci(mats, n_boot=200, seed=3, ignore_index=1, baseline=other)
    diff = [ConfusionMatrix.metrics_of(torch.from_numpy(m[row].sum(0)), ignore_index=1, confusions=False)["miou"]
            - ConfusionMatrix.metrics_of(torch.from_numpy(o[row].sum(0)), ignore_index=1, confusions=False)["miou"]
            for row in draws]
    assert ci["miou_difference"] == pytest.approx(list(np.percentile(diff, [2.5, 97.5])), rel=1e-9)
    with pytest.raises(ValueError, match="baseline"):
        bootstrap_ci(mats, baseline=other[:5])


def _run(args, tmp_path):
    env = dict(os.environ, DRONE_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable] + args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_run_experiment_report_resume_and_predict(tmp_path, capsys):
    import run_experiment  # in this process (tests/test_budget.py and the torchrun tests run it as a script)

    out = tmp_path / "run"
    base = ["--model", "unet", "--base", "8", "--depth", "3", "--demo", "--train-size", "120x80", "--crop", "64",
            "--batch-size", "4", "--loss", "ce+dice", "--score-size", "240x160", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    code = run_experiment.main(base + ["--epochs", "3", "--stop-after-epoch", "1"])  # stops after its first epoch
    assert code == 0, capsys.readouterr().err[-3000:]
    for name in ("metrics.json", "history.json", "curves.png", "qualitative.png", "qualitative_grid.png",
                 "confusion.png", "class_iou.png", "best.pt", "last.pt", "command.txt"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("pixel_accuracy", "mean_class_accuracy", "miou", "fwiou", "per_class_iou", "bootstrap_95"):
        assert key in m
    assert m["score_size"] == [240, 160] and m["eval_size"] == [120, 80]
    lo, hi = m["bootstrap_95"]["miou"]
    assert lo <= m["miou"] <= hi
    assert len(json.loads((out / "history.json").read_text())["train_loss"]) == 1
    # the run records how to run it again: the arguments main() was given, not this process's
    command = "run_experiment.py " + " ".join(base + ["--epochs", "3", "--stop-after-epoch", "1"])
    assert (out / "command.txt").read_text() == f"python {command}\n" and m["command"] == command
    assert read_checkpoint(out / "last.pt").meta.command == command
    capsys.readouterr()
    assert run_experiment.main(base + ["--epochs", "4", "--resume"]) == 2
    assert "resume with --epochs 3" in capsys.readouterr().err
    # settings the optimiser state would silently override on resume are part of the plan
    assert run_experiment.main(base + ["--epochs", "3", "--resume", "--weight-decay", "0.05"]) == 2
    assert "resume with --weight-decay 0.0001" in capsys.readouterr().err
    code = run_experiment.main(base + ["--epochs", "3", "--resume"])  # continues from last.pt: epochs 2 and 3
    assert code == 0, capsys.readouterr().err[-3000:]
    assert len(json.loads((out / "history.json").read_text())["train_loss"]) == 3
    # --eval-only re-scores best.pt: with the run's own settings, the run's numbers to the last digit
    m = json.loads((out / "metrics.json").read_text())
    ev = ["--eval-only", "--checkpoint", str(out / "best.pt"), "--demo", "--cache-dir", str(tmp_path / "cache")]
    assert run_experiment.main(ev + ["--score-size", "240x160", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("pixel_accuracy", "miou", "per_image", "per_class_iou", "best_epoch", "model", "train_size"):
        assert again[key] == m[key], key
    assert again["eval_only"] is True and (tmp_path / "again" / "curves.png").stat().st_size > 0
    assert run_experiment.main(ev + ["--tta", "--eval-split", "val"]) == 0  # the report goes next to best.pt
    tta = json.loads((out / "eval-val" / "metrics.json").read_text())
    assert tta["tta"] is True and tta["eval_split"] == "val" and tta["score_size"] == [120, 80]
    assert json.loads((out / "metrics.json").read_text()) == m  # the training run's report untouched
    with pytest.raises(SystemExit):
        run_experiment.parse_args(["--eval-only", "--demo"])
    assert "--eval-only and --checkpoint go together" in capsys.readouterr().err
    # predict.py on photos larger than the model's size, tile by tile
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8)).save(photos / "a.jpg")
    r = _run([str(REPO / "predict.py"), "--checkpoint", str(out / "best.pt"), "--input", str(photos), "--out",
              str(tmp_path / "pred"), "--infer-size", "240x160", "--tile", "96", "--tta"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / "pred" / "a_mask.png").size == (450, 300)
    assert Image.open(tmp_path / "pred" / "a_overlay.jpg").size == (450, 300)
    import predict
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(out / "best.pt"), "--input", str(tmp_path / "none"),
                         "--out", str(tmp_path / "p2")]) == 2
    assert "none" in capsys.readouterr().err


def _grid_agreement(aug, w=230, h=160, b=2):
    """Photo red = the source column of each pixel (a ramp), mask = that column mod 23. Bilinear
    resampling of a ramp gives each output pixel the column it was sampled at, so a mask on the
    same pixel grid carries round(red) mod 23 wherever it is not padding."""
    col = torch.arange(w).view(1, 1, w).expand(b, h, w)
    x = torch.stack([col, torch.zeros_like(col), torch.zeros_like(col)], 1).to(torch.uint8)
    y = (col % 23).long()
    agree = []
    for seed in range(6):
        torch.manual_seed(seed)
        xa, ya = aug(x, y)
        keep = ya != 255
        agree.append(float(((xa[:, 0].long() % 23) == ya)[keep].float().mean()))
    return min(agree)


def test_augment_keeps_photo_and_mask_on_one_pixel_grid(monkeypatch):
    aug = Augment(crop=(96, 96), scale=(0.6, 1.9), color=0.0)
    assert _grid_agreement(aug) > 0.97  # only exact ties of rounding differ
    # the same measure catches half a pixel: plain 'nearest' for the mask must fail it
    real = torch.nn.functional.interpolate

    def plain_nearest(*args, **kw):
        if kw.get("mode") == "nearest-exact":
            kw["mode"] = "nearest"
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "interpolate", plain_nearest)
    assert _grid_agreement(Augment(crop=(96, 96), scale=(0.6, 1.9), color=0.0)) < 0.9


def test_upsample_labels_equals_interpolate_then_argmax():
    from evaluate import upsample_labels
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 13, 21, generator=g)
    for size in ((40, 61), (100, 160), (13, 21)):
        want = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear",
                                               align_corners=False)[0]
        got = upsample_labels(logits, size)
        diff = got.long() != want.argmax(0)
        # the two sum in other orders: only near-ties (top two within float error) may differ
        top2 = want.topk(2, dim=0).values
        assert float(diff.float().mean()) < 1e-3
        assert bool(((top2[0] - top2[1])[diff] < 1e-4).all())


def test_class_weights_cache_follows_mask_changes(fresh_demo, tmp_path):
    import time

    from PIL import Image
    ds = import_drone_dataset(fresh_demo, (24, 16), "train", cache=False)
    first = class_weights(ds, cache_dir=tmp_path)
    p = fresh_demo / "dataset/semantic_drone_dataset/label_images_semantic/000.png"
    Image.new("L", (48, 32), 9).save(p)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    ds2 = import_drone_dataset(fresh_demo, (24, 16), "train", cache=False)
    assert not torch.equal(first, class_weights(ds2, cache_dir=tmp_path))


def test_the_model_sees_the_same_pixels_when_scored_against_larger_masks(tmp_path, monkeypatch):
    # training, predict.py and the --score-size path must all give the model the photo as
    # load_photo(path, model size) reads it (one resize from the draft decode), not resized twice
    import evaluate
    import run_experiment
    from datautils import load_photo
    from demo import make_demo_dataset
    from layout import find_dataset, read_split
    from transforms import normalize

    root = make_demo_dataset(tmp_path / "d", n=6, size=(192, 128), seed=5, split_counts=(2, 2, 2))
    seen = []
    real = evaluate.predict_logits
    monkeypatch.setattr(evaluate, "predict_logits", lambda model, x, *a, **k: seen.append(x.clone()) or real(model, x, *a, **k))
    assert run_experiment.main(["--model", "single_conv", "--data-root", str(root), "--train-size", "48x32",
                                "--crop", "32", "--score-size", "96x64", "--epochs", "1", "--batch-size", "2",
                                "--out", str(tmp_path / "o"), "--eval-split", "test"]) == 0
    layout = find_dataset(root)
    want = [normalize(torch.from_numpy(load_photo(layout.image_dir / f"{i}.jpg", (48, 32))[0].transpose(2, 0, 1).copy()))
            for split in ("val", "test") for i in read_split(split, layout.splits_dir)]
    inputs = [x for batch in seen for x in batch]
    assert len(inputs) >= 4 and all(x.shape == (3, 32, 48) for x in inputs)
    assert all(any(torch.equal(x, w) for w in want) for x in inputs)


def test_every_setting_of_run_experiment_is_one_config_field():
    """A new flag is either a RunConfig field (stored, compared on resume, reported) or one of the
    few that only steer this invocation; every resume hint names a flag that exists."""
    from dataclasses import fields

    from run_experiment import RunConfig, parse_args

    parser_dests = set(vars(parse_args(["--demo"])))
    invocation = {"resume", "stop_after_epoch", "eval_only", "checkpoint", "out", "cache_dir", "no_cache",
                  "num_workers", "device"}
    renamed = {"base": "model_kwargs", "depth": "model_kwargs", "freeze_bn": "model_kwargs",
               "no_augment": "augment", "no_amp": "amp", "classes": "classes_file"}
    names = {f.name for f in fields(RunConfig)}
    unplaced = [d for d in parser_dests - invocation if renamed.get(d, d) not in names]
    assert not unplaced, unplaced
    import re
    import run_experiment
    source = Path(run_experiment.__file__).read_text()
    for f in fields(RunConfig):
        for flag in re.findall(r"--[a-z-]+", f.metadata["flag"] or ""):
            assert f'"{flag}"' in source, (f.name, flag)
    plan = RunConfig().plan()
    # the seed too: it seeds the loader's shuffles (and torchrun's DistributedSampler)
    assert {"model", "train_size", "crop", "lr", "weight_decay", "time_limit", "classes", "seed"} <= set(plan)
    assert not {"tta", "tile", "eval_split", "score_size"} & set(plan)  # evaluation may change


def test_scale_range_is_a_training_setting():
    from basics import InputError
    from run_experiment import RunConfig, parse_args

    cfg = RunConfig.from_args(parse_args(["--demo", "--scale", "0.7,1.4"]))
    assert cfg.scale == [0.7, 1.4] and cfg.plan()["scale"] == [0.7, 1.4]
    assert RunConfig.from_args(parse_args(["--demo"])).scale == [0.7, 1.4]  # the budget recipe's range
    assert RunConfig().scale == [0.5, 2.0]  # what a checkpoint that does not record it was trained with
    for bad in ("2,1", "0,1", "1.5"):
        with pytest.raises(InputError, match="--scale"):
            RunConfig.from_args(parse_args(["--demo", "--scale", bad]))


def test_augment_crops_at_the_drawn_scale_from_anywhere_in_the_photo():
    # only the crop's window is rescaled: the crop must still be the photo at scale s (a ramp
    # photo: 63 output columns span 31.5 source columns at s = 2), its window anywhere in the
    # photo, and a scaled photo smaller than the crop padded with ignore_index
    w, h = 240, 160
    col = torch.arange(w).view(1, 1, w).expand(1, h, w)
    x = torch.stack([col, torch.zeros_like(col), torch.zeros_like(col)], 1).to(torch.uint8)
    y = torch.zeros(1, h, w, dtype=torch.long)
    aug = Augment(crop=(64, 64), scale=(2.0, 2.0), flips=False, rot90=False, color=0.0)
    lefts = []
    for seed in range(30):
        torch.manual_seed(seed)
        red = aug(x, y)[0][0, 0].float()
        assert abs(float((red[:, -1] - red[:, 0]).mean()) - 31.5) <= 1
        lefts.append(float(red[0, 0]))
    assert min(lefts) < 30 and max(lefts) > w - 32 - 30
    xa, ya = Augment(crop=(64, 64), scale=(0.25, 0.25), flips=False, rot90=False, color=0.0)(x, y)
    assert int((ya == 255).sum()) == 64 * 64 - 60 * 40  # the whole photo at 60x40, padded
    red = xa[0, 0][ya[0] != 255].float()
    assert red.min() < 3 and red.max() > w - 4


@pytest.mark.parametrize("name", ["ce", "wce", "ce+dice"])
def test_an_ignore_index_below_255_is_ignored_with_255_not_instead_of_it(name):
    """make_loss(..., ignore_index=0) on targets holding 0 and 255: neither label is trained on,
    whatever the logits there (255 is what ignored class-file rows and crop padding become)."""
    torch.manual_seed(0)
    logits, target = torch.randn(2, 6, 8, 8), torch.randint(1, 6, (2, 8, 8))
    target[:, :2] = 255
    target[:, 2] = 0
    noisy = logits.clone()
    noisy[:, :, :3] = 100 * torch.randn(2, 6, 3, 8)  # rows 0, 1 are 255, row 2 is 0
    w = torch.rand(6) + 0.5 if name == "wce" else None
    loss = make_loss(name, w, ignore_index=0)
    assert math.isfinite(float(loss(logits, target)))
    assert float(loss(logits, target)) == pytest.approx(float(loss(noisy, target)), rel=1e-5)
    # the same number as with 0 written as 255: 0 is ignored in addition to 255, not instead
    void = target.masked_fill(target == 0, 255)
    assert float(loss(logits, target)) == pytest.approx(float(make_loss(name, w)(logits, void)), rel=1e-6)


def test_a_seeded_split_is_part_of_the_run(tmp_path, capsys):
    """Own data without split lists: the seeded split made when the run starts is the run's.
    --resume and --eval-only read it back (from the checkpoint; OUT/splits is its copy), whatever
    photos were added since; another --split-seed stops with one line; eval-only reproduces
    the run's numbers to the last digit; split lists other than the run's are refused."""
    import shutil
    import sys

    import run_experiment
    from demo import make_demo_dataset
    sys.path.insert(0, str(REPO / "tools"))
    from regroup_dataset import regroup

    root = regroup(make_demo_dataset(tmp_path / "demo", n=20, size=(96, 64), seed=3, mask_form="index"),
                   tmp_path / "own")
    assert not (root / "splits").exists()
    out = tmp_path / "run"
    tiny = ["--model", "unet", "--base", "8", "--depth", "2", "--train-size", "48x32", "--crop", "32",
            "--batch-size", "4", "--data-root", str(root), "--out", str(out), "--eval-split", "test", "--no-cache"]

    def split_files(folder):
        return {n: (folder / f"{n}.txt").read_text().split() for n in ("train", "val", "test")}

    def refused(argv):
        capsys.readouterr()
        assert run_experiment.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("error") == 1 and "Traceback" not in err, err
        return err.splitlines()[-1]

    assert run_experiment.main(tiny + ["--split-seed", "3", "--epochs", "2", "--stop-after-epoch", "1"]) == 0
    split = split_files(out / "splits")
    # another seed on resume: one line naming the run's seed, nothing trained
    last = (out / "last.pt").read_bytes()
    assert "--split-seed 3" in refused(tiny + ["--split-seed", "1", "--epochs", "2", "--resume"])
    assert (out / "last.pt").read_bytes() == last and split_files(out / "splits") == split
    # a photo added since the run started: in none of its splits; resume trains on the run's split
    first = split["train"][0]
    shutil.copy(root / "images" / f"{first}.jpg", root / "images" / "zzz.jpg")
    shutil.copy(root / "masks" / f"{first}.png", root / "masks" / "zzz.png")
    capsys.readouterr()
    assert run_experiment.main(tiny + ["--epochs", "2", "--resume"]) == 0
    assert "zzz" in capsys.readouterr().out  # said once: the photo is left out
    assert split_files(out / "splits") == split
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["per_image"]) == sorted(split["test"]) and m["split_seed"] == 3
    # eval-only: the run's split from the checkpoint (also without OUT/splits), the same numbers
    shutil.rmtree(out / "splits")
    ev = ["--eval-only", "--checkpoint", str(out / "best.pt"), "--data-root", str(root), "--no-cache",
          "--eval-split", "test"]
    assert run_experiment.main(ev + ["--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("pixel_accuracy", "miou", "per_image", "per_class_iou", "best_epoch"):
        assert again[key] == m[key], key
    assert "--split-seed 3" in refused(ev + ["--split-seed", "0", "--out", str(tmp_path / "o1")])
    # split lists other than the run's (train and test swapped round): refused, not scored
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name, ids in (("train", split["test"] + split["train"][1:]), ("val", split["val"]),
                      ("test", split["train"][:1])):
        (swapped / f"{name}.txt").write_text("\n".join(ids) + "\n")
    assert "split" in refused(ev + ["--splits-dir", str(swapped), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv", [
    [], ["--model", "unet", "--base", "8", "--depth", "3", "--freeze-bn", "--no-pretrained", "--train-size", "64x48",
         "--crop", "40x32", "--scale", "0.6,1.5", "--no-augment", "--time-limit", "2.5", "--batch-size", "3", "--lr",
         "0.0123", "--encoder-lr-mult", "0.3", "--weight-decay", "0.05", "--schedule", "poly", "--loss", "wce",
         "--ignore-index", "0", "--grad-clip", "0.5", "--freeze-encoder-epochs", "2", "--sync-bn", "--seed", "4"],
    ["--model", "unet", "--base", "8", "--epochs", "7"],  # some model options given, others left out
    None])  # None: the field defaults, what older checkpoints that lack a setting were trained with
def test_every_resume_hint_gives_the_checkpoints_value_back(argv):
    """Each flag a resume mismatch suggests, fed back to the command line, gives the checkpoint's
    value: a command made of the hints has the checkpoint's plan."""
    from run_experiment import RunConfig, parse_args
    from train import Checkpoints

    saved = RunConfig() if argv is None else RunConfig.from_args(parse_args(["--demo"] + argv))
    ck = Checkpoints(hints=saved.hints())
    command, worded = ["--demo"], set()
    for key, value in saved.plan().items():
        hint = ck.hint(key, value)
        if hint.startswith("with --"):  # "with --base 8 and without --depth or --freeze-bn": the flags given
            command += hint[len("with "):].split(" and without ")[0].split()
        elif hint.startswith("without --"):
            pass  # left out, the command line's default gives the value back
        else:
            assert hint.startswith("with the same"), (key, hint)
            worded.add(key)
    assert worded == {"classes"}  # the class set comes with the data, not a flag
    again = RunConfig.from_args(parse_args(command)).plan()
    for key, value in saved.plan().items():
        assert key in worded or again[key] == value, (key, ck.hint(key, value), again[key])


def test_resume_and_eval_only_say_what_gives_the_run_back(tmp_path, capsys):
    """The hint of a refused resume is a flag that parses and gives the value back (--scale
    MIN,MAX; --time-limit for a budget run, not --epochs; the seed is compared); eval-only on
    last.pt reports the last epoch, not a val selection; eval-only on data of other classes
    says to pass the data it was trained on, not --init-from."""
    import re

    import run_experiment
    from run_experiment import RunConfig, parse_args

    out = tmp_path / "run"
    base = ["--model", "unet", "--base", "8", "--depth", "2", "--demo", "--train-size", "48x32", "--crop", "32",
            "--batch-size", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_experiment.main(base + ["--scale", "0.6,1.5", "--seed", "5", "--time-limit", "0.5",
                                       "--stop-after-epoch", "1"]) == 0

    def hint(argv):
        capsys.readouterr()
        assert run_experiment.main(argv + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        return re.search(r"resume (with .*?|without .*?) \(the checkpoint's settings\)", err).group(1)

    scale = hint(base + ["--seed", "5", "--time-limit", "0.5"])
    assert scale == "with --scale 0.6,1.5"
    assert RunConfig.from_args(parse_args(base + scale.split()[1:])).scale == [0.6, 1.5]
    assert hint(base + ["--scale", "0.6,1.5", "--seed", "5"]) == "with --time-limit 0.5"
    assert hint(base + ["--scale", "0.6,1.5", "--time-limit", "0.5"]) == "with --seed 5"
    ev = ["--eval-only", "--demo", "--cache-dir", str(tmp_path / "cache")]
    for name, selected in (("last.pt", "last_epoch"), ("best.pt", "val")):
        assert run_experiment.main(ev + ["--checkpoint", str(out / name), "--out", str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name / "metrics.json").read_text())["selected_on"] == selected, name
    other = tmp_path / "other.csv"
    other.write_text("name,r,g,b\n" + "".join(f"c{i},{i},{i},{i}\n" for i in range(23)))
    capsys.readouterr()
    assert run_experiment.main(ev + ["--checkpoint", str(out / "best.pt"), "--classes", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained on 23 classes" in err and "--init-from" not in err and "--classes" in err, err


def test_a_crop_inside_the_photo_has_no_ignore_strip():
    """Where the scaled photo covers the crop, the crop holds no padding: rounding the window to
    whole pixels and scaling it back must not leave it a pixel short (a strip of 255 in 4-7 % of
    the crops before)."""
    torch.manual_seed(0)
    x, y = _blocks(b=16, h=96, w=144)
    aug = Augment(crop=(40, 40), scale=(0.7, 1.6), flips=False, rot90=False, color=0.0)  # 40 / 0.7 < 96
    for _ in range(25):
        _, ya = aug(x, y)
        assert not bool((ya == 255).any())

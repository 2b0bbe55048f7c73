import math

import numpy as np
import pytest
import torch

from metrics import ConfusionMatrix, pixel_accuracy


def reference(preds, targets, n, ignore=None):
    """Brute force: count pixel by pixel."""
    cm = np.zeros((n, n), np.int64)
    for p, t in zip(preds, targets):
        for pv, tv in zip(p.ravel(), t.ravel()):
            if ignore is not None and tv == ignore:
                continue
            cm[tv, pv] += 1
    iou, acc = [], []
    for c in range(n):
        tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
        iou.append(tp / (tp + fn + fp) if tp + fn + fp and c != ignore else math.nan)  # ignored: in no mean
        acc.append(tp / (tp + fn) if tp + fn and c != ignore else math.nan)
    present = [v for v in iou if not math.isnan(v)]
    gt_freq = cm.sum(1) / cm.sum()
    return {
        "cm": cm,
        "pixel_accuracy": np.trace(cm) / cm.sum(),
        "miou": sum(present) / len(present),
        "mean_class_accuracy": np.nanmean(acc),
        "fwiou": sum(f * v for f, v in zip(gt_freq, iou) if f > 0),
        "iou": iou,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ignore", [None, 0])
def test_confusion_matrix_matches_reference(seed, ignore):
    rng = np.random.default_rng(seed)
    n = 7
    # classes 5 and 6 never occur in truth; 6 is never predicted either (absent: nan)
    targets = [rng.integers(0, 5, (9, 11)) for _ in range(3)]
    preds = [rng.integers(0, 6, (9, 11)) for _ in range(3)]
    cm = ConfusionMatrix(n, ignore_index=ignore)
    for i, (p, t) in enumerate(zip(preds, targets)):  # logits for the first batch, labels for the others
        pred = torch.from_numpy(p)[None]
        if i == 0:
            pred = torch.nn.functional.one_hot(pred, n).permute(0, 3, 1, 2).float()
        cm.update(pred, torch.from_numpy(t)[None])
    got, ref = cm.compute(), reference(preds, targets, n, ignore)
    assert np.array_equal(cm.mat.numpy(), ref["cm"])
    for key in ("pixel_accuracy", "miou", "mean_class_accuracy", "fwiou"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    ious = list(got["per_class_iou"].values())
    assert math.isnan(ious[6]) and ious[5] == 0.0
    assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b) for a, b in zip(ious, ref["iou"]))


def test_miou_is_dataset_level_not_mean_of_images():
    # image 1: class 0 only, perfect; image 2: class 1 mostly wrong
    t = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    p = torch.tensor([[[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    cm = ConfusionMatrix(2)
    cm.update(p, t)
    m = cm.compute()
    assert m["per_class_iou"]["paved-area"] == pytest.approx(0.25)
    assert m["per_class_iou"]["unlabeled"] == pytest.approx(4 / 7)
    assert m["miou"] == pytest.approx((0.25 + 4 / 7) / 2)


def test_pixel_accuracy_logits_and_labels():
    mask = torch.tensor([[[0, 1], [2, 2]]])
    labels = torch.tensor([[[0, 1], [2, 0]]])
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert pixel_accuracy(labels, mask) == pytest.approx(0.75)
    assert pixel_accuracy(logits, mask) == pytest.approx(0.75)
    assert pixel_accuracy(labels, mask, ignore_index=2) == pytest.approx(1.0)
    padded = mask.clone()
    padded[0, 1, 1] = 255  # crop padding is not a class: not counted
    assert pixel_accuracy(logits, padded) == pytest.approx(1.0)


def test_confusion_matrix_empty_and_device_agnostic():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.compute()["miou"])
    cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    assert cm.compute()["miou"] == 1.0


def test_pixel_accuracy_of_labels_counts_every_class_not_only_the_drone_23():
    """Labels (not logits) of a 30-class set: classes 23..29 count like the others; 255 does not."""
    mask = torch.arange(30).repeat(2).view(1, 6, 10)
    labels = torch.where(mask >= 23, (mask + 1) % 30, mask)  # every pixel of classes 23..29 wrong
    assert pixel_accuracy(labels, mask) == pytest.approx(23 / 30)
    void = mask.clone()
    void[0, 0] = 255
    assert pixel_accuracy(labels, void) == pytest.approx((23 * 2 - 10) / (60 - 10))


def test_top_confusions_cost_exactly_the_miou_they_take():
    from metrics import ConfusionMatrix
    mat = torch.tensor([[50, 5, 0, 1], [10, 30, 0, 0], [0, 2, 3, 0], [0, 0, 0, 0]])  # class 3 only predicted
    names = ["a", "b", "c", "d"]
    m = ConfusionMatrix.metrics_of(mat, names)
    assert m["per_class_pixels"] == {"a": 56, "b": 40, "c": 5, "d": 0}
    costs = m["top_confusions"]
    assert [c["miou_cost"] for c in costs] == sorted((c["miou_cost"] for c in costs), reverse=True)
    for c in costs:  # predicting those pixels right instead raises the mIoU by exactly the stated cost
        i, j = names.index(c["truth"]), names.index(c["predicted"])
        fixed = mat.clone()
        fixed[i, i] += fixed[i, j]
        fixed[i, j] = 0
        after = ConfusionMatrix.metrics_of(fixed, names)  # (a -> d: d, only predicted, leaves the mean)
        assert after["miou"] - m["miou"] == pytest.approx(c["miou_cost"], abs=1e-12), c
        assert c["share_of_truth"] == pytest.approx(mat[i, j].item() / mat[i].sum().item())
    # one pixel predicted d, a class never in the truth, costs d's IoU of 0 in the mean: the most;
    # then 2 of the rare c's 5 pixels
    assert [(c["truth"], c["predicted"]) for c in costs[:2]] == [("a", "d"), ("c", "b")]


def test_class_table_puts_runs_side_by_side(tmp_path, capsys):
    """tools/class_table.py: each class's pixel share and IoU per run, and the change first -> last."""
    import json
    import math
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO / "tools"))
    import class_table

    for name, iou in (("a", [0.5, 0.0, math.nan]), ("b", [0.75, 0.25, math.nan])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "per_class_iou": dict(zip(("grass", "door", "dog"), iou)), "per_class_pixels": {"grass": 300, "door": 100,
                                                                                          "dog": 0},
            "miou": sum(iou[:2]) / 2, "pixel_accuracy": 0.5 + iou[0] / 10}))
    assert class_table.main([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "ce", "lovasz"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| class | share of pixels | ce | lovasz | last - first |"
    assert rows[2] == "| grass | 75.00 % | 0.500 | 0.750 | +0.250 |"
    assert rows[3] == "| door | 25.00 % | 0.000 | 0.250 | +0.250 |"
    assert rows[4] == "| dog | 0.00 % | absent | absent |  |"
    assert rows[5] == "| **mIoU** |  | 0.2500 | 0.5000 | +0.2500 |"
    assert class_table.main([str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err

"""Where training crops lie: rare-class-aware placement at the rate its temperature implies, a cap
on the share one class may fill, and the ignore padding as before."""
import math

import pytest
import torch

from transforms import Augment, rare_class_weights


def _photo_with_a_rare_blob(size: int = 120):
    x = torch.full((1, 3, size, size), 120, dtype=torch.uint8)
    y = torch.zeros(1, size, size, dtype=torch.long)
    y[:, -4:, -4:] = 2  # a 4x4 blob of class 2 in a corner: uniform 32-pixel crops almost never hold it
    return x, y


def _contains(aug: Augment, x, y, cls: int, draws: int = 400) -> float:
    xb, yb = x.expand(50, -1, -1, -1), y.expand(50, -1, -1)
    hits = 0
    for _ in range(draws // 50):
        _, out = aug(xb, yb)
        hits += int(((out == cls).flatten(1).any(1)).sum())
    return hits / draws


@pytest.mark.parametrize("temperature", [2.0, 0.25])  # class 2 picked with p 0.62 and 0.98
def test_a_rare_class_is_in_the_crops_at_the_rate_the_temperature_implies(temperature):
    torch.manual_seed(0)
    x, y = _photo_with_a_rare_blob()
    counts = torch.bincount(y.reshape(-1), minlength=3).double()
    w = rare_class_weights(counts, temperature)
    f = counts / counts.sum()
    expected = math.exp((1 - f[2]) / temperature) / (math.exp((1 - f[2]) / temperature) + math.exp((1 - f[0]) / temperature))
    assert float(w[2] / (w[0] + w[2])) == pytest.approx(expected, rel=1e-6)
    aug = Augment((32, 32), scale=(1.0, 1.0), class_weights=w, color=0)
    rate = _contains(aug, x, y, 2)
    # class 2 is picked with probability `expected` (then the crop holds it); a crop placed around
    # class 0 holds the corner blob only rarely
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / 400) + 0.01, (rate, expected)
    assert _contains(Augment((32, 32), scale=(1.0, 1.0), color=0), x, y, 2, draws=200) < 0.03  # uniform crops


def test_the_class_share_cap_holds():
    torch.manual_seed(1)
    x = torch.full((1, 3, 160, 160), 90, dtype=torch.uint8)
    y = torch.zeros(1, 160, 160, dtype=torch.long)
    y[:, :, 60:80] = 1
    y[:, :, 140:160] = 1  # two 20-pixel stripes of class 1 in 160 columns

    def shares(aug):
        _, out = aug(x.expand(400, -1, -1, -1), y.expand(400, -1, -1))
        counts = torch.stack([(out == c).flatten(1).sum(1) for c in (0, 1)], 1).float()
        return counts.max(1).values / counts.sum(1)

    capped = shares(Augment((32, 32), scale=(1.0, 1.0), max_class_share=0.75, color=0))
    free = shares(Augment((32, 32), scale=(1.0, 1.0), color=0))
    assert (free > 0.75).float().mean() > 0.4  # most uniform crops are nearly all class 0
    assert (capped > 0.75).float().mean() < 0.01


def test_the_ignore_padding_is_unchanged_with_rare_crops():
    torch.manual_seed(2)
    x = torch.full((4, 3, 20, 24), 50, dtype=torch.uint8)
    y = torch.zeros(4, 20, 24, dtype=torch.long)
    y[:, 5:8, 5:8] = 1
    w = rare_class_weights([1000, 9], 0.1)
    for aug in (Augment((32, 32), scale=(1.0, 1.0), class_weights=w, max_class_share=0.5, color=0),
                Augment((32, 32), scale=(1.0, 1.0), color=0)):
        _, out = aug(x, y)
        assert out.shape == (4, 32, 32)
        assert ((out == 255).flatten(1).sum(1) == 32 * 32 - 20 * 24).all()  # the padding, no more, no less
        assert ((out == 1).flatten(1).sum(1) == 9).all()  # the whole photo is in every crop


def test_rare_class_weights_refuse_a_temperature_of_zero():
    with pytest.raises(ValueError):
        rare_class_weights([1, 2], 0)


def test_the_rare_class_options_walk_through_train_resume_and_eval_only(tmp_path, capsys):
    import json

    import run_experiment
    out = tmp_path / "run"
    common = ["--model", "unet", "--base", "8", "--depth", "2", "--demo", "--train-size", "48x32", "--crop", "32",
              "--batch-size", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    rare = ["--rare-crops", "0.1", "--max-class-share", "0.75", "--loss", "ce+lovasz"]
    assert run_experiment.main(common + rare + ["--epochs", "2", "--stop-after-epoch", "1"]) == 0
    capsys.readouterr()
    # resumed without them: refused, and the words given back parse and resume
    assert run_experiment.main(common + ["--loss", "ce+lovasz", "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "resume with --rare-crops 0.1" in err, err
    assert run_experiment.main(common + rare + ["--epochs", "2", "--resume", "--tta-scales", "0.75,1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["rare_crops"], m["max_class_share"], m["loss"], m["tta"], m["tta_scales"]) == \
        (0.1, 0.75, "ce+lovasz", True, [0.75, 1.0])
    assert sum(m["per_class_pixels"].values()) > 0 and isinstance(m["top_confusions"], list)
    # re-scored with the same multi-scale TTA: the same numbers to the last digit
    assert run_experiment.main(["--eval-only", "--checkpoint", str(out / "best.pt"), "--demo", "--tta-scales", "0.75,1",
                                "--out", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "c")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert (again["pixel_accuracy"], again["miou"]) == (m["pixel_accuracy"], m["miou"])
    for bad in (["--rare-crops", "0"], ["--max-class-share", "1.5"], ["--tta-scales", "1,x"],
                ["--rare-crops", "0.1", "--no-augment"]):
        assert run_experiment.main(common + bad + ["--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
        assert bad[0] in capsys.readouterr().err


def test_an_ignored_class_is_no_class_for_placing_crops():
    torch.manual_seed(3)
    x, y = _photo_with_a_rare_blob()
    w = rare_class_weights(torch.bincount(y.reshape(-1), minlength=3).double(), 0.25)
    # with class 2 ignored (--ignore-index 2) crops are never centred on it (else 98 % of them would
    # be): only crops placed around class 0 near the corner hold the blob
    aug = Augment((32, 32), scale=(1.0, 1.0), class_weights=w, color=0, unlabelled=(2,))
    assert _contains(aug, x, y, 2, draws=200) < 0.15


def test_a_final_phase_at_a_larger_size_starts_from_the_run_and_reads_back(demo_root, tmp_path, capsys):
    """The documented final phase (training.md, rare and thin classes): a second invocation with
    --init-from RUN/best.pt and photos cached at twice the side. It starts from the run's weights,
    trains at and records its own sizes, and its report is reproduced by --eval-only."""
    import json

    import run_experiment
    from checkpoint import read_checkpoint
    common = ["--model", "unet", "--base", "8", "--depth", "2", "--data-root", str(demo_root), "--crop", "32",
              "--batch-size", "4", "--cache-dir", str(tmp_path / "c")]
    first, phase = tmp_path / "first", tmp_path / "phase"
    assert run_experiment.main(common + ["--train-size", "48x32", "--epochs", "2", "--out", str(first)]) == 0
    # --lr 0: the phase's weights are the first run's (batch-norm statistics aside)
    larger = ["--train-size", "96x64", "--eval-size", "96x64", "--score-size", "48x32"]
    assert run_experiment.main(common + larger + ["--init-from", str(first / "best.pt"), "--epochs", "1",
                                                  "--lr", "0", "--out", str(phase)]) == 0
    a, b = read_checkpoint(first / "best.pt"), read_checkpoint(phase / "best.pt")
    for key, value in a.weights.items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(b.weights[key], value), key
    assert (list(b.meta.train_size), list(b.meta.eval_size)) == ([96, 64], [96, 64])
    # the phase trained on photos cached at the larger size (the cache's files say so)
    assert [p.name for p in (tmp_path / "c").rglob("train-96x64-*.json")]
    m = json.loads((phase / "metrics.json").read_text())
    assert (m["init_from"], m["score_size"]) == (str(first / "best.pt"), [48, 32])
    capsys.readouterr()
    # re-scored: the eval size comes from the checkpoint; the masks' size is given again (--score-size
    # defaults to the eval size, as in training)
    assert run_experiment.main(["--eval-only", "--checkpoint", str(phase / "best.pt"), "--data-root", str(demo_root),
                                "--score-size", "48x32", "--out", str(tmp_path / "again"),
                                "--cache-dir", str(tmp_path / "c")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert (again["pixel_accuracy"], again["miou"], again["eval_size"]) == (m["pixel_accuracy"], m["miou"], [96, 64])

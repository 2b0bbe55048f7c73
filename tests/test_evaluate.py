import math

import pytest
import torch

from datautils import import_drone_dataset
from evaluate import ModelEvaluation, iou_table
from figures import plot_history
from metrics import ConfusionMatrix, pixel_accuracy
from models import SingleConvolution


@pytest.fixture
def setup(demo_root):
    torch.manual_seed(0)
    ds = import_drone_dataset(demo_root, size=(48, 32), splits="val", cache=False)
    return SingleConvolution(), ds


def test_evaluate_all_scores_and_metrics(setup, capsys):
    model, ds = setup
    model.train()
    ev = ModelEvaluation(model, ds, pixel_accuracy, device="cpu", batch_size=2)
    scores = ev.evaluate_all(progress=False)
    assert model.training  # mode given back
    assert len(scores) == len(ds)
    cm = ConfusionMatrix()
    for i in range(len(ds)):
        x, y = ds[i]
        pred, score = ev.evaluate_single(x, y)
        assert pred.shape == y.shape
        assert score == pytest.approx(scores[i])
        cm.update(pred[None], y[None])
    assert ev.metrics["miou"] == pytest.approx(cm.compute()["miou"])
    assert "mean per-image score" in capsys.readouterr().out
    table = iou_table(ev.metrics)
    assert "paved-area" in table and "mIoU" in table


def test_figures_saved_and_returned(setup, tmp_path):
    model, ds = setup
    ev = ModelEvaluation(model, ds, device="cpu")
    fig = ev.show_qualitative(1, tmp_path / "figs" / "q.png")
    assert (tmp_path / "figs" / "q.png").stat().st_size > 1000
    assert len(fig.axes) == 3 and "image 1" in fig._suptitle.get_text()
    hist = {"train_loss": [2.0, 1.5], "train_acc": [0.3, 0.4], "val_loss": [1.8, 1.6], "val_acc": [0.35, 0.41],
            "val_miou": [0.1, 0.12]}
    plot_history(hist, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert plot_history(hist) is not None  # no path: returned only


def test_ignore_index_applies_to_every_number(setup):
    model, ds = setup
    ev = ModelEvaluation(model, ds, pixel_accuracy, device="cpu", batch_size=2, ignore_index=3)
    scores = ev.evaluate_all(progress=False)
    assert math.isnan(ev.metrics["per_class_iou"]["grass"])  # class 3: in no mean, even where predicted
    cm = ConfusionMatrix(ignore_index=3)
    for i in range(len(ds)):
        x, y = ds[i]
        pred, score = ev.evaluate_single(x, y)
        keep = y != 3
        assert score == pytest.approx(float((pred[keep] == y[keep]).float().mean()))
        assert score == scores[i]  # one inference path, one scoring rule
        cm.update(pred[None], y[None])
    assert ev.metrics["miou"] == pytest.approx(cm.compute()["miou"])


def test_amp_setting_reaches_both_inference_paths(setup, monkeypatch):
    import evaluate
    model, ds = setup
    seen = []
    real = evaluate.predict_logits

    def spy(model, x, amp=False, out_size=None):
        seen.append(amp)
        return real(model, x, amp, out_size)

    monkeypatch.setattr(evaluate, "predict_logits", spy)
    for amp in (False, True):
        seen.clear()
        ev = ModelEvaluation(model, ds, device="cpu", amp=amp)
        ev.evaluate_all(progress=False)
        ev.evaluate_single(*ds[0])
        assert seen and set(seen) == {amp}


def test_tiles_run_at_the_model_scale_when_scoring_larger_masks():
    from evaluate import resize_predictor
    sizes = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            sizes.extend([tuple(x.shape[-2:])] * x.shape[0])  # tiles come batched
            return torch.zeros(x.shape[0], 23, *x.shape[-2:])

    predict = resize_predictor((48, 32), tile=(32, 32))
    out = predict(Spy(), torch.randn(1, 3, 96, 144), (96, 144))  # masks at 3x the model's scale
    assert out.shape == (1, 23, 96, 144)
    assert sizes and all(s == (32, 32) for s in sizes)
    assert len(sizes) == 2  # two overlapping tiles cover 48×32; tiling 144×96 would take more


def test_tta_averages_flips_and_turns():
    from evaluate import TTA
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 23, 3, padding=1)
    x = torch.randn(2, 3, 20, 28)
    out = TTA(conv)(x)
    assert out.shape == (2, 23, 20, 28)
    views = []
    for k in range(4):
        for flip in (False, True):
            xi = torch.rot90(x, k, (2, 3))
            xi = xi.flip(3) if flip else xi
            yi = conv(xi)
            views.append(torch.rot90(yi.flip(3) if flip else yi, -k, (2, 3)))
    want = torch.stack(views).mean(0)
    assert torch.allclose(out, want, atol=1e-5)
    pointwise = torch.nn.Conv2d(3, 23, 1)  # equivariant to flips and turns: TTA changes nothing
    assert torch.allclose(TTA(pointwise)(x), pointwise(x), atol=1e-5)


def test_tta_evaluation_keeps_the_model_it_was_given(demo_root):
    from evaluate import TTA
    torch.manual_seed(0)
    model = SingleConvolution()
    test = import_drone_dataset(demo_root, (48, 32), "test", normalize=False, cache=False)
    ev = ModelEvaluation(model, test, pixel_accuracy, device="cpu", tta=True)
    assert ev.model is model  # not silently replaced by a wrapper
    scores = ev.evaluate_all(progress=False)
    # the same as evaluating the TTA-wrapped model without tta
    plain = ModelEvaluation(TTA(model), test, pixel_accuracy, device="cpu")
    assert plain.evaluate_all(progress=False) == scores
    assert ev.evaluate_single(*test[0])[1] == scores[0]


def test_metrics_json_is_strict(tmp_path):
    import json
    from basics import write_json
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(0.5)})

    def reject(name):
        raise ValueError(name)

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=reject) == {"a": None, "b": [1.0, None],
                                                                                       "c": 0.5}


def test_multiscale_tta_returns_to_the_input_size_and_one_scale_is_todays_tta():
    from basics import InputError
    from evaluate import TTA

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 37, 53)  # odd sizes: 0.75 and 1.25 do not divide them
    with torch.no_grad():
        views = []
        for k in range(4):
            for flip in (False, True):
                xi = torch.rot90(x, k, (2, 3))
                out = conv(xi.flip(3) if flip else xi)
                views.append(torch.rot90(out.flip(3) if flip else out, -k, (2, 3)))
        assert torch.equal(TTA(conv)(x), TTA(conv, scales=(1.0,))(x))
        assert torch.allclose(TTA(conv, scales=(1.0,))(x), torch.stack(views).mean(0), atol=1e-6)
        multi = TTA(conv, scales=(0.75, 1.0, 1.25))(x)
        assert multi.shape == (2, 5, 37, 53) and torch.isfinite(multi).all()
        pointwise = torch.nn.Conv2d(3, 5, 1)  # a per-pixel model on a constant photo: every scale agrees
        flat = torch.ones(1, 3, 37, 53) * 0.3
        assert torch.allclose(TTA(pointwise, scales=(0.5, 1.0, 1.5))(flat), pointwise(flat), atol=1e-5)
    with pytest.raises(InputError):
        TTA(conv, scales=(0.0, 1.0))

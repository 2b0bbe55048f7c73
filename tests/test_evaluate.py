
import pytest
import torch

from datautils import import_drone_dataset
from evaluate import ModelEvaluation, iou_table, plot_history
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

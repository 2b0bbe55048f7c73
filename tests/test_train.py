import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from basics import seed_everything
from datautils import import_drone_dataset
from metrics import pixel_accuracy
from models import SingleConvolution
from train import load_checkpoint, train


def _loader(demo_root, shuffle=True):
    ds = import_drone_dataset(demo_root, size=(48, 32), splits="train", normalize=False, cache=False)
    return DataLoader(ds, batch_size=3, shuffle=shuffle)


def test_train_lowers_loss_and_fills_history(demo_root):
    seed_everything(0)
    model = SingleConvolution()
    val = _loader(demo_root, shuffle=False)
    hist = train(model, 4, _loader(demo_root), nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), 0.01),
                 pixel_accuracy, val_loader=val, device="cpu", progress=False)
    assert len(hist["train_loss"]) == len(hist["train_acc"]) == len(hist["val_miou"]) == 4
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert all(0 <= a <= 1 for a in hist["train_acc"] + hist["val_acc"])


def _run(demo_root, epochs, ckpt=None, resume=None, stop_after=None):
    seed_everything(7)
    model = SingleConvolution()
    opt = torch.optim.Adam(model.parameters(), 0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)

    def stop(epoch, _):
        if stop_after is not None and epoch == stop_after:
            raise KeyboardInterrupt  # as if the run was killed after this epoch's checkpoint

    try:
        hist = train(model, epochs, _loader(demo_root), nn.CrossEntropyLoss(), opt, scheduler=sched, device="cpu",
                     checkpoint=ckpt, resume=resume, on_epoch_end=stop, progress=False)
    except KeyboardInterrupt:
        return model, None
    return model, hist


def test_checkpoint_resume_equals_uninterrupted_run(demo_root, tmp_path):
    ref_model, ref_hist = _run(demo_root, 4)
    ckpt = tmp_path / "last.pt"
    _run(demo_root, 4, ckpt=ckpt, stop_after=2)
    assert load_checkpoint(ckpt)["epoch"] == 2
    # a fresh process would reseed differently: scramble the generators before resuming
    torch.manual_seed(12345)
    seed_everything(999)
    model = SingleConvolution()
    opt = torch.optim.Adam(model.parameters(), 0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    hist = train(model, 4, _loader(demo_root), nn.CrossEntropyLoss(), opt, scheduler=sched, device="cpu",
                 checkpoint=ckpt, resume=ckpt, progress=False)
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert hist["train_loss"] == ref_hist["train_loss"]
    ck = load_checkpoint(ckpt)
    assert ck["epoch"] == 4 and set(ck) >= {"model", "optimizer", "scheduler", "history", "rng"}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_checkpoint_round_trip(demo_root, tmp_path):
    model, _ = _run(demo_root, 1, ckpt=tmp_path / "c.pt")
    other = SingleConvolution()
    other.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_stops_with_clear_error(demo_root):
    model = SingleConvolution()

    def bad_loss(out, y):
        return nn.functional.cross_entropy(out, y) * float("nan")

    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, batch 1"):
        train(model, 1, _loader(demo_root), bad_loss, torch.optim.Adam(model.parameters()), device="cpu",
              progress=False)


def test_resume_from_missing_checkpoint_says_so(demo_root, tmp_path):
    model = SingleConvolution()
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no checkpoint to resume from"):
        train(model, 1, _loader(demo_root), nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters()),
              device="cpu", resume=tmp_path / "nope.pt", progress=False)

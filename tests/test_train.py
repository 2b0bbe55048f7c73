import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from basics import seed_everything
from datautils import import_drone_dataset
from metrics import pixel_accuracy
from models import SingleConvolution
from checkpoint import load_checkpoint
from train import Checkpoints, ResumeMismatch, set_rng_state, train


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
        hist = train(model, epochs, _loader(demo_root), nn.CrossEntropyLoss(), opt, scheduler=sched,
                     scheduler_per_batch=False, device="cpu",
                     checkpoints=Checkpoints(last=ckpt, resume=resume is not None), on_epoch_end=stop,
                     progress=False)
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
    hist = train(model, 4, _loader(demo_root), nn.CrossEntropyLoss(), opt, scheduler=sched, scheduler_per_batch=False,
                 device="cpu",
                 checkpoints=Checkpoints(last=ckpt, resume=True), progress=False)
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
              device="cpu", checkpoints=Checkpoints(last=tmp_path / "nope.pt", resume=True), progress=False)


# ------------------------------------------------------------------ schedulers, resume, checkpoints

def _tiny(demo_root, epochs, sched_fn=None, per_batch=None, ckpt=None, resume=None, best=None, stop_after=None,
          augment=None, plan=None, val=True, seed=3, hints=None):
    """A short SingleConvolution run; stop_after=k raises after epoch k's checkpoints (a kill)."""
    seed_everything(seed)
    model = SingleConvolution()
    opt = torch.optim.Adam(model.parameters(), 1.0 if sched_fn is not None and per_batch is False else 0.01)
    sched = sched_fn(opt) if sched_fn else None

    def stop(epoch, _):
        if stop_after is not None and epoch == stop_after:
            raise KeyboardInterrupt

    try:
        hist = train(model, epochs, _loader(demo_root), nn.CrossEntropyLoss(ignore_index=255), opt, scheduler=sched,
                     scheduler_per_batch=per_batch, device="cpu",
                     checkpoints=Checkpoints(last=ckpt, best=best, resume=resume is not None, plan=plan or {},
                                             hints=hints or {}),
                     val_loader=_loader(demo_root, shuffle=False) if val else None, augment=augment,
                     on_epoch_end=stop, progress=False)
    except KeyboardInterrupt:
        hist = None
    return model, hist, sched


def test_history_lr_is_the_rate_each_epoch_trained_at(demo_root):
    _, hist, _ = _tiny(demo_root, 3, lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5), per_batch=False, val=False)
    assert hist["lr"] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("kind", ["poly", "lambda", "onecycle"])
def test_per_batch_schedulers(demo_root, kind):
    steps = 3 * len(_loader(demo_root))
    make = {"poly": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=steps, power=0.9),
            "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
            "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.01, total_steps=steps)}[kind]
    _, hist, sched = _tiny(demo_root, 3, make, per_batch=True, val=False)
    assert sched.last_epoch == steps  # stepped once per batch
    if kind != "onecycle":
        assert hist["lr"][0] > hist["lr"][1] > hist["lr"][2] > 0


def test_reduce_on_plateau_gets_the_val_metric(demo_root):
    seen = []

    class Spy(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(metrics)
            super().step(metrics)

    _, hist, _ = _tiny(demo_root, 3, lambda o: Spy(o, mode="max"), per_batch=False)
    assert seen == hist["val_miou"]


def test_scheduler_needs_its_stepping_stated(demo_root):
    with pytest.raises(ValueError, match="scheduler_per_batch"):
        _tiny(demo_root, 1, lambda o: torch.optim.lr_scheduler.StepLR(o, 1), per_batch=None)


def test_checkpoints_load_with_weights_only_and_rng_on_any_map_location(demo_root, tmp_path):
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.01, total_steps=2 * len(_loader(demo_root)))  # noqa: E731
    _tiny(demo_root, 2, make, per_batch=True, ckpt=tmp_path / "last.pt", best=tmp_path / "best.pt")
    for name in ("last.pt", "best.pt"):
        torch.load(tmp_path / name, weights_only=True)  # tensors and plain data only
    ck = load_checkpoint(tmp_path / "last.pt", map_location="meta")  # as if mapped to a GPU
    set_rng_state(ck["rng"])
    a = torch.rand(3)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert torch.equal(a, torch.rand(3))


def test_resume_with_onecycle_and_augmentation_gives_bit_identical_weights(demo_root, tmp_path):
    from transforms import Augment
    steps = 4 * len(_loader(demo_root))
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=steps)  # noqa: E731
    aug = Augment(crop=(32, 24))
    ref, _, _ = _tiny(demo_root, 4, make, per_batch=True, augment=aug)
    ckpt = tmp_path / "last.pt"
    _tiny(demo_root, 4, make, per_batch=True, augment=aug, ckpt=ckpt, stop_after=2)
    torch.manual_seed(999)  # a new process would start elsewhere
    model, _, _ = _tiny(demo_root, 4, make, per_batch=True, augment=aug, ckpt=ckpt, resume=ckpt, seed=42)
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_checks_the_plan(demo_root, tmp_path):
    ckpt = tmp_path / "last.pt"
    _tiny(demo_root, 2, ckpt=ckpt, plan={"train_size": [48, 32]}, val=False)
    with pytest.raises(ResumeMismatch, match=r"train_size was \[48, 32\], now \[64, 48\]"):
        _tiny(demo_root, 2, ckpt=ckpt, resume=ckpt, plan={"train_size": [64, 48]}, val=False)
    with pytest.raises(ResumeMismatch, match="epochs was 2, now 3"):
        _tiny(demo_root, 3, ckpt=ckpt, resume=ckpt, plan={"train_size": [48, 32]}, val=False)


@pytest.mark.parametrize("key,value,hint", [("world_size", 2, "torchrun --nproc-per-node"),
                                             ("steps_per_epoch", 99, "--batch-size"),
                                             ("model_kwargs", {"base": 8}, "--base")])
def test_resume_mismatch_names_flags_that_exist(demo_root, tmp_path, key, value, hint):
    ckpt = tmp_path / "last.pt"
    _tiny(demo_root, 2, ckpt=ckpt, plan={"model_kwargs": {}}, val=False)
    ck = load_checkpoint(ckpt)
    ck["plan"][key] = value  # as if trained with another number of processes, batch size, width
    torch.save(ck, ckpt)
    from run_experiment import RunConfig
    with pytest.raises(ResumeMismatch) as e:  # train()'s own entries, and the script's with its hints
        _tiny(demo_root, 2, ckpt=ckpt, resume=ckpt, plan={"model_kwargs": {}}, val=False, hints=RunConfig().hints())
    assert hint in str(e.value) and f"--{key.replace('_', '-')}" not in str(e.value)


def test_a_kill_between_best_and_last_never_lets_a_worse_epoch_replace_best(demo_root, tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    _tiny(demo_root, 4, ckpt=last, best=best, stop_after=2)
    # as if epoch 3 scored higher, wrote best.pt and was killed before writing last.pt
    ck = load_checkpoint(best)
    ck["best"], ck["epoch"] = 2.0, 3
    torch.save(ck, best)
    before = best.read_bytes()
    _tiny(demo_root, 4, ckpt=last, best=best, resume=last)
    assert best.read_bytes() == before and load_checkpoint(best)["best"] == 2.0


def test_run_cli_short_message_for_bad_input_traceback_for_bugs(capsys):
    from basics import InputError
    from cli import run_cli

    def bad_input():
        raise InputError("size 'x': write it as WIDTHxHEIGHT")

    assert run_cli(bad_input) == 2
    assert "error: size 'x'" in capsys.readouterr().err

    def bug():
        raise ValueError("a bug deep inside")

    with pytest.raises(ValueError, match="a bug deep inside"):
        run_cli(bug)


def test_compile_falls_back_to_the_plain_model_with_one_message(demo_root, monkeypatch, capsys):
    from distributed import unwrap
    from models import Compiled

    def broken_compile(model, **kw):
        def run(x):
            from torch._inductor.exc import InductorError  # what inductor raises where compiling fails

            raise InductorError(RuntimeError("no working C++ compiler found\ndetails"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    seed_everything(0)
    plain = SingleConvolution()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    model = Compiled(plain)
    assert unwrap(model) is plain and list(model.state_dict()) == [f"model.{k}" for k in before]
    hist = train(model, 2, _loader(demo_root), nn.CrossEntropyLoss(ignore_index=255),
                 torch.optim.Adam(model.parameters(), 0.01), device="cpu", progress=False)
    assert len(hist["train_loss"]) == 2 and not torch.equal(before["conv.weight"], plain.state_dict()["conv.weight"])
    assert "no working C++ compiler" in model.failed
    assert capsys.readouterr().out.count("torch.compile failed") == 1


def test_resume_of_a_checkpoint_from_before_budgets_keeps_the_history_aligned(demo_root, tmp_path):
    last = tmp_path / "last.pt"
    _tiny(demo_root, 3, ckpt=last, stop_after=2)
    ck = load_checkpoint(last)
    for key in ("val_epoch", "train_steps"):  # what older versions wrote
        del ck["history"][key]
    torch.save(ck, last)
    _, hist, _ = _tiny(demo_root, 3, ckpt=last, resume=last)
    assert hist["val_epoch"] == [1, 2, 3] and len(hist["val_acc"]) == 3
    assert hist["train_steps"] == [len(_loader(demo_root))] * 3


def test_the_blogs_plain_cross_entropy_leaves_ignored_pixels_out(demo_root):
    """train(model, epochs, loader, nn.CrossEntropyLoss(), ...) as in the blog, on masks holding
    255 (an ignored class-file row, void): those pixels are never trained on, as with
    losses.make_loss, instead of 'Target 255 is out of bounds'."""
    ds = import_drone_dataset(demo_root, size=(48, 32), splits="train", normalize=False, cache=False)
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.stack([ds[i][1] for i in range(4)])
    y[:, :8] = 255
    data = torch.utils.data.TensorDataset(x, y)

    def run(loss):
        seed_everything(3)
        model = SingleConvolution()
        hist = train(model, 2, DataLoader(data, batch_size=2), loss, torch.optim.Adam(model.parameters(), 0.01),
                     pixel_accuracy, val_loader=DataLoader(data, batch_size=2), device="cpu", progress=False)
        return model, hist

    plain, hist = run(nn.CrossEntropyLoss())
    ref, ref_hist = run(nn.CrossEntropyLoss(ignore_index=255))
    hist.pop("epoch_time_s"), ref_hist.pop("epoch_time_s")
    assert hist == ref_hist
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   KeyboardInterrupt()])
def test_compile_falls_back_only_on_compile_errors(monkeypatch, capsys, error):
    """An out-of-memory error in a compiled step (or Ctrl-C) is the step's own: it stops training
    as it would without --compile, and is not called a compile failure."""
    from models import Compiled

    class Failing(nn.Module):
        def forward(self, x):
            raise error

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # "compiled": the forward runs as it is
    model = Compiled(Failing())
    with pytest.raises(type(error)):
        model(torch.zeros(1, 3, 8, 8))
    assert model.failed is None and "torch.compile failed" not in capsys.readouterr().out

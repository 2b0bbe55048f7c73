"""Time budgets (--time-limit): the schedule follows the wall clock, the run ends at its deadline,
resume continues the budget. Time is mocked: each training or validation batch costs one
fake second, so no test waits on the clock."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from basics import seed_everything
from datautils import import_drone_dataset
from models import SingleConvolution
from checkpoint import load_checkpoint
from train import BudgetSchedule, Checkpoints, TimeBudget, train

PEAK = 0.02


class FakeClock:
    def __init__(self, start: float = 0.0):
        self.t = start

    def __call__(self) -> float:
        return self.t


def _loader(demo_root, shuffle=True, batch_size=3):
    ds = import_drone_dataset(demo_root, size=(48, 32), splits="train", normalize=False, cache=False)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def _charge_checkpoint_writes(monkeypatch, clock, cost):
    """Every checkpoint write (best.pt, last.pt) costs ``cost`` fake seconds, as writing a large
    model does on a real disk."""
    import train as train_module

    real = train_module.save_checkpoint

    def save(path, **payload):
        real(path, **payload)
        clock.t += cost

    monkeypatch.setattr(train_module, "save_checkpoint", save)


def _budget_run(demo_root, seconds, clock, ckpt=None, resume=None, kill_after=None, epochs=None, val=True, best=None,
                cost=1.0, batch_size=3):
    """SingleConvolution under a budget of fake seconds: each loss call (a training step or a
    validation batch) costs ``cost`` seconds. kill_after=k raises after epoch k's checkpoints."""
    seed_everything(5)
    model = SingleConvolution()
    opt = torch.optim.AdamW(model.parameters(), PEAK)
    budget = TimeBudget(seconds, val_every=0.25, clock=clock)
    loader = _loader(demo_root, batch_size=batch_size)
    sched = BudgetSchedule(opt, budget, PEAK, "onecycle", total_steps=epochs * len(loader) if epochs else None)
    ce = nn.CrossEntropyLoss(ignore_index=255)
    rates = []

    def loss(out, y):
        if budget.used() > 2 * seconds:  # a budget that never ends fails here instead of hanging the suite
            raise RuntimeError(f"still training after {budget.used():g} fake seconds of a {seconds:g} s budget")
        if out.requires_grad:  # a training step: when it started and the rate it trains at
            rates.append((clock.t, opt.param_groups[0]["lr"]))
        clock.t += cost
        return ce(out, y)

    def kill(epoch, _):
        if kill_after is not None and epoch == kill_after:
            raise KeyboardInterrupt

    try:
        hist = train(model, epochs, loader, loss, opt, scheduler=sched, scheduler_per_batch=True, device="cpu",
                     val_loader=_loader(demo_root, False, batch_size) if val else None, budget=budget,
                     checkpoints=Checkpoints(last=ckpt, best=best, resume=resume is not None), on_epoch_end=kill,
                     progress=False)
    except KeyboardInterrupt:
        hist = None
    if hist is not None:
        hist["rates"] = rates
    return model, opt, budget, hist


def test_a_budget_run_ends_within_one_step_of_its_deadline_fully_annealed(demo_root):
    clock = FakeClock()
    steps_per_epoch, val_batches = len(_loader(demo_root)), len(_loader(demo_root, shuffle=False))
    _, opt, budget, hist = _budget_run(demo_root, 100.0, clock)
    # training ended at the deadline: not after it, and less than one step before it
    assert 100.0 - 1.0 < clock.t <= 100.0
    assert budget.done
    # the last epoch stopped mid-way and was validated; validations every quarter, not every epoch
    assert sum(hist["train_steps"]) + val_batches * len(hist["val_epoch"]) == clock.t
    assert hist["val_epoch"][-1] == len(hist["train_loss"])
    assert 4 <= len(hist["val_epoch"]) < len(hist["train_loss"])
    assert hist["train_steps"][-1] < steps_per_epoch
    # the rate of the last step was at the end of its schedule (1/25/1e4 of the peak at the deadline)
    assert opt.param_groups[0]["lr"] < PEAK * 5e-3
    assert hist["lr"][0] < PEAK / 2 and max(hist["lr"]) > PEAK / 2  # warmed up to the peak on the way


def test_the_schedule_follows_time_not_epochs(demo_root):
    """The same budget on a machine twice as slow: half the steps, the same schedule over time."""
    fast, slow = FakeClock(), FakeClock()
    _, fast_opt, _, fast_hist = _budget_run(demo_root, 100.0, fast, val=False)
    _, slow_opt, _, slow_hist = _budget_run(demo_root, 100.0, slow, val=False, cost=2.0)
    assert 98.0 < slow.t <= 100.0 and 99.0 < fast.t <= 100.0
    n_fast, n_slow = sum(fast_hist["train_steps"]), sum(slow_hist["train_steps"])
    assert n_fast == 100 and n_slow == 50
    # both annealed to the end; the slow run's epochs trained at the fast run's rates of the same time
    assert fast_opt.param_groups[0]["lr"] < PEAK * 5e-3 and slow_opt.param_groups[0]["lr"] < PEAK * 5e-3
    # the rate is a function of the time used: steps that start at the same moment train at the same rate
    fast_at = dict(fast_hist["rates"])
    assert all(lr == pytest.approx(fast_at[t], rel=1e-12) for t, lr in slow_hist["rates"])
    assert max(lr for _, lr in slow_hist["rates"]) == pytest.approx(PEAK, rel=1e-3)


def test_resume_in_the_middle_of_a_budget_equals_an_uninterrupted_run(demo_root, tmp_path):
    ref_model, _, _, ref_hist = _budget_run(demo_root, 60.0, FakeClock(), best=tmp_path / "ref_best.pt")
    ckpt = tmp_path / "last.pt"
    _budget_run(demo_root, 60.0, FakeClock(), ckpt=ckpt, kill_after=3, best=tmp_path / "best.pt")
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 3 and 0 < saved["budget"]["used_before"] < 60
    torch.manual_seed(999)  # a new process starts elsewhere, its clock too
    model, _, budget, hist = _budget_run(demo_root, 60.0, FakeClock(start=12345.0), ckpt=ckpt, resume=ckpt,
                                         best=tmp_path / "best.pt")
    assert 59.0 < budget.used() <= 60.0  # the budget continued where the killed run left it
    resumed_rates, ref_rates = hist.pop("rates"), ref_hist.pop("rates")
    assert hist == ref_hist
    assert [lr for _, lr in resumed_rates] == [lr for _, lr in ref_rates[-len(resumed_rates):]]
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # a finished budget resumed: nothing more to train
    again, _, _, hist2 = _budget_run(demo_root, 60.0, FakeClock(start=5.0), ckpt=ckpt, resume=ckpt,
                                     best=tmp_path / "best.pt")
    assert hist2.pop("rates") == [] and hist2 == ref_hist
    for a, b in zip(ref_model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_an_epoch_bound_that_comes_first_also_ends_annealed(demo_root):
    clock = FakeClock()
    _, opt, budget, hist = _budget_run(demo_root, 10_000.0, clock, epochs=3)
    assert len(hist["train_loss"]) == 3 and not budget.done
    assert opt.param_groups[0]["lr"] < PEAK * 5e-3  # the step share reached 1
    assert hist["val_epoch"][-1] == 3


@pytest.mark.parametrize("epochs", [None, 1000])
def test_a_budget_ends_at_its_deadline_when_every_epoch_is_one_step(demo_root, tmp_path, monkeypatch, epochs):
    """Own data of a dozen photos at batch 8: one step per epoch. The step is timed by itself (not
    between two steps of one epoch), so the deadline fires, an epoch bound does not hide it, and
    validation goes on until the end."""
    clock = FakeClock()
    _charge_checkpoint_writes(monkeypatch, clock, 0.5)
    _, opt, budget, hist = _budget_run(demo_root, 40.0, clock, ckpt=tmp_path / "last.pt", best=tmp_path / "best.pt",
                                       epochs=epochs, batch_size=8)
    assert set(hist["train_steps"]) == {1}
    assert budget.done and 40.0 - 4.0 < clock.t <= 40.0
    assert hist["val_epoch"][-1] == len(hist["train_loss"]) and len(hist["val_epoch"]) >= 4
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == hist["val_epoch"][-1]  # best.pt kept up to the end
    assert opt.param_groups[0]["lr"] < PEAK * 0.02  # near the end of its schedule (the last step is 1/37 of it)


def test_checkpoint_writes_are_inside_the_budget(demo_root, tmp_path, monkeypatch):
    """Writing best.pt and last.pt takes time: the reserve for the end holds the final validation
    and both writes, so the last last.pt is written before the deadline."""
    clock = FakeClock()
    _charge_checkpoint_writes(monkeypatch, clock, 2.0)
    _, _, budget, hist = _budget_run(demo_root, 100.0, clock, ckpt=tmp_path / "last.pt", best=tmp_path / "best.pt")
    assert budget.done and 100.0 - 8.0 < clock.t <= 100.0
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == len(hist["train_loss"])


def _schedule(kind: str, seconds: float):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], PEAK)
    budget = TimeBudget(seconds, clock=FakeClock())
    budget.start()
    return opt, budget, BudgetSchedule(opt, budget, PEAK, kind)


def test_budget_schedule_shape_matches_onecycle():
    """Over progress 0..1: torch OneCycleLR's defaults (cosine, div 25, final div 1e4, beta1 0.95→0.85→0.95)."""
    opt, budget, sched = _schedule("onecycle", 100.0)
    seen = []
    for now in (0.0, 5.0, 10.0, 55.0, 100.0):
        budget.now = now
        sched._apply()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
    assert seen[0] == pytest.approx((PEAK / 25, 0.95))
    assert seen[2] == pytest.approx((PEAK, 0.85))
    assert seen[3] == pytest.approx((PEAK / 2 + PEAK / 25 / 1e4 / 2, 0.90))
    assert seen[4] == pytest.approx((PEAK / 25 / 1e4, 0.95))
    assert seen[0][0] < seen[1][0] < seen[2][0] and seen[2][0] > seen[3][0] > seen[4][0]
    # against torch's own OneCycleLR at the same share of its steps (its phases end one step early)
    total = 1000
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], PEAK)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, PEAK, total_steps=total, pct_start=0.1)
    for step in range(total - 1):
        ref_opt.step()
        ref.step()
        budget.now = 100.0 * (step + 1) / total
        sched._apply()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=0.02, abs=PEAK * 3e-3)


def test_poly_budget_schedule():
    opt, budget, sched = _schedule("poly", 10.0)
    assert opt.param_groups[0]["lr"] == PEAK and opt.param_groups[0]["betas"][0] == 0.9  # beta1 untouched
    budget.now = 5.0
    sched._apply()
    assert opt.param_groups[0]["lr"] == pytest.approx(PEAK * 0.5 ** 0.9)


def test_bad_budgets_say_so():
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)
    model = SingleConvolution()
    with pytest.raises(ValueError, match="needs a time budget"):
        train(model, None, [], nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters()), device="cpu")


def test_without_a_budget_nothing_reads_the_clock(demo_root, monkeypatch):
    """--epochs without --time-limit: the old path (torch's scheduler, every epoch validated)."""
    import train as train_module

    monkeypatch.setattr(train_module.TimeBudget, "before_step", lambda *a, **k: pytest.fail("budget used"))
    seed_everything(1)
    model = SingleConvolution()
    opt = torch.optim.AdamW(model.parameters(), PEAK)
    loader = _loader(demo_root)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PEAK, total_steps=2 * len(loader))
    hist = train(model, 2, loader, nn.CrossEntropyLoss(ignore_index=255), opt, scheduler=sched,
                 scheduler_per_batch=True, device="cpu", val_loader=_loader(demo_root, shuffle=False), progress=False)
    assert hist["val_epoch"] == [1, 2] and hist["train_steps"] == [len(loader)] * 2
    assert sched.last_epoch == 2 * len(loader)
    assert not math.isnan(hist["val_miou"][-1])


def test_run_experiment_budget_end_to_end_and_the_budget_report(tmp_path, capsys):
    """--time-limit through the script: the run ends by its budget and reports what it ran, and
    tools/budget_report.py turns the run into a row and a figure."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    env = dict(os.environ, DRONE_CACHE_DIR=str(tmp_path / "cache"))
    args = [sys.executable, str(REPO / "run_experiment.py"), "--model", "unet", "--base", "8", "--depth", "2", "--demo",
            "--train-size", "48x32", "--crop", "32", "--batch-size", "4", "--eval-split", "val", "--out", str(out)]
    r = subprocess.run(args + ["--time-limit", "0.05"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    h = json.loads((out / "history.json").read_text())
    # (the deadline itself is tested on a mocked clock above; this machine's speed decides the steps)
    assert m["time_limit"] == 0.05 and m["epochs"] is None
    assert m["steps_run"] == sum(h["train_steps"]) >= 1 and m["epochs_run"] > 0
    assert h["val_epoch"][-1] == len(h["train_loss"])
    assert "budget minutes" in r.stdout
    sys.path.insert(0, str(REPO / "tools"))
    import budget_report  # in this process: the tool's table and figure
    assert budget_report.main([str(out), "--out", str(tmp_path / "b.png")]) == 0
    assert "| run | 0.05 min |" in capsys.readouterr().out and (tmp_path / "b.png").stat().st_size > 0
    assert budget_report.main([str(tmp_path / "nothing")]) == 2
    assert "not a finished run_experiment.py output" in capsys.readouterr().err
    # resumed, the report counts the whole budget (train_time_s is this invocation's part alone)
    import torch

    import run_experiment  # in this process
    here = args[2:-2] + ["--out", str(tmp_path / "resumed"), "--cache-dir", str(tmp_path / "cache"),
                         "--time-limit", "0.1"]
    # an invocation stopped mid-budget validates before it stops: its report has a best.pt to score
    assert run_experiment.main(here + ["--stop-after-epoch", "1"]) == 0
    assert json.loads((tmp_path / "resumed" / "history.json").read_text())["val_epoch"] == [1]
    first = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["budget"]["used_before"]
    assert run_experiment.main(here + ["--resume"]) == 0
    m = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert 0 < first <= m["budget_used_s"] <= first + m["train_time_s"]
    assert budget_report.budget_rows([tmp_path / "resumed"])[0]["train_min"] == m["budget_used_s"] / 60


def test_budget_report_spread_over_repeats(tmp_path, capsys):
    """Runs of one budget are grouped: mean, lowest and highest of steps and val numbers per budget."""
    import json
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import budget_report

    def fake_run(name, budget, steps, acc, miou):
        run = tmp_path / name
        run.mkdir()
        h = {"val_epoch": [1, 2], "val_acc": acc, "val_miou": miou, "epoch_time_s": [60.0, 60.0],
             "train_steps": [steps // 2, steps - steps // 2]}
        m = {"time_limit": budget, "epochs_run": 2.0, "steps_run": steps, "train_time_s": 120.0,
             "pixel_accuracy": acc[-1], "miou": miou[-1], "tta": False}
        (run / "history.json").write_text(json.dumps(h))
        (run / "metrics.json").write_text(json.dumps(m))
        return run

    runs = [fake_run("a", 30, 100, [0.80, 0.86], [0.30, 0.44]), fake_run("b", 30, 90, [0.84, 0.82], [0.41, 0.38]),
            fake_run("c", 90, 300, [0.89, 0.90], [0.50, 0.54])]
    spread = budget_report.budget_spread(budget_report.budget_rows(runs))
    assert [(g["budget_min"], g["runs"]) for g in spread] == [(30, 2), (90, 1)]
    assert spread[0]["steps_run"] == (95, 90, 100)
    assert spread[0]["last_acc"] == pytest.approx((0.84, 0.82, 0.86))
    # b's selected validation (best mIoU) is its first: 0.84 / 0.41; a's its last: 0.86 / 0.44
    assert spread[0]["best_acc"] == pytest.approx((0.85, 0.84, 0.86))
    assert spread[0]["best_miou"] == pytest.approx((0.425, 0.41, 0.44))
    assert spread[1]["last_miou"] == (0.54, 0.54, 0.54)
    assert budget_report.main([str(r) for r in runs] + ["--out", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert "| a | 30 min | 2.0 | 100 |" in out
    assert "| 30 min | 2 | 95 [90, 100] | 0.8400 [0.8200, 0.8600] |" in out and "| 90 min | 1 | 300 | 0.9000 |" in out

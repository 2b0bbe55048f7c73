"""The one training loop every script uses: ``train(model, epochs, train_loader, loss_func, optimizer,
acc_metric)``, a thin loop of :func:`train_one_epoch` and validation, with checkpoints, exact
resume (RNG states, the run's plan checked) and model selection on val.

Not here: the losses (losses.py), evaluation (evaluate.py), the checkpoint file and its metadata
(checkpoint.py; :class:`Checkpoints` writes and resumes the training state through it) and the
scripts' command-line plumbing (cli.py).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from basics import InputError, device as default_device
from checkpoint import load_checkpoint, save_checkpoint
from distributed import (all_reduce_max, broadcast_buffers, from_main, gather_objects, is_distributed, is_main, rank,
                         unwrap, world_size)
from evaluate import evaluate_loader
from layout import IGNORE
from losses import ignoring_void
from metrics import pixel_accuracy
from transforms import prepare_batch

__all__ = ["train", "train_one_epoch", "Checkpoints", "TimeBudget", "BudgetSchedule", "rng_state", "set_rng_state",
           "ResumeMismatch"]


def rng_state() -> dict:
    """Every random generator's state as plain lists, for exact resume (loadable with
    ``torch.load(weights_only=True)``, and on any device whatever the map location)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(x) -> torch.Tensor:
    # RNG states must be CPU byte tensors; checkpoints may hold lists, or tensors mapped to a GPU
    return torch.as_tensor(x).to("cpu", torch.uint8) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(_byte_tensor(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


class ResumeMismatch(InputError):
    """--resume with settings other than those the checkpoint was trained with."""


# train()'s own plan entries: how to get the checkpoint's value back (a script's settings bring
# their own hints, Checkpoints.hints)
_RESUME_HINTS = {
    "world_size": "the same number of processes (torchrun --nproc-per-node / --nnodes)",
    "steps_per_epoch": "the same training split and --batch-size (steps per epoch = images / batch size)",
    "optimizer": "the same optimiser",
    "scheduler": "the same --schedule",
    "scheduler_per_batch": "the same --schedule",
}


@dataclass
class Checkpoints:
    """What :func:`train` writes and reads. ``last``: after every epoch, atomically (model,
    optimiser, scheduler, epoch, history, every rank's RNG states, the budget's time, ``meta``
    and the ``plan``). ``best``: the epoch with the best ``val_<select_metric>``; on resume its own
    score is the bar, so a kill between writing best and last never lets a worse epoch replace
    it. ``resume``: continue from ``last`` (the result equals an uninterrupted run on the CPU
    with the same seed); a ``plan`` entry (image size, model, ...) that differs from the
    checkpoint's stops with one line naming how to get it back (:meth:`hint`). ``meta`` (a
    :class:`checkpoint.ModelMeta` as a dict) goes into both checkpoints.

    train() calls :meth:`open` once (binding what it trains; resuming, restoring it) and
    :meth:`epoch_done` after every epoch (writing best and last)."""

    last: str | os.PathLike | None = None
    best: str | os.PathLike | None = None
    resume: bool = False
    meta: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)

    def hint(self, key: str, old) -> str:
        """How to get the checkpoint's value ``old`` of plan entry ``key`` back, as the words after
        "resume": ``hints[key](old)`` where the script gives a function, else its flag with the
        value (``with --flag value``, a list as WxH; ``without --flag`` for None or False) or its
        words, else train()'s own words, else ``with --key value``."""
        hint = self.hints.get(key) or _RESUME_HINTS.get(key) or f"--{key.replace('_', '-')}"
        if callable(hint):
            return hint(old)
        if not (hint.startswith("--") and " " not in hint):  # words
            return hint if hint.startswith(("with ", "without ")) else f"with {hint}"
        if old is None or old is False:
            return f"without {hint}"
        if old is True:
            return f"with {hint}"
        return f"with {hint} {old[0]}x{old[1]}" if isinstance(old, (list, tuple)) and len(old) == 2 else \
            f"with {hint} {old}"

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, plan: dict, select_metric: str,
             steps_per_epoch: int) -> tuple[dict | None, int, dict | None]:
        """Bind what the checkpoints hold: the plain ``model``, ``optimizer``, ``scheduler`` and the
        run's whole ``plan``. Resuming, check the plan against ``last``'s (the first difference
        stops with one line), then restore the weights, optimiser, schedule and this rank's random
        generators: returns the history and epoch to continue from and the budget's saved state
        (None, 0, None when not resuming)."""
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        self._plan, self._select_metric = plan, select_metric
        self.score = -math.inf  # the best val score so far: what best.pt must beat
        if not self.resume:
            return None, 0, None
        if self.last is None:
            raise ValueError("train(): resuming needs Checkpoints(last=...), the file to resume from")
        ck, best_on_disk = from_main(lambda: _read_resume(self.last, self.best))  # rank 0's disk only
        saved = ck.get("plan", {})
        for key, now in plan.items():
            if key in saved and saved[key] != now:
                raise ResumeMismatch(f"{self.last}: cannot resume: {key} was {saved[key]!r}, now {now!r}: resume "
                                     f"{self.hint(key, saved[key])} (the checkpoint's settings), or start a new run "
                                     "in another --out folder.")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        history = ck["history"]
        # checkpoints from before budgets validated every epoch and ran whole epochs
        history.setdefault("train_steps", [steps_per_epoch] * len(history["train_loss"]))
        if "val_acc" in history:
            history.setdefault("val_epoch", list(range(1, len(history["val_acc"]) + 1)))
        self.score = best_on_disk if best_on_disk is not None else ck.get("best", -math.inf)  # the file on disk wins
        set_rng_state(ck["rng_ranks"][rank()] if "rng_ranks" in ck else ck["rng"])  # each rank its own stream
        return history, ck["epoch"], ck.get("budget")

    def epoch_done(self, epoch: int, history: dict, score: float | None, budget: "TimeBudget | None" = None,
                   validation_s: float = 0.0) -> None:
        """After ``epoch`` (from 1): best.pt when its val ``score`` (None: not validated) beats the
        best so far, then last.pt (rank 0 writes; every rank's generators go in). Under a
        ``budget``, the validation's time (``validation_s``) and the writes' are recorded."""
        clock = budget.clock if budget is not None else time.perf_counter
        t_best = clock()
        new_best = score is not None and self.best is not None and score > self.score
        if new_best:
            self.score = score
            if is_main():
                save_checkpoint(self.best, model=self._model.state_dict(), epoch=epoch, history=history, best=score,
                                select_metric=self._select_metric, selected_on="val", meta=self.meta, plan=self._plan)
        if budget is not None and score is not None:
            budget.validated(validation_s, clock() - t_best if new_best else None)
        if self.last is not None:
            t_last = clock()
            rngs = gather_objects(rng_state())  # every rank's generators, for an exact resume
            if is_main():
                scheduler = self._scheduler
                save_checkpoint(self.last, model=self._model.state_dict(), optimizer=self._optimizer.state_dict(),
                                scheduler=scheduler.state_dict() if scheduler is not None else None,
                                epoch=epoch, history=history, best=self.score, rng=rngs[0], meta=self.meta,
                                plan=self._plan, **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
                                **({"budget": budget.state_dict()} if budget is not None else {}))
            if budget is not None:  # after the write, so the checkpoint holds the previous write's time
                budget.checkpointed(clock() - t_last)


def _read_resume(resume, best_path) -> tuple[dict, float | None]:
    """The checkpoint to resume from and the score of the best.pt on disk (None without one)."""
    if not Path(resume).exists():
        raise FileNotFoundError(f"{resume}: no checkpoint to resume from; start without resuming")
    ck = load_checkpoint(resume)
    best = load_checkpoint(best_path).get("best") if best_path is not None and Path(best_path).is_file() else None
    return ck, best


class TimeBudget:
    """A training run's wall-clock budget, which :class:`BudgetSchedule` follows.

    What counts: the whole of :func:`train` from its start (a resumed run continues from the time
    the checkpoint recorded): training steps with their data loading and any compile time,
    validations and checkpoint writes. Not counted: what happens before ``train`` (caches,
    model building) and the final evaluation after it. A step starts only when it fits, with
    the final validation and checkpoint writes still inside the budget (:meth:`reserve`: the
    last validation's time and the last measured write of best.pt and of last.pt), so a run
    ends within about one step of its deadline. Each step is timed by itself, from the wait for
    its batch to the end of its optimiser step (:meth:`after_step`), so a run of one step per
    epoch is timed too. The first step always runs. ``val_every``: validate when the budget has
    advanced by this fraction since the last validation (always at the end). Under torchrun every
    rank uses the slowest rank's clock, so all ranks take the same rates and stop at the same step.
    """

    def __init__(self, seconds: float, val_every: float = 0.1, clock: Callable[[], float] = time.perf_counter):
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds} s")
        self.seconds, self.val_every, self.clock = float(seconds), val_every, clock
        self.used_before = 0.0   # seconds spent by earlier invocations (resume)
        self.now = 0.0           # seconds used at the start of the current step (all ranks agree)
        self.step_s: float | None = None  # running estimate of one step with its data loading
        self.reserve_s = 0.0     # the last validation: kept free for the final one
        self.best_write_s = 0.0  # the last write of best.pt, and of last.pt: kept free for the final ones
        self.last_write_s = 0.0
        self.last_val = 0.0      # fraction at the last validation
        self.done = False        # a step did not fit: the budget is spent
        self._t0: float | None = None
        self._wait_start: float | None = None  # when the coming step began waiting for its batch
        self._followers: list[Callable[[], None]] = []  # schedules that set the rate of each step

    def start(self, state: dict | None = None) -> None:
        """Start counting (from a checkpoint's :meth:`state_dict` when resuming)."""
        for key, value in (state or {}).items():
            setattr(self, key, value)
        self._t0, self._wait_start = self.clock(), None

    def used(self) -> float:
        """Seconds of the budget used so far."""
        return self.used_before + self.clock() - self._t0

    def state_dict(self) -> dict:
        return {"used_before": self.used(), "step_s": self.step_s, "reserve_s": self.reserve_s,
                "best_write_s": self.best_write_s, "last_write_s": self.last_write_s,
                "last_val": self.last_val, "done": self.done}

    def reserve(self) -> float:
        """Seconds kept free for the end: the final validation and checkpoint writes."""
        return self.reserve_s + self.best_write_s + self.last_write_s

    @property
    def fraction(self) -> float:
        """Share of the budget used at the current step, 0..1 (the deadline less the reserve is 1)."""
        return min(1.0, self.now / max(self.seconds - self.reserve(), 1e-9))

    def start_epoch(self) -> None:
        """Called when an epoch's loader starts: its first step's wait for data begins here."""
        self._wait_start = self.clock()

    def before_step(self, first_of_epoch: bool) -> bool:
        """Called before each training step: whether it fits in the budget (False: stop here).
        (``first_of_epoch`` is no longer needed: :meth:`after_step` times every step.)"""
        if self._wait_start is None:  # a caller that did not say when the epoch began
            self._wait_start = self.clock()
        self.now = self.used()
        if is_distributed():  # the slowest rank's clock on every rank: the same rates, the same last step
            self.now, step = _max_over_ranks(self.now, -1.0 if self.step_s is None else self.step_s)
            self.step_s = None if step < 0 else step
        if self.step_s is not None and self.now + self.step_s + self.reserve() > self.seconds:
            self.done = True
        else:
            for follow in self._followers:
                follow()
        return not self.done

    def epoch_done(self, writes_checkpoint: bool) -> None:
        """Called after an epoch's last step: when the next epoch's first step would not fit after
        this epoch's last.pt write, the budget ends here, so this epoch is validated and written
        once (not written, then validated and written again past the deadline)."""
        if self.done or self.step_s is None:
            return
        now, step_s = self.used(), self.step_s
        if is_distributed():  # every rank decides on the same numbers, or they part ways at the next collective
            now, step_s = _max_over_ranks(now, step_s)
        after_write = now + (self.last_write_s if writes_checkpoint else 0.0)
        if after_write + step_s + self.reserve() > self.seconds:
            self.done = True

    def after_step(self) -> None:
        """Called when a training step has ended: its time, with the wait for its batch, updates
        the estimate of one step; the next step's wait starts now."""
        t = self.clock()
        dt = t - self._wait_start
        self.step_s = dt if self.step_s is None else 0.7 * self.step_s + 0.3 * dt
        self._wait_start = t

    def validation_due(self) -> bool:
        """Whether to validate after this epoch: at the end, or ``val_every`` after the last one."""
        return self.done or self.fraction >= self.last_val + self.val_every

    def validated(self, overhead_s: float, best_write_s: float | None = None) -> None:
        """Record a validation that took ``overhead_s`` and, when best.pt was written after it,
        that write's time."""
        if is_distributed():
            overhead_s, best = _max_over_ranks(overhead_s, -1.0 if best_write_s is None else best_write_s)
            best_write_s = None if best < 0 else best
        self.reserve_s, self.last_val = overhead_s, self.fraction
        if best_write_s is not None:
            self.best_write_s = best_write_s

    def checkpointed(self, seconds: float) -> None:
        """Record how long writing last.pt took (the final one is reserved at that cost)."""
        if is_distributed():
            (seconds,) = _max_over_ranks(seconds)
        self.last_write_s = seconds


def _max_over_ranks(*values: float) -> list[float]:
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return all_reduce_max(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


class BudgetSchedule:
    """OneCycle (cosine warm-up then cosine annealing, with Adam's beta1 cycled inversely, as
    ``torch.optim.lr_scheduler.OneCycleLR``'s defaults) or poly (power 0.9) learning rates over the
    share of a :class:`TimeBudget` used: every run ends annealed at its deadline, however fast the
    machine. ``total_steps`` (from ``--epochs``) is an upper bound: progress is the larger of the
    time share and the step share, so a run that reaches its epoch bound first also ends annealed.
    Steps after every batch, like OneCycleLR (``scheduler_per_batch=True``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, budget: TimeBudget, max_lr: float | list[float],
                 kind: str = "onecycle", total_steps: int | None = None, pct_start: float = 0.1,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, momentum: tuple[float, float] = (0.85, 0.95),
                 power: float = 0.9):
        if kind not in ("onecycle", "poly"):
            raise ValueError(f"unknown budget schedule {kind!r}: onecycle or poly")
        groups = optimizer.param_groups
        self.optimizer, self.budget, self.kind, self.total_steps = optimizer, budget, kind, total_steps
        self.max_lrs = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr] * len(groups)
        self.pct_start, self.div, self.final_div, self.momentum, self.power = (pct_start, div_factor,
                                                                               final_div_factor, momentum, power)
        self.steps = 0
        self._cycle_beta = kind == "onecycle" and all("betas" in g for g in groups)
        budget._followers.append(self._apply)  # each step trains at the rate of the time it starts
        self._apply()

    def progress(self) -> float:
        """0 at the start, 1 at the deadline (or at ``total_steps``)."""
        p = self.budget.fraction
        if self.total_steps:
            p = max(p, self.steps / max(self.total_steps - 1, 1))  # the last step at the end, as OneCycleLR
        return min(1.0, p)

    def _apply(self) -> None:
        p = self.progress()
        for g, top in zip(self.optimizer.param_groups, self.max_lrs):
            if self.kind == "poly":
                g["lr"] = top * (1.0 - p) ** self.power
                continue
            start, end = top / self.div, top / self.div / self.final_div
            lo, hi = self.momentum
            if p < self.pct_start:  # warm-up: rate up, beta1 down
                t = p / self.pct_start
                lr, beta = _cos(start, top, t), _cos(hi, lo, t)
            else:
                t = (p - self.pct_start) / (1.0 - self.pct_start)
                lr, beta = _cos(top, end, t), _cos(lo, hi, t)
            g["lr"] = lr
            if self._cycle_beta:
                g["betas"] = (beta, *g["betas"][1:])

    def step(self) -> None:
        """After each optimiser step (the budget sets the next step's rate when it starts)."""
        self.steps += 1

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]  # the time share comes back with the budget's state


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * t) + 1.0)


def train_one_epoch(model: nn.Module, loader, loss_func: Callable, optimizer: torch.optim.Optimizer,
                    acc_metric: Callable = pixel_accuracy, *, device: torch.device | str | None = None,
                    scheduler=None, amp: bool = True, grad_clip: float | None = None,
                    augment: Callable | None = None, progress: bool = True, epoch: int = 0,
                    desc: str | None = None, budget: TimeBudget | None = None,
                    ignore_index: int | None = None) -> dict:
    """One pass over ``loader``: forward, loss, backward, optimizer step (and ``scheduler.step()``
    after every batch when one is given). Returns ``loss`` and ``acc`` (means over samples of the
    batch values), ``lr`` (the mean rate over the steps taken of the first parameter group not
    named "encoder": the rate ``--lr`` sets), ``lr_<name>`` for every other named group and
    ``steps``. With a ``budget``, a step starts only if it fits (see :class:`TimeBudget`).
    Pixels labelled 255 (``layout.IGNORE``) are never trained on (a torch cross-entropy loss is
    made to leave them out: :func:`losses.ignoring_void`), nor counted in ``acc``, and neither
    are those labelled ``ignore_index``.
    A NaN or infinite loss raises FloatingPointError naming the (0-based) ``epoch`` and batch."""
    device = torch.device(device) if device is not None else default_device
    loss_func = ignoring_void(loss_func)
    use_amp = amp and device.type == "cuda"
    model.train()
    loss_sum, acc_sum, seen, steps = 0.0, 0.0, 0, 0
    lr_keys = _lr_keys(optimizer)
    lr_sums = [0.0] * len(lr_keys)
    bar = tqdm(loader, desc=desc or f"epoch {epoch + 1}", leave=False, disable=not progress)
    if budget is not None:
        budget.start_epoch()
    for b, batch in enumerate(bar):
        if budget is not None and not budget.before_step(first_of_epoch=b == 0):
            break
        x, y = prepare_batch(batch, device, augment)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
            loss = loss_func(out, y)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(
                f"loss is {lv} at epoch {epoch + 1}, batch {b + 1}: training diverged. Lower the learning "
                "rate (--lr), enable gradient clipping, or check the inputs of that batch.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr_sums = [total + g["lr"] for total, g in zip(lr_sums, optimizer.param_groups)]
        steps += 1
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = x.shape[0]
        loss_sum, seen = loss_sum + lv * n, seen + n
        if ignore_index is not None:  # the metric then leaves it out as it does IGNORE
            y = y.masked_fill(y == ignore_index, IGNORE)
        acc_sum += float(acc_metric(out.detach(), y)) * n
        if budget is not None:
            budget.after_step()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    bar.close()
    lrs = {key: total / max(steps, 1) for key, total in zip(lr_keys, lr_sums) if key is not None}
    return {"loss": loss_sum / max(seen, 1), "acc": acc_sum / max(seen, 1), "steps": steps, **lrs}


def _lr_keys(optimizer: torch.optim.Optimizer) -> list[str | None]:
    """History key of each parameter group's rate: "lr" for the first group not named "encoder",
    "lr_<name>" for other named groups, None (not recorded) for the rest."""
    groups = optimizer.param_groups
    main = next((i for i, g in enumerate(groups) if g.get("name") != "encoder"), 0)
    return ["lr" if i == main else f"lr_{g['name']}" if g.get("name") else None for i, g in enumerate(groups)]


def _validate(model: nn.Module, loader, history: dict, epoch: int, **options) -> str:
    """Score ``model`` on the val ``loader`` after ``epoch`` (from 1) into ``history``
    (``val_loss``, ``val_acc``, ``val_miou``, ``val_epoch``); returns the progress line's part."""
    res = evaluate_loader(model, loader, **options)
    m = res["metrics"]
    history["val_loss"].append(res["loss"])
    history["val_acc"].append(m["pixel_accuracy"])
    history["val_miou"].append(m["miou"])
    history.setdefault("val_epoch", []).append(epoch)
    return f" | val loss {res['loss']:.4f}, acc {m['pixel_accuracy']:.4f}, mIoU {m['miou']:.4f}"


def _say(line: str, budget: TimeBudget | None, progress: bool) -> None:
    """Print an epoch's line (with the budget used so far)."""
    if budget is not None:
        line += f" | budget {budget.used() / 60:.1f} of {budget.seconds / 60:.1f} min"
    if progress and line:
        tqdm.write(line)


def train(model: nn.Module, epochs: int, train_loader, loss_func: Callable, optimizer: torch.optim.Optimizer,
          acc_metric: Callable = pixel_accuracy, *, val_loader=None, scheduler=None,
          scheduler_per_batch: bool | None = None, device: torch.device | str | None = None,
          amp: bool = True, grad_clip: float | None = None, augment: Callable | None = None,
          checkpoints: Checkpoints | None = None, select_metric: str = "miou",
          num_classes: int | None = None, ignore_index: int | None = None,
          on_epoch_start: Callable[[int], None] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None, progress: bool = True,
          budget: TimeBudget | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train ``model`` for ``epochs`` epochs and return its history.

    history has per-epoch ``train_loss`` and ``train_acc`` (mean of ``acc_metric`` over
    batches, weighted by batch size), ``lr`` (the mean rate of the first parameter group over
    the epoch's steps: what the epoch trained at) and ``epoch_time_s``; with ``val_loader``
    also ``val_loss``, ``val_acc`` (pixel accuracy) and ``val_miou`` (dataset-level).

    A ``scheduler`` needs ``scheduler_per_batch``: True steps it after every batch (OneCycleLR,
    PolynomialLR over total steps), False once per epoch (StepLR, ...). ReduceLROnPlateau
    steps per epoch with ``val_<select_metric>`` (higher is better: build it with mode="max").
    Options: bf16 autocast on CUDA (``amp``), gradient clipping, ``augment(x_uint8, y) -> (x, y)``
    on the device, ``checkpoints`` (:class:`Checkpoints`: last, best, resume). ``budget`` (a
    :class:`TimeBudget`) ends training within about a step of its deadline, mid-epoch if need
    be (``epochs`` is then an upper bound, or None for none); validation then runs every
    ``budget.val_every`` of the budget and always at the end
    (``val_epoch`` lists the epochs validated), and a :class:`BudgetSchedule` follows it; resume
    continues the budget's time. ``stop_after_epoch`` ends this call after that epoch (validated,
    under a budget too), to be resumed later (a session's end, a preemptible machine).
    ``train_steps`` counts each epoch's steps. A NaN or infinite loss stops training with an
    error naming the epoch and batch. Pixels labelled 255 (``layout.IGNORE``: ignored class-file
    rows, void, crop padding) are never trained on or scored, whatever the loss (a plain
    ``nn.CrossEntropyLoss()`` included: :func:`losses.ignoring_void`); ``ignore_index`` is left
    out of the metrics too.
    """
    device = torch.device(device) if device is not None else default_device
    loss_func = ignoring_void(loss_func)  # also for the val loss
    model.to(device)
    use_amp = amp and device.type == "cuda"
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if scheduler is not None and scheduler_per_batch is None:
        raise ValueError("train(): say how the scheduler steps: scheduler_per_batch=True (after every batch, "
                         "e.g. OneCycleLR) or False (once per epoch, e.g. StepLR, ReduceLROnPlateau)")
    if plateau and (scheduler_per_batch or val_loader is None):
        raise ValueError("ReduceLROnPlateau steps once per epoch on the val metric: pass val_loader and "
                         "scheduler_per_batch=False")
    if epochs is None and budget is None:
        raise ValueError("train(): epochs=None (no epoch bound) needs a time budget")
    ck = checkpoints or Checkpoints()
    raw = unwrap(model)  # checkpoints and validation use the plain model, also under DDP
    # what a resumed run must share: the script's entries first (its hints name the flags that
    # give them back, e.g. --time-limit before the --epochs it implies), then train()'s own
    own = {"epochs": epochs, "steps_per_epoch": len(train_loader),
           "batch_size": getattr(train_loader, "batch_size", None), "optimizer": type(optimizer).__name__,
           "scheduler": type(scheduler).__name__ if scheduler is not None else None,
           "scheduler_per_batch": scheduler_per_batch, "world_size": world_size()}
    plan = {**ck.plan, **{k: v for k, v in own.items() if k not in ck.plan}}
    history, start, budget_state = ck.open(raw, optimizer, scheduler, plan, select_metric, len(train_loader))
    if history is None:
        history = {"train_loss": [], "train_acc": [], "train_steps": [], "lr": [], "epoch_time_s": []}
        if val_loader is not None:
            history.update(val_loss=[], val_acc=[], val_miou=[], val_epoch=[])
    progress = progress and is_main()
    clock = budget.clock if budget is not None else time.perf_counter
    if budget is not None:
        budget.start(budget_state)
    validated = history["val_epoch"][-1] if history.get("val_epoch") else 0
    val_options = dict(device=device, loss_func=loss_func, num_classes=num_classes, ignore_index=ignore_index,
                       amp=use_amp)

    epoch = start
    while (epochs is None or epoch < epochs) and not (budget is not None and budget.done):
        if on_epoch_start is not None:
            on_epoch_start(epoch)  # 0-based; e.g. unfreezing an encoder, also right after a resume
        t0 = clock()
        for reshuffle in (train_loader, getattr(train_loader, "sampler", None)):
            if hasattr(reshuffle, "set_epoch"):  # under torchrun: a new shard order every epoch
                reshuffle.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, loss_func, optimizer, acc_metric, device=device,
                                scheduler=scheduler if scheduler_per_batch else None, amp=amp,
                                grad_clip=grad_clip, augment=augment, progress=progress, epoch=epoch,
                                desc=f"epoch {epoch + 1}/{epochs or '-'}", budget=budget,
                                ignore_index=ignore_index)
        if stats["steps"] == 0:
            break  # the budget ended before this epoch's first step
        if budget is not None and stats["steps"] == len(train_loader) and epoch + 1 != epochs:
            budget.epoch_done(writes_checkpoint=ck.last is not None)
        epoch += 1
        broadcast_buffers(raw)  # rank 0's batch-norm statistics everywhere: validated = saved
        history["train_loss"].append(stats["loss"])
        history["train_acc"].append(stats["acc"])
        history.setdefault("train_steps", []).append(stats["steps"])
        for key in stats:
            if key.startswith("lr"):
                history.setdefault(key, []).append(stats[key])
        line = f"epoch {epoch}/{epochs or '-'}: train loss {stats['loss']:.4f}, acc {stats['acc']:.4f}"
        if budget is not None and budget.done:
            line += f" ({stats['steps']} of {len(train_loader)} steps: the budget ends here)"
        stopping = stop_after_epoch is not None and epoch >= stop_after_epoch
        # under a budget, also before this invocation stops: its best.pt then holds a validated epoch
        validate = val_loader is not None and (budget is None or epoch == epochs or budget.validation_due()
                                               or stopping)
        # validate (when due), step a per-epoch schedule, say how the epoch went, write the checkpoints
        t_val = clock()
        if validate:
            line += _validate(raw, val_loader, history, epoch, **val_options)
            validated = epoch
        if scheduler is not None and not scheduler_per_batch:
            if plateau:
                scheduler.step(history[f"val_{select_metric}"][-1])
            else:
                scheduler.step()
        history["epoch_time_s"].append(clock() - t0)
        _say(line + f" ({history['epoch_time_s'][-1]:.1f} s)", budget, progress)
        ck.epoch_done(epoch, history, history[f"val_{select_metric}"][-1] if validate else None, budget,
                      clock() - t_val)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
        if stopping and epoch != epochs and not (budget is not None and budget.done):
            if progress:
                tqdm.write(f"stopping after epoch {epoch} as asked (--resume continues)")
            return history
    if val_loader is not None and validated < epoch:  # the budget ended before this epoch was validated
        t_val = clock()
        _say(_validate(raw, val_loader, history, epoch, **val_options), budget, progress)
        ck.epoch_done(epoch, history, history[f"val_{select_metric}"][-1], budget, clock() - t_val)
    if budget is not None and progress:
        tqdm.write(f"trained {epoch} epochs ({sum(history['train_steps'])} steps) in {budget.used() / 60:.1f} of "
                   f"{budget.seconds / 60:.1f} budget minutes")
    return history

"""Soak: seeded random fault schedules on a small model, with and without the Guard.

Each schedule (one seed) trains the same small regression MLP (SGD with momentum, a noisy teacher, so the
loss has a floor) for ``--steps`` steps and injects, at random steps:

* ``nan_grad`` / ``inf_grad``: one gradient element of a random parameter set to NaN / +Inf after backward;
* ``nan_loss``: the loss is NaN (every gradient with it);
* ``scaled_batch``: the inputs of one batch multiplied by ``10**k``, ``k`` in 2..6;
* ``lr_burst``: every learning rate multiplied by 100 for 5 to 20 steps (divided back afterwards, so
  that cuts the Guard made in between are kept; bursts that overlap merge into one);
* ``nan_weight``: NaN written into one weight element after a step;
* ``dense``: a window of 50 steps with one of the single-step faults above at every step.

Faults fall before the last 50 steps, so that the final loss says whether the run recovered.

The same schedule runs under four configurations: ``gg.Guard(model, opt)`` at its defaults, the Guard with
``gg.clip.ZClip()``, no Guard, and ``torch.nn.utils.clip_grad_norm_(max_norm=1.0)``. Per configuration it
prints:

* ``nonfinite_end``: runs that ended with any non-finite weight (``TrainingDiverged`` included);
* ``silent_nan``: runs that reached their last step without an exception and with non-finite weights;
* ``errors``: exceptions other than ``TrainingDiverged``;
* ``diverged``: runs that ended in ``TrainingDiverged``;
* the ratio of the final held-out loss to the clean run's (the same seed, no faults, plain SGD) over the
  runs without ``TrainingDiverged``: median, p90, max (non-finite: inf).

Targets for the Guard configurations: ``nonfinite_end`` 0, ``silent_nan`` 0, ``errors`` 0, p90 <= 1.5.

**Optimizers** (``--optimizers``): ``SGD`` (momentum 0.9, lr 0.05), ``AdamW`` (lr 1e-3, betas (0.9, 0.95), weight
decay 0.1) and ``AdamW fused`` (the same, ``fused=True``: the Guard's fused path, skip as ``found_inf``). With
AdamW, when ``ai2-olmo-core`` is importable, OLMo-core's ``SkipStepAdamW`` (window 128, sigma 6) runs as a
configuration, fed as its ``TransformerTrainModule`` feeds it: ``latest_loss`` the step's loss,
``latest_grad_norm`` the total norm ``clip_grad_norm_(max_norm=1.0)`` returns, then ``step()``; its absence
is reported, not an error.

**Families** (``--families``; issue 17's long-run points, one each): ``random`` (the schedules above), and

* ``zero_grad``: 1 to 3 steps whose gradients are all zero (a fully masked batch), then x1000 gradient spikes;
* ``warmup_outlier``: 2 to 4 batches within the detector's 25-step warm-up whose labels are corrupted in
  ``BAD_ROWS`` of their 64 rows, each row's loss 100x the batch's mean (the batch's loss x7.2, as one such row in a
  batch of 16), and as many such batches later (steps 150-249); the table's last column counts the steps of each
  the Guard flagged (``grad_spike`` or ``loss_spike``): the warm-up's should be flagged at the later rate at least.
  (Inputs x10, this family's fault before, moved the loss of the tanh MLP by x0.8 to x4.8: no outlier at all);
* ``periodic_nan``: a NaN gradient in every 10th batch over ``max(steps, 1000)`` steps (harmless: the
  learning rate at the end should stay >= 0.5x the schedule's);
* ``scaler_overflow``: a ``GradScaler(growth_interval=5)`` whose overflows (Inf gradients) are routine, one
  step in 7 (harmless, as above);
* ``idle_state``: a parameter gets no gradient for 10 to 30 steps and NaN or Inf is written into its
  optimizer state (momentum buffer, ``exp_avg_sq``) meanwhile;
* ``failing_sink``: random faults with a sink that raises at every third write and a JSONL log deleted mid-run;
* ``disk_snapshot``: ``RecoveryPolicy(snapshot_dir=...)``; the snapshot file is truncated (``corrupt``) or
  replaced by an older one (``stale``), then NaN is written into a weight (a rollback);
* ``add_param_group``: the last layer is frozen and outside the optimizer until a random step, then
  unfrozen with ``add_param_group``, with faults after it (rollbacks across the change);
* ``resume``: the run is checkpointed (model, optimizer, Guard) at a random step, one time in two right after
  a rollback, and resumed in new objects; the resumed run must end bitwise equal to the uninterrupted one.

Family targets (issue 17): 0 runs with non-finite weights or optimizer state at the end; 0 exceptions but
``TrainingDiverged``; LR at the end >= 0.5x the schedule's on the harmless families; resumed runs bitwise
equal; loss ratio p90 <= 1.1 for the defaults and max <= 2 for every Guard configuration.

    python benchmarks/soak.py --schedules 500 [--steps 300] [--workers 2]
    python benchmarks/soak.py --families all --optimizers all --schedules 20    # the families x configurations table
    python benchmarks/soak.py --family lr_burst --optimizer AdamW --configs "Guard (defaults)" \
        "Guard (update size off)" "no Guard"     # the LR bursts alone, with and without gradguard.update_size
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradguard as gg

CONFIGS = ("Guard (defaults)", "Guard + ZClip", "no Guard", "clip_grad_norm_")
#: the Guard's defaults without ``gradguard.update_size`` (which skips an LR burst from its first step): by --configs
NO_UPDATE_SIZE = "Guard (update size off)"
GUARD_CONFIGS = ("Guard (defaults)", "Guard + ZClip")
#: ``gg.clip.ZClip()`` in the loop, no Guard (by --configs): "Guard + ZClip" is measured against both of its parts
ZCLIP_ALONE = "ZClip alone"
OPTIONAL_CONFIGS = (NO_UPDATE_SIZE, ZCLIP_ALONE)
OLMO = "OLMo-core SkipStepAdamW + clip 1.0"
SINGLE_FAULTS = ("nan_grad", "inf_grad", "nan_loss", "scaled_batch", "lr_burst", "nan_weight")
OPTIMIZERS = ("SGD", "AdamW", "AdamW fused")
FAMILIES = ("random", "zero_grad", "warmup_outlier", "periodic_nan", "scaler_overflow", "idle_state",
            "failing_sink", "disk_snapshot", "add_param_group", "resume")
#: families that need the Guard's machinery (sinks, snapshots, state): run under the Guard configurations only
GUARD_ONLY_FAMILIES = ("failing_sink", "disk_snapshot", "add_param_group", "resume")
#: families whose faults are harmless: the learning rate at the end should stay >= 0.5x the schedule's
HARMLESS_FAMILIES = ("periodic_nan", "scaler_overflow")
FAMILY_TARGETS = {"nonfinite_end": 0, "errors": 0, "p90_defaults": 1.1, "max_guard": 2.0, "lr_ratio": 0.5}
ADAMW_LR, ADAMW_BETAS, ADAMW_WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.1

IN_FEATURES, HIDDEN, NOISE = 16, 32, 0.3
BATCH, LEARNING_RATE, MOMENTUM = 64, 0.05, 0.9
DENSE_WINDOW = 50  # steps of a dense window, one fault at each
BAD_ROWS = 4  # warmup_outlier: rows of a batch whose labels are corrupted (each row's loss 100x the batch's mean)
TAIL = 50  # clean steps at the end of every schedule
LATE_OUTLIERS = range(150, 250)  # warmup_outlier: where the later outliers, the warm-up's yardstick, fall
TARGETS = {"nonfinite_end": 0, "silent_nan": 0, "errors": 0, "p90": 1.5}


@dataclass
class Fault:
    step: int
    kind: str
    param: int = 0  # index into the model's parameters (nan_grad, inf_grad, nan_weight)
    element: float = 0.0  # position in [0, 1) within that parameter
    power: int = 0  # scaled_batch: inputs times 10**power
    length: int = 0  # lr_burst: steps


@dataclass
class Schedule:
    seed: int
    steps: int
    faults: list[Fault] = field(default_factory=list)
    family: str = "random"
    optimizer: str = "SGD"

    def describe(self) -> str:
        return ", ".join(f"{f.kind}@{f.step}" for f in self.faults[:8]) + (" ..." if len(self.faults) > 8 else "")


def _fault(rng: random.Random, step: int, kind: str, n_params: int) -> Fault:
    return Fault(step=step, kind=kind, param=rng.randrange(n_params), element=rng.random(),
                 power=rng.randint(2, 6), length=rng.randint(5, 20))


def make_schedule(seed: int, steps: int, n_params: int, kinds: tuple[str, ...] = SINGLE_FAULTS) -> Schedule:
    """1 to 6 single faults at random steps (of ``kinds``), and in one schedule of four a dense window of 50 steps
    (only when ``kinds`` are all the single faults).

    Faults land in ``[2, steps - TAIL)``: the last ``TAIL`` steps are clean, so that the final loss says
    whether the run recovered, not whether a fault fell on its last step."""
    rng = random.Random(seed)
    schedule = Schedule(seed, steps)
    last = steps - TAIL
    for _ in range(rng.randint(1, 6)):
        schedule.faults.append(_fault(rng, rng.randrange(2, last), rng.choice(kinds), n_params))
    if rng.random() < 0.25 and kinds == SINGLE_FAULTS:
        start = rng.randrange(2, last - DENSE_WINDOW + 1)
        for step in range(start, start + DENSE_WINDOW):
            schedule.faults.append(_fault(rng, step, rng.choice(SINGLE_FAULTS), n_params))
    schedule.faults.sort(key=lambda f: f.step)
    return schedule


def make_family_schedule(family: str, seed: int, steps: int, n_params: int) -> Schedule:
    """A schedule of ``family`` (the module docstring), seeded; ``random`` is :func:`make_schedule`."""
    if family == "random":
        return make_schedule(seed, steps, n_params)
    if family == "lr_burst":  # the random schedules' LR bursts alone (--family lr_burst)
        return make_schedule(seed, steps, n_params, ("lr_burst",))
    rng = random.Random(f"{family}:{seed}")
    last = steps - TAIL
    faults: list[Fault] = []
    if family == "zero_grad":
        for _ in range(rng.randint(1, 3)):
            faults.append(Fault(rng.randrange(30, last - 20), "zero_grad"))
        for _ in range(rng.randint(2, 4)):
            faults.append(Fault(rng.randrange(faults[0].step + 1, last), "grad_x1000"))
    elif family == "warmup_outlier":
        early = rng.sample(range(3, 25), rng.randint(2, 4))
        for step in early + rng.sample(range(LATE_OUTLIERS.start, min(LATE_OUTLIERS.stop, last)), len(early)):
            faults.append(Fault(step, "bad_rows"))
    elif family == "periodic_nan":
        steps = max(steps, 1000)
        faults = [_fault(rng, step, "nan_grad", n_params) for step in range(rng.randrange(10), steps - TAIL, 10)]
    elif family == "scaler_overflow":
        faults = [Fault(step, "overflow", param=rng.randrange(n_params), element=rng.random())
                  for step in range(rng.randrange(7), steps - TAIL, 7)]
    elif family == "idle_state":
        for _ in range(rng.randint(1, 2)):
            fault = _fault(rng, rng.randrange(30, last - 30), "idle_state", n_params)
            fault.length, fault.power = rng.randint(10, 30), rng.choice((0, 1))  # power 0: NaN, 1: Inf
            faults.append(fault)
    elif family == "failing_sink":
        faults = make_schedule(seed, steps, n_params).faults
        faults.append(Fault(rng.randrange(10, last), "delete_log"))
    elif family == "disk_snapshot":
        for _ in range(rng.randint(1, 2)):
            step = rng.randrange(60, last - 10)
            kind = rng.choice(("corrupt_snapshot", "stale_snapshot"))
            faults.append(Fault(step, kind, length=rng.randint(25, 50)))
            faults.append(_fault(rng, step + rng.randint(1, 5), "nan_weight", n_params))
    elif family == "add_param_group":
        start = rng.randrange(40, last - 60)
        faults.append(Fault(start, "add_param_group"))
        for _ in range(rng.randint(1, 3)):
            faults.append(_fault(rng, rng.randrange(start + 1, last), rng.choice(SINGLE_FAULTS), n_params))
    elif family == "resume":
        faults = make_schedule(seed, steps, n_params).faults
        weights = [f.step for f in faults if f.kind == "nan_weight"]
        if weights and rng.random() < 0.5:  # right after the rollback the NaN weight calls for
            faults.append(Fault(min(weights[0] + 2, steps - 1), "resume"))
        else:
            faults.append(Fault(rng.randrange(5, steps - 5), "resume"))
    else:
        raise ValueError(f"soak: unknown family {family!r}, expected one of {FAMILIES}")
    faults.sort(key=lambda f: f.step)
    return Schedule(seed, steps, faults, family)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, 1))


def make_data(seed: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batches from a fixed random teacher (the same for every seed: linear plus a small tanh part) plus
    noise of variance ``NOISE**2`` (the floor of the loss), and a held-out set of 1024 samples."""
    teacher_gen = torch.Generator().manual_seed(12345)
    w = torch.randn(IN_FEATURES, 1, generator=teacher_gen) / math.sqrt(IN_FEATURES)
    w_tanh = torch.randn(IN_FEATURES, 4, generator=teacher_gen) / math.sqrt(IN_FEATURES)

    def teacher(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        clean = x @ w + 0.3 * torch.tanh(x @ w_tanh).sum(dim=1, keepdim=True)
        return clean + NOISE * torch.randn(x.shape[0], 1, generator=gen)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, BATCH, IN_FEATURES, generator=gen)
    y = teacher(x.reshape(-1, IN_FEATURES), gen).reshape(steps, BATCH, 1)
    held_gen = torch.Generator().manual_seed(999)
    x_test = torch.randn(1024, IN_FEATURES, generator=held_gen)
    return x, y, x_test, teacher(x_test, held_gen)


@dataclass
class Outcome:
    config: str
    seed: int
    final_loss: float
    weights_finite: bool
    diverged: bool = False
    error: str | None = None
    seconds: float = 0.0
    summary: dict[str, int] | None = None
    lr_ratio: float = 1.0  # the learning rate at the end over the schedule's
    state_finite: bool = True  # every floating tensor of the optimizer state is finite
    resumed_equal: bool | None = None  # resume family: the resumed run ended bitwise equal to the uninterrupted
    # warmup_outlier family, Guard: (warm-up outlier steps flagged, warm-up outliers, later flagged, later outliers)
    outliers_flagged: tuple[int, int, int, int] | None = None
    final_state: dict[str, torch.Tensor] | None = None


def olmo_available() -> str | None:
    """None when OLMo-core's SkipStepAdamW can be imported, else why not (reported, not an error)."""
    try:
        from olmo_core.optim import SkipStepAdamW  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(error).__name__}: {error}"
    return None


def make_optimizer(name: str, config: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config == OLMO:
        from olmo_core.optim import SkipStepAdamW

        return SkipStepAdamW(params, lr=ADAMW_LR, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                             rolling_interval_length=128, sigma_factor=6)
    if name == "SGD":
        return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=MOMENTUM)
    if name in ("AdamW", "AdamW fused"):
        return torch.optim.AdamW(params, lr=ADAMW_LR, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                                 fused=name == "AdamW fused")
    raise ValueError(f"soak: unknown optimizer {name!r}, expected one of {OPTIMIZERS}")


class FlakySink:
    """A sink that raises at every third write (a full disk, a tracker's outage)."""

    def __init__(self) -> None:
        self.calls = 0

    def write(self, records: Any) -> None:
        self.calls += 1
        if self.calls % 3 == 0:
            raise OSError(28, "No space left on device (soak's flaky sink)")

    def close(self) -> None:
        pass


def _optimizer_state_finite(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(torch.isfinite(v).all()) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _poison_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, fault: Fault) -> None:
    """NaN (power 0) or Inf (power 1) into one element of the largest floating state tensor of ``param``."""
    tensors = [v for v in optimizer.state.get(param, {}).values()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1]
    if tensors:
        target = tensors[-1]  # SGD: momentum_buffer; Adam: exp_avg_sq
        with torch.no_grad():
            target.view(-1)[int(fault.element * target.numel())] = math.inf if fault.power else math.nan


def _scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor


def _make_guard(config: str, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule | None,
                workdir: str, scaler: Any) -> gg.Guard | None:
    if config not in (*GUARD_CONFIGS, NO_UPDATE_SIZE):
        return None
    family = schedule.family if schedule else "random"
    sinks: list[Any] = []
    if family == "failing_sink":
        sinks = [FlakySink(), gg.sinks.JSONL(os.path.join(workdir, "run.jsonl"))]
    recovery = gg.RecoveryPolicy(snapshot_dir=os.path.join(workdir, "snapshots")) if family == "disk_snapshot" else None
    clip: Any = gg.clip.ZClip() if config == "Guard + ZClip" else "default"
    detector = gg.detect.Detector(update_size=None) if config == NO_UPDATE_SIZE else None
    return gg.Guard(model, optimizer, clip=clip, sinks=sinks, recovery=recovery, scaler=scaler, detector=detector)


class Run:
    """One run's objects: the model, its optimizer, the Guard (or none), the GradScaler (or none)."""

    def __init__(self, config: str, schedule: Schedule | None, seed: int, optimizer_name: str, workdir: str):
        torch.manual_seed(seed)
        self.model = make_model()
        family = schedule.family if schedule else "random"
        self.late = family == "add_param_group"  # the last layer is frozen, outside the optimizer, until added
        params = list(self.model.parameters())
        if self.late:
            for p in self.model[-1].parameters():
                p.requires_grad_(False)
            params = params[:-2]
        self.optimizer = make_optimizer(optimizer_name, config, params)
        self.scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
                       if family == "scaler_overflow" else None)
        self.guard = _make_guard(config, self.model, self.optimizer, schedule, workdir, self.scaler)
        self.zclip = gg.clip.ZClip() if config == ZCLIP_ALONE else None

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "guard": None if self.guard is None else self.guard.state_dict(),
                "zclip": None if self.zclip is None else self.zclip.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.guard is not None:
            self.guard.load_state_dict(state["guard"])
        if self.zclip is not None:
            self.zclip.load_state_dict(state["zclip"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


def train(config: str, schedule: Schedule | None, seed: int, steps: int, optimizer_name: str = "SGD",
          resume: bool = True) -> Outcome:
    """One run of ``config`` under ``schedule`` (None: the clean run) with ``optimizer_name``; ``resume=False``
    runs a ``resume`` schedule straight through (the reference it must equal)."""
    steps = schedule.steps if schedule else steps
    workdir = tempfile.mkdtemp(prefix="soak-")
    run = Run(config, schedule, seed, optimizer_name, workdir)
    x, y, x_test, y_test = make_data(seed, steps)
    by_step: dict[int, list[Fault]] = {}
    for fault in schedule.faults if schedule else []:
        by_step.setdefault(fault.step, []).append(fault)
    idle: dict[int, int] = {}  # parameter index -> the step its idle window ends
    stale: dict[int, str] = {}  # step -> where a copy of the snapshot folder was kept for a stale_snapshot fault
    for fault in schedule.faults if schedule else []:
        if fault.kind == "stale_snapshot":
            stale[fault.step - fault.length] = ""
    burst_until = -1  # while step < burst_until the learning rates are x100 (bursts that overlap merge)
    base_lr = run.optimizer.param_groups[0]["lr"]
    outcome = Outcome(config, seed, math.nan, True)
    start = time.perf_counter()
    try:
        for step in range(steps):
            faults = by_step.get(step, [])
            params = list(run.model.parameters())
            if step == burst_until:
                _scale_lr(run.optimizer, 1 / 100)
            inputs = x[step]
            for fault in faults:
                if fault.kind == "scaled_batch":
                    inputs = inputs * 10.0**fault.power
                elif fault.kind == "lr_burst":
                    if step >= burst_until:
                        _scale_lr(run.optimizer, 100)
                    burst_until = max(burst_until, step + fault.length)
                elif fault.kind == "add_param_group" and run.late:
                    late = list(run.model[-1].parameters())
                    for p in late:
                        p.requires_grad_(True)
                    run.optimizer.add_param_group({"params": late})
                    run.late = False
                elif fault.kind == "idle_state":
                    idle[fault.param] = step + fault.length
                    _poison_state(run.optimizer, params[fault.param], fault)
                elif fault.kind == "delete_log" and os.path.exists(os.path.join(workdir, "run.jsonl")):
                    os.remove(os.path.join(workdir, "run.jsonl"))
                elif fault.kind in ("corrupt_snapshot", "stale_snapshot"):
                    _damage_snapshots(os.path.join(workdir, "snapshots"), fault, stale)
                elif fault.kind == "resume" and resume:
                    buffer = io.BytesIO()
                    torch.save(run.state_dict(), buffer)
                    if run.guard is not None:
                        run.guard.close()
                    run = Run(config, schedule, seed, optimizer_name, workdir)
                    buffer.seek(0)
                    run.load_state_dict(torch.load(buffer, weights_only=False))
                    params = list(run.model.parameters())
            if step in stale:
                stale[step] = _keep_snapshot_copy(os.path.join(workdir, "snapshots"), step)
            targets = y[step]
            if any(f.kind == "bad_rows" for f in faults):  # residuals of BAD_ROWS rows 10x the batch's RMS
                with torch.no_grad():
                    prediction = run.model(inputs)
                    targets = targets.clone()
                    rms = (prediction - targets).square().mean().sqrt()
                    targets[:BAD_ROWS] = prediction[:BAD_ROWS] + 10.0 * rms
            loss = nn.functional.mse_loss(run.model(inputs), targets)
            if any(f.kind == "nan_loss" for f in faults):
                loss = loss * math.nan
            if run.scaler is not None:
                run.scaler.scale(loss).backward()
            else:
                loss.backward()
            for fault in faults:
                grad = params[fault.param].grad
                if fault.kind in ("nan_grad", "inf_grad", "overflow") and grad is not None:
                    grad.view(-1)[int(fault.element * grad.numel())] = math.nan if fault.kind == "nan_grad" else math.inf
                elif fault.kind in ("zero_grad", "grad_x1000"):
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(0.0 if fault.kind == "zero_grad" else 1000.0)
            for index, until in idle.items():
                if step < until:
                    params[index].grad = None
            _step(run, config, loss)
            run.optimizer.zero_grad(set_to_none=True)
            for fault in faults:
                if fault.kind == "nan_weight":
                    with torch.no_grad():
                        p = params[fault.param]
                        p.view(-1)[int(fault.element * p.numel())] = math.nan
        if run.guard is not None:
            run.guard.close()
    except gg.TrainingDiverged:
        outcome.diverged = True
    except Exception as error:  # noqa: BLE001 - counted and shown: the target is none
        outcome.error = "".join(traceback.format_exception_only(type(error), error)).strip()
    outcome.seconds = time.perf_counter() - start
    params = list(run.model.parameters())
    outcome.weights_finite = all(bool(torch.isfinite(p).all()) for p in params)
    outcome.state_finite = _optimizer_state_finite(run.optimizer)
    outcome.lr_ratio = run.optimizer.param_groups[0]["lr"] / base_lr  # bursts end before the last TAIL steps
    with torch.no_grad():
        outcome.final_loss = float(nn.functional.mse_loss(run.model(x_test), y_test))
    if run.guard is not None:
        outcome.summary = run.guard.summary()
        if schedule is not None and schedule.family == "warmup_outlier":
            spikes = {r["step"] for r in run.guard.history
                      if {"grad_spike", "loss_spike"} & {e["kind"] for e in r["events"]}}
            early = {f.step for f in schedule.faults if f.step < LATE_OUTLIERS.start}
            late = {f.step for f in schedule.faults} - early
            outcome.outliers_flagged = (len(early & spikes), len(early), len(late & spikes), len(late))
    if schedule is not None and schedule.family == "resume":
        outcome.final_state = {k: v.clone() for k, v in run.model.state_dict().items()}
    shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _step(run: Run, config: str, loss: torch.Tensor) -> None:
    """The optimizer step of ``config``: the Guard's, or the loop's own (clip, OLMo-core's feeding, scaler)."""
    if run.guard is not None:
        run.guard.step(loss)
        return
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if config == ZCLIP_ALONE:
        run.zclip(run.model)
    if config in ("clip_grad_norm_", OLMO):
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        if config == OLMO:  # as OLMo-core's TransformerTrainModule: the loss, then the pre-clip norm
            run.optimizer.latest_loss = loss.detach()  # type: ignore[attr-defined]
            run.optimizer.latest_grad_norm = norm  # type: ignore[attr-defined]
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def _keep_snapshot_copy(folder: str, step: int) -> str:
    """A copy of the snapshot folder as it is now (for a later ``stale_snapshot``); '' when there is none."""
    if not os.path.isdir(folder):
        return ""
    copy = f"{folder}-at-{step}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    return copy


def _damage_snapshots(folder: str, fault: Fault, stale: dict[int, str]) -> None:
    """Truncate every snapshot file to half (``corrupt_snapshot``), or put back the copy kept ``length`` steps
    earlier (``stale_snapshot``: a snapshot of the same run, older than the one the Guard holds)."""
    if not os.path.isdir(folder):
        return
    if fault.kind == "corrupt_snapshot":
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
        return
    copy = stale.get(fault.step - fault.length, "")
    if copy and os.path.isdir(copy):
        for name in os.listdir(copy):
            shutil.copy2(os.path.join(copy, name), os.path.join(folder, name))


def run_schedule(task: tuple[Any, ...]) -> tuple[Schedule, Outcome, list[Outcome]]:
    """The clean reference run and every configuration under one schedule: ``(seed, steps, configs)``, or
    ``(seed, steps, configs, family, optimizer)``."""
    seed, steps, configs = task[:3]
    family, optimizer = (task[3], task[4]) if len(task) > 3 else ("random", "SGD")
    torch.set_num_threads(1)
    schedule = make_family_schedule(family, seed, steps, len(list(make_model().parameters())))
    schedule.optimizer = optimizer
    # the clean run: no fault, the same structure (a layer added mid-run stays added at that step)
    structure = Schedule(seed, schedule.steps, [f for f in schedule.faults if f.kind == "add_param_group"], family)
    clean = train("no Guard", structure if structure.faults else None, seed, schedule.steps, optimizer)
    runs = []
    for config in configs:
        run = train(config, schedule, seed, schedule.steps, optimizer)
        if family == "resume" and config in GUARD_CONFIGS:
            straight = train(config, schedule, seed, schedule.steps, optimizer, resume=False)
            assert run.final_state is not None and straight.final_state is not None
            run.resumed_equal = all(torch.equal(run.final_state[k], straight.final_state[k]) for k in run.final_state)
        run.final_state = None
        runs.append(run)
    clean.final_state = None
    return schedule, clean, runs


def configs_for(optimizer: str, family: str, configs: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The configurations a family runs under with ``optimizer``: ``configs`` when given (the Guard's alone on
    the families that need it), else the default ones and OLMo-core's with AdamW when importable."""
    if configs is not None:  # OLMo-core's only with AdamW, when importable (main() reports why it is left out)
        return tuple(c for c in configs if (family not in GUARD_ONLY_FAMILIES or c in GUARD_CONFIGS)
                     and (c != OLMO or (optimizer == "AdamW" and olmo_available() is None)))
    if family in GUARD_ONLY_FAMILIES:
        return GUARD_CONFIGS
    extra = (OLMO,) if optimizer == "AdamW" and olmo_available() is None else ()
    return CONFIGS + extra


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (as numpy.percentile); inf stays inf."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    if ordered[high] == math.inf:
        return math.inf if position > low or ordered[low] == math.inf else ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dense(schedule: Schedule) -> bool:
    """Whether the schedule holds a dense window (a fault at each of ``DENSE_WINDOW`` steps in a row)."""
    steps = sorted({fault.step for fault in schedule.faults})
    run = best = 0
    for previous, step in zip([-2, *steps], steps):
        run = run + 1 if step == previous + 1 else 1
        best = max(best, run)
    return best >= DENSE_WINDOW


def ratio(clean: Outcome, run: Outcome) -> float:
    """Final held-out loss over the clean run's; inf when the loss or the weights are not finite."""
    finite = math.isfinite(run.final_loss) and run.weights_finite
    return run.final_loss / clean.final_loss if finite else math.inf


def table(results: list[tuple[Schedule, Outcome, list[Outcome]]], configs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per configuration: the counts and the loss ratios described in the module docstring."""
    rows: dict[str, dict[str, Any]] = {}
    schedules = [schedule for schedule, _, _ in results]
    for index, config in enumerate(configs):
        outcomes = [(clean, runs[index]) for _, clean, runs in results]
        ratios = [ratio(clean, run) for clean, run in outcomes if not run.diverged]
        rows[config] = {
            "runs": len(outcomes),
            "nonfinite_end": sum(not run.weights_finite for _, run in outcomes),
            "silent_nan": sum(not run.weights_finite and not run.diverged and run.error is None
                              for _, run in outcomes),
            "errors": sum(run.error is not None for _, run in outcomes),
            "diverged": sum(run.diverged for _, run in outcomes),
            "diverged_dense": sum(run.diverged for schedule, (_, run) in zip(schedules, outcomes) if dense(schedule)),
            "median": statistics.median(ratios) if ratios else math.nan,
            "p90": percentile(ratios, 90),
            "max": max(ratios) if ratios else math.nan,
            "seconds": sum(run.seconds for _, run in outcomes),
        }
    return rows


def soak(schedules: int, steps: int = 300, workers: int = 2, first_seed: int = 0,
         configs: tuple[str, ...] = CONFIGS, family: str = "random",
         optimizer: str = "SGD") -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Run ``schedules`` schedules (seeds ``first_seed ...``) of ``family`` (``random`` or ``lr_burst``) under
    ``configs`` with ``optimizer``; returns the table and the raw results ``(schedule, clean outcome, outcomes
    per config)``."""
    tasks = [(first_seed + i, steps, configs, family, optimizer) for i in range(schedules)]
    if workers <= 1:
        results = [run_schedule(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_schedule, tasks, chunksize=max(1, schedules // (8 * workers)))
    return table(results, configs), results


def family_row(outcomes: list[tuple[Outcome, Outcome]]) -> dict[str, Any]:
    """One cell group of the families table: counts, loss ratios, the least LR ratio, resumes equal."""
    ratios = [ratio(clean, run) for clean, run in outcomes if not run.diverged]
    resumed = [run.resumed_equal for _, run in outcomes if run.resumed_equal is not None]
    flagged = [run.outliers_flagged for _, run in outcomes if run.outliers_flagged is not None]
    return {
        "runs": len(outcomes),
        "nonfinite_end": sum(not (run.weights_finite and run.state_finite) for _, run in outcomes),
        "errors": sum(run.error is not None for _, run in outcomes),
        "diverged": sum(run.diverged for _, run in outcomes),
        "median": statistics.median(ratios) if ratios else math.nan,
        "p90": percentile(ratios, 90),
        "max": max(ratios) if ratios else math.nan,
        "lr_min": min((run.lr_ratio for _, run in outcomes if not run.diverged), default=math.nan),
        "resumed_equal": f"{sum(resumed)}/{len(resumed)}" if resumed else "",
        "outliers_flagged": (f"{sum(f[0] for f in flagged)}/{sum(f[1] for f in flagged)} warm-up, "
                             f"{sum(f[2] for f in flagged)}/{sum(f[3] for f in flagged)} later") if flagged else "",
        "outliers_rates": (sum(f[0] for f in flagged) / max(1, sum(f[1] for f in flagged)),
                           sum(f[2] for f in flagged) / max(1, sum(f[3] for f in flagged))) if flagged else None,
        "error_sample": next((run.error for _, run in outcomes if run.error), None),
    }


def soak_families(families: tuple[str, ...], optimizers: tuple[str, ...], schedules: int, steps: int = 300,
                  workers: int = 2, first_seed: int = 10_000, configs: tuple[str, ...] | None = None
                  ) -> tuple[dict[tuple[str, str, str], dict[str, Any]], list[Any]]:
    """Every family under every optimizer: ``{(optimizer, family, config): row}`` and the raw results. Seeds
    from 10000: not the ones the random schedules of the suite and the README's soak used. ``configs``: those
    (see :func:`configs_for`), else the defaults."""
    tasks = [(first_seed + i, steps, configs_for(optimizer, family, configs), family, optimizer)
             for optimizer in optimizers for family in families for i in range(schedules)]
    if workers <= 1:
        results = [run_schedule(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_schedule, tasks, chunksize=1)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for task, (_, clean, runs) in zip(tasks, results):
        for config, run in zip(task[2], runs):
            rows.setdefault((task[4], task[3], config), {"outcomes": []})["outcomes"].append((clean, run))
    for key, row in rows.items():
        rows[key] = family_row(row["outcomes"])
    return rows, results


def per_kind(results: list[Any]) -> dict[tuple[str, str, str], float]:
    """Random family: the median loss ratio per (optimizer, fault kind, configuration), over the schedules that
    hold that kind (``dense``: a dense window), counting a diverged or non-finite run as inf."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    for schedule, clean, runs in results:
        if schedule.family != "random":
            continue
        kinds = {f.kind for f in schedule.faults} | ({"dense"} if dense(schedule) else set())
        for run in runs:
            for kind in kinds:
                value = math.inf if run.diverged else ratio(clean, run)
                cells.setdefault((schedule.optimizer, kind, run.config), []).append(value)
    return {key: statistics.median(values) for key, values in cells.items()}


def print_families(rows: dict[tuple[str, str, str], dict[str, Any]], results: list[Any], command: str,
                   elapsed: float, workers: int) -> None:
    missing = olmo_available()
    print(f"soak families: {command}  ({elapsed:.0f} s, {workers} workers)")
    print("OLMo-core SkipStepAdamW: " + ("a configuration with AdamW" if missing is None
                                         else f"not installed ({missing}); its row is absent"))
    print()
    print("| optimizer | family | configuration | runs | non-finite end | errors | diverged | loss/clean median "
          "| p90 | max | LR end / schedule (min) | resumed bitwise equal | outliers flagged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (optimizer, family, config), row in rows.items():
        print(f"| {optimizer} | {family} | {config} | {row['runs']} | {row['nonfinite_end']} | {row['errors']} | "
              f"{row['diverged']} | {row['median']:.3f} | {row['p90']:.3f} | {row['max']:.3g} | "
              f"{row['lr_min']:.3g} | {row['resumed_equal']} | {row['outliers_flagged']} |")
    errors = {key: row["error_sample"] for key, row in rows.items() if row["error_sample"]}
    for key, error in errors.items():
        print(f"  error in {' / '.join(key)}: {error[:300]}")
    kinds = per_kind(results)
    if kinds:
        print()
        print("random family, median loss/clean per fault kind (schedules holding that kind; diverged: inf)")
        configs = sorted({key[2] for key in kinds}, key=lambda c: (CONFIGS + (OLMO,) + OPTIONAL_CONFIGS).index(c))
        print("| optimizer | fault kind | " + " | ".join(configs) + " |")
        print("|---|---|" + "---|" * len(configs))
        for optimizer in sorted({key[0] for key in kinds}, key=OPTIMIZERS.index):
            for kind in (*SINGLE_FAULTS, "dense"):
                cells = [kinds.get((optimizer, kind, config)) for config in configs]
                print(f"| {optimizer} | {kind} | " + " | ".join("" if c is None else f"{c:.3g}" for c in cells) + " |")
    print()
    print(f"family targets: non-finite end {FAMILY_TARGETS['nonfinite_end']}, errors {FAMILY_TARGETS['errors']}, "
          f"p90 <= {FAMILY_TARGETS['p90_defaults']} (defaults), max <= {FAMILY_TARGETS['max_guard']} (Guard), "
          f"LR end >= {FAMILY_TARGETS['lr_ratio']}x on {', '.join(HARMLESS_FAMILIES)}, resumed runs bitwise equal")
    print("misses:")
    for (optimizer, family, config), row in rows.items():
        if config not in GUARD_CONFIGS:
            continue
        misses = []
        if row["nonfinite_end"] > FAMILY_TARGETS["nonfinite_end"]:
            misses.append(f"non-finite {row['nonfinite_end']}")
        if row["errors"] > FAMILY_TARGETS["errors"]:
            misses.append(f"errors {row['errors']}")
        if config == "Guard (defaults)" and row["p90"] > FAMILY_TARGETS["p90_defaults"]:
            misses.append(f"p90 {row['p90']:.3g}")
        if row["max"] > FAMILY_TARGETS["max_guard"]:
            misses.append(f"max {row['max']:.3g}")
        if family in HARMLESS_FAMILIES and row["lr_min"] < FAMILY_TARGETS["lr_ratio"]:
            misses.append(f"LR {row['lr_min']:.3g}")
        if row["resumed_equal"] and row["resumed_equal"].split("/")[0] != row["resumed_equal"].split("/")[1]:
            misses.append(f"resumed equal {row['resumed_equal']}")
        if row["outliers_rates"] and row["outliers_rates"][0] < row["outliers_rates"][1]:
            misses.append(f"outliers flagged {row['outliers_flagged']}: fewer in the warm-up")
        if misses:
            print(f"  {optimizer} / {family} / {config}: " + ", ".join(misses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=None,
                        help="the first seed (default: 0; with --families, 10000)")
    parser.add_argument("--worst", type=int, default=3, help="print the worst schedules of the Guard configs")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated families, or 'all' ({', '.join(FAMILIES)}): the families table")
    parser.add_argument("--family", choices=("random", "lr_burst"), default="random",
                        help="without --families: the random schedules, or their LR bursts alone")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="SGD", help="without --families")
    parser.add_argument("--configs", nargs="+", choices=(*CONFIGS, *OPTIONAL_CONFIGS, OLMO), default=None,
                        help=f"the configurations (default: {', '.join(CONFIGS)}; with --families and AdamW, "
                             "OLMo-core's too when importable; named with another optimizer or "
                             "absent, it is reported and left out)")
    parser.add_argument("--optimizers", default="SGD",
                        help=f"comma-separated optimizers for --families, or 'all' ({', '.join(OPTIMIZERS)})")
    args = parser.parse_args()
    if args.families is not None:
        families = FAMILIES if args.families == "all" else tuple(args.families.split(","))
        optimizers = OPTIMIZERS if args.optimizers == "all" else tuple(args.optimizers.split(","))
        for name, known in ((families, FAMILIES), (optimizers, OPTIMIZERS)):
            unknown = [n for n in name if n not in known]
            if unknown:
                parser.error(f"unknown {unknown}, expected some of {known}")
        start = time.perf_counter()
        configs = None if args.configs is None else tuple(args.configs)
        first_seed = 10_000 if args.first_seed is None else args.first_seed
        rows, results = soak_families(families, optimizers, args.schedules, args.steps, args.workers, first_seed,
                                      configs=configs)
        command = (f"python benchmarks/soak.py --families {args.families} --optimizers {args.optimizers} "
                   f"--schedules {args.schedules} --first-seed {first_seed} --steps {args.steps} "
                   f"--workers {args.workers}"
                   + ("" if configs is None else " --configs " + " ".join(f'"{c}"' for c in configs)))
        print_families(rows, results, command, time.perf_counter() - start, args.workers)
        return
    if args.schedules < 1 or args.steps < DENSE_WINDOW + TAIL + 3:
        parser.error(f"--schedules must be >= 1 and --steps >= {DENSE_WINDOW + TAIL + 3} "
                     f"(a dense window of {DENSE_WINDOW} steps and {TAIL} clean steps at the end)")
    start = time.perf_counter()
    configs = CONFIGS if args.configs is None else tuple(args.configs)
    if OLMO in configs:  # the peer's absence is reported, not an error
        missing = olmo_available() if args.optimizer == "AdamW" else f"it is an AdamW, not {args.optimizer}"
        if missing is not None:
            print(f"{OLMO}: left out ({missing})")
            configs = tuple(c for c in configs if c != OLMO)
    first_seed = 0 if args.first_seed is None else args.first_seed
    rows, results = soak(args.schedules, args.steps, args.workers, first_seed, configs, args.family, args.optimizer)
    elapsed = time.perf_counter() - start
    print(f"soak: {args.schedules} schedules ({args.family}, {args.optimizer}) x {len(configs)} configurations, "
          f"{args.steps} steps each, {args.workers} workers, {elapsed:.0f} s")
    header = (f"{'configuration':<18} {'non-finite end':>14} {'silent NaN':>10} {'errors':>6} {'diverged':>8} "
              f"{'loss/clean median':>17} {'p90':>7} {'max':>9}")
    print(header)
    print("-" * len(header))
    for config, row in rows.items():
        print(f"{config:<18} {row['nonfinite_end']:>14} {row['silent_nan']:>10} {row['errors']:>6} "
              f"{row['diverged']:>8} {row['median']:>17.3f} {row['p90']:>7.3f} {row['max']:>9.3g}")
    n_dense = sum(dense(schedule) for schedule, _, _ in results)
    print(f"diverged: TrainingDiverged; of the {n_dense} schedules with a dense window, diverged: "
          + ", ".join(f"{config} {row['diverged_dense']}" for config, row in rows.items()))
    print(f"targets for the Guard: non-finite end {TARGETS['nonfinite_end']}, silent NaN {TARGETS['silent_nan']}, "
          f"errors {TARGETS['errors']}, p90 <= {TARGETS['p90']}")
    for index, config in enumerate(configs):
        if config not in (*GUARD_CONFIGS, NO_UPDATE_SIZE) or args.worst <= 0:
            continue
        counted = [r for r in results if not r[2][index].diverged]
        worst = sorted(counted, key=lambda r: ratio(r[1], r[2][index]), reverse=True)[: args.worst]
        for schedule, clean, runs in worst:
            run = runs[index]
            status = "error: " + run.error if run.error else "finished"
            print(f"  {config}: seed {schedule.seed}: loss {run.final_loss:.4g} (clean {clean.final_loss:.4g}), "
                  f"{status}, {run.summary}; faults: {schedule.describe()}")

if __name__ == "__main__":
    main()

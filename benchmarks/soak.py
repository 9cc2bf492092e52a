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

    python benchmarks/soak.py --schedules 500 [--steps 300] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradguard as gg

CONFIGS = ("Guard (defaults)", "Guard + ZClip", "no Guard", "clip_grad_norm_")
GUARD_CONFIGS = ("Guard (defaults)", "Guard + ZClip")
SINGLE_FAULTS = ("nan_grad", "inf_grad", "nan_loss", "scaled_batch", "lr_burst", "nan_weight")

IN_FEATURES, HIDDEN, NOISE = 16, 32, 0.3
BATCH, LEARNING_RATE, MOMENTUM = 64, 0.05, 0.9
DENSE_WINDOW = 50  # steps of a dense window, one fault at each
TAIL = 50  # clean steps at the end of every schedule
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

    def describe(self) -> str:
        return ", ".join(f"{f.kind}@{f.step}" for f in self.faults[:8]) + (" ..." if len(self.faults) > 8 else "")


def _fault(rng: random.Random, step: int, kind: str, n_params: int) -> Fault:
    return Fault(step=step, kind=kind, param=rng.randrange(n_params), element=rng.random(),
                 power=rng.randint(2, 6), length=rng.randint(5, 20))


def make_schedule(seed: int, steps: int, n_params: int) -> Schedule:
    """1 to 6 single faults at random steps, and in one schedule of four a dense window of 50 steps.

    Faults land in ``[2, steps - TAIL)``: the last ``TAIL`` steps are clean, so that the final loss says
    whether the run recovered, not whether a fault fell on its last step."""
    rng = random.Random(seed)
    schedule = Schedule(seed, steps)
    last = steps - TAIL
    for _ in range(rng.randint(1, 6)):
        schedule.faults.append(_fault(rng, rng.randrange(2, last), rng.choice(SINGLE_FAULTS), n_params))
    if rng.random() < 0.25:
        start = rng.randrange(2, last - DENSE_WINDOW + 1)
        for step in range(start, start + DENSE_WINDOW):
            schedule.faults.append(_fault(rng, step, rng.choice(SINGLE_FAULTS), n_params))
    schedule.faults.sort(key=lambda f: f.step)
    return schedule


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


def _scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor


def train(config: str, schedule: Schedule | None, seed: int, steps: int) -> Outcome:
    """One run of ``config`` under ``schedule`` (None: the clean run)."""
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    guard = None
    if config == "Guard (defaults)":
        guard = gg.Guard(model, optimizer)
    elif config == "Guard + ZClip":
        guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip())
    x, y, x_test, y_test = make_data(seed, steps)
    params = list(model.parameters())
    by_step: dict[int, list[Fault]] = {}
    for fault in schedule.faults if schedule else []:
        by_step.setdefault(fault.step, []).append(fault)
    burst_until = -1  # while step < burst_until the learning rates are x100 (bursts that overlap merge)
    outcome = Outcome(config, seed, math.nan, True)
    start = time.perf_counter()
    try:
        for step in range(steps):
            faults = by_step.get(step, [])
            if step == burst_until:
                _scale_lr(optimizer, 1 / 100)
            inputs = x[step]
            for fault in faults:
                if fault.kind == "scaled_batch":
                    inputs = inputs * 10.0**fault.power
                elif fault.kind == "lr_burst":
                    if step >= burst_until:
                        _scale_lr(optimizer, 100)
                    burst_until = max(burst_until, step + fault.length)
            loss = nn.functional.mse_loss(model(inputs), y[step])
            if any(f.kind == "nan_loss" for f in faults):
                loss = loss * math.nan
            loss.backward()
            for fault in faults:
                if fault.kind in ("nan_grad", "inf_grad"):
                    grad = params[fault.param].grad
                    assert grad is not None
                    grad.view(-1)[int(fault.element * grad.numel())] = math.nan if fault.kind == "nan_grad" else math.inf
            if guard is not None:
                guard.step(loss)
            else:
                if config == "clip_grad_norm_":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for fault in faults:
                if fault.kind == "nan_weight":
                    with torch.no_grad():
                        p = params[fault.param]
                        p.view(-1)[int(fault.element * p.numel())] = math.nan
        if guard is not None:
            guard.close()
    except gg.TrainingDiverged:
        outcome.diverged = True
    except Exception as error:  # noqa: BLE001 - counted and shown: the target is none
        outcome.error = "".join(traceback.format_exception_only(type(error), error)).strip()
    outcome.seconds = time.perf_counter() - start
    outcome.weights_finite = all(bool(torch.isfinite(p).all()) for p in params)
    with torch.no_grad():
        outcome.final_loss = float(nn.functional.mse_loss(model(x_test), y_test))
    if guard is not None:
        outcome.summary = guard.summary()
    return outcome


def run_schedule(task: tuple[int, int, tuple[str, ...]]) -> tuple[Schedule, Outcome, list[Outcome]]:
    """The clean reference run and every configuration under one schedule."""
    seed, steps, configs = task
    torch.set_num_threads(1)
    schedule = make_schedule(seed, steps, len(list(make_model().parameters())))
    clean = train("no Guard", None, seed, steps)
    return schedule, clean, [train(config, schedule, seed, steps) for config in configs]


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
         configs: tuple[str, ...] = CONFIGS) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Run ``schedules`` schedules (seeds ``first_seed ...``) under ``configs``; returns the table and the
    raw results ``(schedule, clean outcome, outcomes per config)``."""
    tasks = [(first_seed + i, steps, configs) for i in range(schedules)]
    if workers <= 1:
        results = [run_schedule(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_schedule, tasks, chunksize=max(1, schedules // (8 * workers)))
    return table(results, configs), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--worst", type=int, default=3, help="print the worst schedules of the Guard configs")
    args = parser.parse_args()
    if args.schedules < 1 or args.steps < DENSE_WINDOW + TAIL + 3:
        parser.error(f"--schedules must be >= 1 and --steps >= {DENSE_WINDOW + TAIL + 3} "
                     f"(a dense window of {DENSE_WINDOW} steps and {TAIL} clean steps at the end)")
    start = time.perf_counter()
    rows, results = soak(args.schedules, args.steps, args.workers, args.first_seed)
    elapsed = time.perf_counter() - start
    print(f"soak: {args.schedules} schedules x {len(CONFIGS)} configurations, {args.steps} steps each, "
          f"{args.workers} workers, {elapsed:.0f} s")
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
    for index, config in enumerate(CONFIGS):
        if config not in GUARD_CONFIGS or args.worst <= 0:
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

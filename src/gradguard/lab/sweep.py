"""``gradguard sweep``: how sensitive the user's own model is to the learning rate, and what each remedy buys.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv
2309.14322) train at learning rates spanning orders of magnitude and summarise each setting by its *LR
sensitivity* ``E_lr[min(L(lr), L0) - min_lr L(lr)]`` (``gradguard.lab.lr_sweep``): the mean over the
sweep of how much worse the final loss is than the best one, each loss capped at L0, the loss at
initialisation, so that a diverged run counts as no progress at all. The sweep runs the user's factory
(``gradguard.lab.sweep_factory``: ``build(lr) -> (model, optimizer, data, loss_fn)``) at ``points``
log-spaced learning rates x remedies x seeds, and reports per remedy the LR sensitivity, the largest LR
that trains, and the final loss against the LR.

Each run is one lab run (``gradguard.lab.sweep_run.train_one``), cached by its configuration (which
includes a hash of the factory's file) in ``OUT/cache``: an interrupted sweep resumes, a rerun executes
nothing. The runs execute on an executor (``gradguard.lab.executors``): local processes by default, Ray
tasks with ``RayExecutor``.

Python::

    from gradguard.lab import run_sweep
    result = run_sweep("examples/sweep_factory.py:build", lr_min=1e-3, lr_max=1.0, points=8, seeds=2)
    for row in result.rows: print(row.remedy, row.sensitivity, row.largest_lr)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradguard.lab.executors import Executor, LocalExecutor
from gradguard.lab.export import write_csv, write_json
from gradguard.lab.runner import default_workers, run_grid
from gradguard.lab.scenarios import Record, RunConfig
from gradguard.lab.sweep_factory import check_factory, factory_digest, factory_options, load_sweep_factory
from gradguard.lab.sweep_run import train_one

__all__ = ["DEFAULT_REMEDIES", "REMEDIES", "SweepRemedy", "SweepResult", "lr_range", "run_sweep", "sweep_configs"]


@dataclass(frozen=True)
class SweepRemedy:
    """One remedy of the sweep.

    Attributes:
        label: its name in tables and plots.
        clip: what runs between ``backward()`` and the update, a lab remedy spec
            (``gradguard.lab.remedies.make_remedy``: ``{"name": "none"}``, a clip strategy, the Guard).
        factory_options: keyword arguments passed to the factory (remedies that need the model's code); the
            remedy is not applicable to a factory whose signature does not name them.
        warmup_fraction: a linear LR warm-up over this fraction of the steps, around the factory's schedule.
    """

    label: str
    clip: dict[str, Any]
    factory_options: dict[str, Any] = field(default_factory=dict)
    warmup_fraction: float = 0.0


#: z-loss coefficient (Wortsman et al. 2023, from PaLM: 1e-4 log^2 Z)
Z_LOSS = 1e-4
#: the warm-up remedy's length, as a fraction of the steps
WARMUP_FRACTION = 0.25

REMEDIES: dict[str, SweepRemedy] = {
    "none": SweepRemedy("no remedy", {"name": "none"}),
    "global_norm": SweepRemedy("GlobalNorm(1)", {"name": "global_norm", "max_norm": 1.0}),
    "zclip": SweepRemedy("ZClip", {"name": "zclip"}),
    "agc": SweepRemedy("AGC", {"name": "agc"}),
    "guard": SweepRemedy("Guard (defaults)", {"name": "guard"}),
    "warmup": SweepRemedy(f"warm-up ({WARMUP_FRACTION:.0%} of steps)", {"name": "none"},
                          warmup_fraction=WARMUP_FRACTION),
    "qk_norm": SweepRemedy("qk-layernorm", {"name": "none"}, {"qk_norm": True}),
    "z_loss": SweepRemedy(f"z-loss {Z_LOSS:g}", {"name": "none"}, {"z_loss": Z_LOSS}),
}
DEFAULT_REMEDIES = ("none", "global_norm", "guard", "qk_norm")


def lr_range(lr_min: float, lr_max: float, points: int) -> list[float]:
    """``points`` learning rates spaced evenly in log from ``lr_min`` to ``lr_max`` (3 significant digits)."""
    if not (isinstance(points, int) and points >= 2):
        raise ValueError(f"sweep: points must be an int >= 2, got {points!r}")
    if not (0 < lr_min < lr_max and math.isfinite(lr_max)):
        raise ValueError(f"sweep: need 0 < lr_min < lr_max, got lr_min={lr_min!r}, lr_max={lr_max!r}")
    ratio = math.log(lr_max / lr_min)
    return [float(f"{lr_min * math.exp(ratio * i / (points - 1)):.3g}") for i in range(points)]


def sweep_configs(
    target: str, lrs: Sequence[float], remedies: Sequence[str], seeds: int, steps: int, accepted: frozenset[str],
    digest: str,
) -> tuple[list[RunConfig], dict[str, str]]:
    """The run configs (remedy x seed x lr), and the remedies not applicable to the factory with the reason."""
    configs, not_applicable = [], {}
    for key in remedies:
        remedy = REMEDIES[key]
        missing = [name for name in remedy.factory_options if name not in accepted]
        if missing:
            not_applicable[remedy.label] = f"the factory does not take {', '.join(f'{m}=' for m in missing)}"
            continue
        for seed in range(seeds):
            for lr in lrs:
                configs.append({
                    "scenario": "sweep",
                    "variant": f"{remedy.label} / lr {lr:g}",
                    "remedy_key": key,
                    "remedy_label": remedy.label,
                    "seed": seed,
                    "lr": lr,
                    "steps": steps,
                    "factory": target,
                    "factory_digest": digest,
                    "clip": remedy.clip,
                    "options": remedy.factory_options,
                    "warmup": max(1, round(remedy.warmup_fraction * steps)) if remedy.warmup_fraction else 0,
                })
    return configs, not_applicable


@dataclass
class SweepResult:
    """What :func:`run_sweep` ran and wrote. ``rows``: one per remedy that ran (``gradguard.lab.sweep_report``)."""

    records: list[Record]
    rows: list[Any]
    not_applicable: dict[str, str]
    executed: int
    seconds: float
    report: Path
    table: Path
    results_json: Path
    results_csv: Path


def _absolute(target: str) -> str:
    """A file target with its path made absolute, so that a worker in another folder finds it."""
    location, _, attribute = target.rpartition(":")
    if location.endswith(".py") or "/" in location or "\\" in location:
        return f"{Path(location).resolve()}:{attribute}"
    return target


def run_sweep(
    target: str,
    lr_min: float = 1e-3,
    lr_max: float = 1.0,
    points: int = 8,
    remedies: Sequence[str] = DEFAULT_REMEDIES,
    seeds: int = 2,
    steps: int = 300,
    out: Path | str = Path("gradguard-sweep"),
    executor: Executor | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Sweep ``target``'s factory over learning rates x remedies x seeds; write ``out/report.html``,
    ``out/table.md``, ``out/results.json`` and ``out/results.csv``.

    Args:
        target: ``path/file.py:build`` or ``package.module:build`` (``gradguard.lab.sweep_factory``).
        lr_min, lr_max, points: the learning rates, ``points`` of them log-spaced (:func:`lr_range`).
        remedies: keys of :data:`REMEDIES`; the baseline is ``"none"``.
        seeds: seeds per (remedy, lr), 0 to ``seeds - 1``.
        steps: training steps per run.
        out: output folder; finished runs are cached in ``out/cache`` and not run again.
        executor: where the runs execute; default ``LocalExecutor(workers)`` (``workers``: CPU cores).
        progress: show a progress bar.

    Raises ``ValueError`` (a ``FactoryError`` for the factory) naming the bad argument before any run starts.
    """
    from gradguard.lab.run import run_with_progress
    from gradguard.lab.sweep_report import render_sweep_report, sweep_rows, write_table

    lrs = lr_range(lr_min, lr_max, points)
    unknown = [key for key in remedies if key not in REMEDIES]
    if unknown or not remedies:
        raise ValueError(f"sweep: remedies must be among {', '.join(REMEDIES)}, got {list(remedies)!r}")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"sweep: seeds must be an int >= 1, got {seeds!r}")
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"sweep: steps must be an int >= 2, got {steps!r}")
    target = _absolute(target)
    factory = load_sweep_factory(target)
    accepted = factory_options(factory)
    check_factory(factory, target, lrs[0], {})
    configs, not_applicable = sweep_configs(target, lrs, list(dict.fromkeys(remedies)), seeds, steps, accepted,
                                            factory_digest(target))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    executor = executor if executor is not None else LocalExecutor(workers or min(2, default_workers()))
    if progress:
        result = run_with_progress(configs, out, executor, label="sweep", task=train_one)
    else:
        result = run_grid(configs, out, executor=executor, task=train_one)
    rows = sweep_rows(result.records)
    return SweepResult(
        records=result.records,
        rows=rows,
        not_applicable=not_applicable,
        executed=result.executed,
        seconds=result.seconds,
        report=render_sweep_report(result.records, rows, not_applicable, out / "report.html", target,
                                   seconds=result.seconds, where=executor.describe()),
        table=write_table(rows, not_applicable, out / "table.md"),
        results_json=write_json(result.records, out / "results.json"),
        results_csv=write_csv(result.records, out / "results.csv"),
    )

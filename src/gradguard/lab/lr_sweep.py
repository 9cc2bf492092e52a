"""Figures of a learning-rate sweep: LR sensitivity per remedy, and how well an early warning did.

* **LR sensitivity** (Wortsman et al. 2023, section 2.3): ``E_lr[min(L(lr), L_0) - min_lr L(lr)]``, the mean
  over the sweep's learning rates of how much worse the final loss is than the best one, each loss capped
  at ``L_0``, the loss at initialisation (a diverged run, NaN included, counts as ``L_0``). Computed per
  seed from the final validation loss, then averaged over seeds.
* **Early warning**: a run *diverged* as the lab defines it (``metrics.divergence_step``). A diverging run
  is *warned in time* when the first warning came at least ``lead`` steps before the divergence step; a
  non-diverging run with any warning is a *false alarm*. The lead time is divergence step - first warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradguard.lab.scenarios import Record

#: the lead time, in steps, that counts as a warning in time
LEAD_STEPS = 50


@dataclass
class Sensitivity:
    """One remedy over the sweep (``*_by_lr``: median over seeds per learning rate, in sweep order)."""

    remedy: str
    lrs: list[float]
    sensitivity: float  # mean over seeds
    sensitivity_low: float  # smallest and largest over seeds
    sensitivity_high: float
    best_lr: float  # the learning rate of the lowest median capped loss
    best_loss: float
    seeds: int
    runs: int
    diverged: int
    capped_loss_by_lr: list[float]
    max_attn_logit_by_lr: list[float | None]
    min_attn_entropy_by_lr: list[float | None]
    log_z_drift_by_lr: list[float | None]


def capped_loss(record: Record) -> float:
    """``min(final validation loss, initial loss)``; the initial loss when the final one is NaN/Inf."""
    initial = record.get("initial_loss")
    final = record.get("val_loss")
    if initial is None:
        raise ValueError(f"capped_loss: run {record['config'].get('variant')!r} has no initial loss")
    if final is None or not math.isfinite(final):
        return float(initial)
    return float(min(final, initial))


def _median(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def _median_by_lr(at: dict[float, list[Record]], key: str) -> list[float | None]:
    return [_median([record.get(key) for record in group]) for group in at.values()]


def lr_sensitivity(records: list[Record], remedy_of: Callable[[Record], str]) -> list[Sensitivity]:
    """One :class:`Sensitivity` per remedy (``remedy_of(record)`` names it), in first-seen order.

    The sweep of a remedy is the set of learning rates its runs used; a seed counts when it has a run at
    every one of them."""
    by_remedy: dict[str, list[Record]] = {}
    for record in records:
        if "error" not in record:
            by_remedy.setdefault(remedy_of(record), []).append(record)
    rows = []
    for remedy, group in by_remedy.items():
        lrs = sorted({record["config"]["lr"] for record in group})
        seeds = sorted({record["config"]["seed"] for record in group})
        cell = {(r["config"]["seed"], r["config"]["lr"]): r for r in group}
        per_seed = []
        for seed in seeds:
            if not all((seed, lr) in cell for lr in lrs):
                continue
            losses = [capped_loss(cell[seed, lr]) for lr in lrs]
            per_seed.append(float(np.mean(np.asarray(losses) - min(losses))))
        if not per_seed:
            continue
        at: dict[float, list[Record]] = {lr: [r for r in group if r["config"]["lr"] == lr] for lr in lrs}
        capped = [float(np.median([capped_loss(r) for r in at[lr]])) for lr in lrs]
        best = int(np.argmin(capped))
        rows.append(Sensitivity(
            remedy=remedy, lrs=lrs, sensitivity=float(np.mean(per_seed)), sensitivity_low=min(per_seed),
            sensitivity_high=max(per_seed), best_lr=lrs[best], best_loss=capped[best], seeds=len(per_seed),
            runs=len(group), diverged=sum(bool(r.get("diverged")) for r in group), capped_loss_by_lr=capped,
            max_attn_logit_by_lr=_median_by_lr(at, "max_attn_logit"),
            min_attn_entropy_by_lr=_median_by_lr(at, "min_attn_entropy"), log_z_drift_by_lr=_median_by_lr(at, "log_z_drift"),
        ))
    return rows


@dataclass
class EarlyWarning:
    """How the first warning of each run compares with its divergence."""

    lead: int  # steps ahead that count as in time
    diverged: int
    warned_in_time: int
    warned_late: int  # warned, but fewer than ``lead`` steps ahead (or after the divergence)
    too_early: int  # diverged runs that diverged before step ``lead``: no warning could be in time
    not_diverged: int
    false_alarms: int
    lead_times: list[int]  # divergence step - first warning, for the diverged runs warned before diverging

    @property
    def recall(self) -> float | None:
        return self.warned_in_time / self.diverged if self.diverged else None

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.not_diverged if self.not_diverged else None

    def lead_quantiles(self) -> dict[str, float] | None:
        """Smallest, 10th percentile, median and largest lead time; None without any."""
        if not self.lead_times:
            return None
        values = np.asarray(self.lead_times, dtype=np.float64)
        return {"min": float(values.min()), "p10": float(np.percentile(values, 10)),
                "median": float(np.median(values)), "max": float(values.max())}


def early_warning(records: list[Record], lead: int = LEAD_STEPS, setting: str | None = None) -> EarlyWarning:
    """Compare each finished run's ``warning_step`` (None: never warned) with its ``divergence_step``;
    ``setting`` names another detector of the run's ``warning_steps`` instead."""
    finished = [r for r in records if "error" not in r]
    if setting is not None:
        finished = [{**r, "warning_step": (r.get("warning_steps") or {}).get(setting)} for r in finished]
    diverged = [r for r in finished if r.get("diverged")]
    calm = [r for r in finished if not r.get("diverged")]
    in_time = late = too_early = 0
    leads = []
    for record in diverged:
        step, warning = record["divergence_step"], record.get("warning_step")
        too_early += step < lead
        if warning is not None and warning < step:
            leads.append(step - warning)
        if warning is not None and step - warning >= lead:
            in_time += 1
        elif warning is not None:
            late += 1
    false_alarms = sum(r.get("warning_step") is not None for r in calm)
    return EarlyWarning(lead, len(diverged), in_time, late, too_early, len(calm), false_alarms, leads)

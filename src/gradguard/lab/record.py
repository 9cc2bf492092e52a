"""The record of one lab run: its config, its metrics and its (downsampled) curves, as plain JSON values.

A record is what the runner caches, what ``results.json`` lists and what the report plots.
"""

from __future__ import annotations

import math
from typing import Any

from gradguard.lab.metrics import run_metrics
from gradguard.lab.training import TrainLog, downsample

CURVE_POINTS = 200


def json_float(value: float | None) -> float | None:
    """NaN and Inf are not JSON: they are stored as None (and read back as missing)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def make_record(config: dict[str, Any], log: TrainLog, target: float | None = None, **extra: Any) -> dict[str, Any]:
    """Metrics of ``log`` (see ``metrics.py``), its curves downsampled to at most :data:`CURVE_POINTS`
    points (mean loss and max gradient norm per bucket), and ``extra`` scenario-specific values."""
    metrics = run_metrics(log.losses, log.grad_norms, target=target)
    if log.stopped_at is not None:  # non-finite weights, or the Guard gave up: the run diverged there
        metrics["diverged"] = True
        metrics["recovered"] = False
        step = metrics["divergence_step"]
        metrics["divergence_step"] = log.stopped_at if step is None else min(step, log.stopped_at)
    loss_steps, loss_values = downsample(log.losses, CURVE_POINTS, "mean")
    norm_steps, norm_values = downsample(log.grad_norms, CURVE_POINTS, "max")
    record: dict[str, Any] = {
        "config": config,
        **{key: json_float(value) if isinstance(value, float) else value for key, value in metrics.items()},
        "initial_loss": json_float(log.losses[0]) if log.losses else None,
        "steps_run": len(log.losses),
        "params_finite": log.params_finite,
        "stopped_at": log.stopped_at,
        "stop_reason": log.stop_reason,
        "train_seconds": round(log.seconds, 3),
        "curves": {
            "loss": {"step": loss_steps, "value": [json_float(v) for v in loss_values]},
            "grad_norm": {"step": norm_steps, "value": [json_float(v) for v in norm_values]},
        },
    }
    for key, value in extra.items():
        record[key] = json_float(value) if isinstance(value, float) else value
    return record

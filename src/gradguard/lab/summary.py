"""Aggregate a scenario's run records per variant (over seeds): the rows of the report's tables.

Medians over seeds for per-run quantities (robust to one odd seed), counts for events (diverged,
solved), the largest value for the largest gradient norm, and a Wilson interval for success rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradguard.lab.metrics import wilson_interval
from gradguard.lab.scenarios import Record


def by_variant(records: list[Record]) -> dict[str, list[Record]]:
    """Records grouped by ``config["variant"]``, variants in first-seen order (the grid's order)."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record["config"]["variant"], []).append(record)
    return groups


def _values(records: list[Record], key: str) -> list[float]:
    values = [record.get(key) for record in records]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def median_of(records: list[Record], key: str) -> float | None:
    values = _values(records, key)
    return float(np.median(values)) if values else None


def mean_of(records: list[Record], key: str) -> float | None:
    values = _values(records, key)
    return float(np.mean(values)) if values else None


def max_of(records: list[Record], key: str) -> float | None:
    values = _values(records, key)
    return max(values) if values else None


def count_of(records: list[Record], predicate: Callable[[Record], bool]) -> int:
    return sum(1 for record in records if predicate(record))


def summarize_variant(variant: str, records: list[Record]) -> dict[str, Any]:
    """One table row: the variant's runs aggregated over seeds (runs that raised are only counted)."""
    finished = [record for record in records if "error" not in record]
    row: dict[str, Any] = {
        "variant": variant,
        "runs": len(finished),
        "errors": len(records) - len(finished),
        "error": next((record["error"] for record in records if "error" in record), None),
        "diverged": count_of(finished, lambda r: bool(r.get("diverged"))),
        "recovered": count_of(finished, lambda r: bool(r.get("recovered"))),
        "params_finite": count_of(finished, lambda r: bool(r.get("params_finite"))),
        "final_loss": median_of(finished, "final_loss"),
        "oscillation_index": median_of(finished, "oscillation_index"),
        "max_grad_norm": max_of(finished, "max_grad_norm"),
        "median_grad_norm": median_of(finished, "median_grad_norm"),
        "steps_to_target": median_of(finished, "steps_to_target"),
        "reached_target": count_of(finished, lambda r: r.get("steps_to_target") is not None),
        "wall_seconds": mean_of(finished, "wall_seconds"),
    }
    for key in ("test_accuracy", "train_accuracy", "generalization_gap", "test_loss", "val_loss", "test_score",
                "final_weight_norm", "initial_weight_norm", "clip_threshold", "forensics_precision",
                "forensics_recall", "forensics_analysed", "forensics_reproducible", "watch_precision", "watch_recall",
                "watch_flagged", "watch_corrupted_seen", "detector_flagged_steps"):
        row[key] = mean_of(finished, key)
    for key in ("max_attn_logit", "min_attn_entropy", "final_attn_entropy", "uniform_attn_entropy", "log_z_final",
                "log_z_drift"):  # the transformers scenario
        if any(key in record for record in finished):
            row[key] = median_of(finished, key)
    if any("warning_step" in record for record in finished):
        row["warned"] = count_of(finished, lambda r: r.get("warning_step") is not None)
    growths = [g for r in finished if isinstance(g := (r.get("layer_flow") or {}).get("total_growth"), (int, float))
               and math.isfinite(g)]
    row["init_growth"] = float(np.median(growths)) if growths else None
    verdicts = sorted({str(v) for r in finished if (v := (r.get("layer_flow") or {}).get("verdict")) is not None})
    row["init_verdict"] = "/".join(verdicts) if verdicts else None
    if any("solved" in record for record in finished):
        solved = count_of(finished, lambda r: bool(r.get("solved")))
        row["solved"] = solved
        row["solved_interval"] = wilson_interval(solved, len(finished)) if finished else (0.0, 1.0)
    summaries = [record.get("remedy_summary") or {} for record in finished]
    for key in ("skipped", "clipped", "rollbacks", "lr_backoffs"):
        if any(key in summary for summary in summaries):
            row[key] = int(np.median([summary.get(key, 0) for summary in summaries]))
    return row


def summarize(records: list[Record]) -> list[dict[str, Any]]:
    """One row per variant, in grid order."""
    return [summarize_variant(variant, group) for variant, group in by_variant(records).items()]

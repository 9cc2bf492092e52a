"""Metrics of one training run, computed from its recorded curves (plain lists of floats).

Definitions (the report prints them; W = ``WINDOW`` = 10 steps, F = ``DIVERGENCE_FACTOR`` = 10):

* **diverged**: the loss became non-finite (NaN/Inf), or the running median of the loss over W steps
  rose above F times the initial loss. The median ignores a single bad batch; a run whose loss stays
  up counts.
* **recovered**: diverged at some step, yet ended with finite weights and a final loss at most F times
  the initial loss (e.g. the Guard rolled back and lowered the learning rate).
* **final loss**: mean of the last W losses; NaN when the run diverged to a non-finite loss.
* **steps to target**: the first step at which the running mean of the loss over W steps is at or
  below the target; None when never reached.
* **oscillation index**: the up-and-down movement of the log-loss beyond what its net change needs,
  per step: (sum_t |log L_t - log L_(t-1)| - |log L_T - log L_0|) / (T - 1), over the finite prefix of
  the curve. 0 for a monotone curve; a curve that jumps by a factor k and back every step scores
  log k. Mini-batch noise alone gives a small positive value, so compare runs on the same task.
* **largest / median gradient norm**: over the finite total gradient norms, measured before clipping.
* **success rate interval**: Wilson score interval (Wilson 1927), which stays inside [0, 1] for the
  few seeds a lab can afford (unlike the normal approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DIVERGENCE_FACTOR = 10.0
WINDOW = 10


def _finite_prefix(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    return array if bad.size == 0 else array[: bad[0]]


def _running(array: np.ndarray, window: int, reduce) -> np.ndarray:
    """``reduce`` over each full window of ``window`` consecutive values (fewer values: one window)."""
    if array.size == 0:
        return array
    window = min(window, array.size)
    windows = np.lib.stride_tricks.sliding_window_view(array, window)
    return reduce(windows, axis=1)


def divergence_step(losses: Sequence[float], factor: float = DIVERGENCE_FACTOR, window: int = WINDOW) -> int | None:
    """The first step at which the loss is non-finite or the running median over the last ``window``
    steps exceeds ``factor`` x the first loss; None when the run did not diverge."""
    if len(losses) == 0:
        raise ValueError("divergence_step: losses is empty")
    array = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    first_bad = int(bad[0]) if bad.size else None
    prefix = _finite_prefix(array)
    medians = _running(prefix, window, np.median)
    high = np.flatnonzero(medians > factor * array[0]) if prefix.size else np.array([], dtype=int)
    first_high = int(high[0]) + min(window, prefix.size) - 1 if high.size else None  # the window's last step
    steps = [step for step in (first_bad, first_high) if step is not None]
    return min(steps) if steps else None


def diverged(losses: Sequence[float], factor: float = DIVERGENCE_FACTOR, window: int = WINDOW) -> bool:
    """True when a loss is non-finite, or the running median over ``window`` steps exceeds ``factor`` x
    the first loss."""
    return divergence_step(losses, factor, window) is not None


def final_loss(losses: Sequence[float], window: int = WINDOW) -> float:
    """Mean of the last ``window`` losses; NaN if any of them is not finite."""
    if len(losses) == 0:
        raise ValueError("final_loss: losses is empty")
    return float(np.mean(np.asarray(losses[-window:], dtype=np.float64)))


def steps_to_target(losses: Sequence[float], target: float, window: int = WINDOW) -> int | None:
    """The first step (0-based index of the window's last loss) at which the running mean of the loss over
    ``window`` steps is <= ``target``; None when it never is (a non-finite loss ends the search)."""
    array = _finite_prefix(losses)
    means = _running(array, window, np.mean)
    hits = np.flatnonzero(means <= target)
    if hits.size == 0:
        return None
    return int(hits[0] + min(window, array.size) - 1)


def oscillation_index(losses: Sequence[float]) -> float:
    """``(total variation of log L - |net change of log L|) / (T - 1)`` over the finite, positive prefix.

    0 for a monotone curve; NaN with fewer than 2 usable points.
    """
    array = _finite_prefix(losses)
    nonpositive = np.flatnonzero(array <= 0)
    if nonpositive.size:
        array = array[: nonpositive[0]]
    if array.size < 2:
        return math.nan
    log_loss = np.log(array)
    total_variation = float(np.sum(np.abs(np.diff(log_loss))))
    net_change = abs(float(log_loss[-1] - log_loss[0]))
    return (total_variation - net_change) / (array.size - 1)


def grad_norm_summary(grad_norms: Sequence[float]) -> tuple[float, float]:
    """(largest, median) of the finite gradient norms; (NaN, NaN) when there is none."""
    array = np.asarray(grad_norms, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return math.nan, math.nan
    return float(array.max()), float(np.median(array))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927), 95% by default.

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``.
    """
    if trials < 1:
        raise ValueError(f"wilson_interval: trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def run_metrics(
    losses: Sequence[float],
    grad_norms: Sequence[float],
    target: float | None = None,
) -> dict[str, float | int | bool | None]:
    """The per-run metrics that every scenario reports, from the loss and gradient-norm curves."""
    largest, median = grad_norm_summary(grad_norms)
    step = divergence_step(losses)
    last = final_loss(losses)
    return {
        "diverged": step is not None,
        "divergence_step": step,
        "recovered": step is not None and math.isfinite(last) and last <= DIVERGENCE_FACTOR * losses[0],
        "final_loss": last,
        "steps_to_target": None if target is None else steps_to_target(losses, target),
        "oscillation_index": oscillation_index(losses),
        "max_grad_norm": largest,
        "median_grad_norm": median,
    }

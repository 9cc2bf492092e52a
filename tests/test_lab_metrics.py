"""The lab's metrics on hand-made curves."""

from __future__ import annotations

import math

import pytest

from gradguard.lab.metrics import (
    diverged,
    divergence_step,
    final_loss,
    grad_norm_summary,
    oscillation_index,
    run_metrics,
    steps_to_target,
    wilson_interval,
)


def test_divergence_needs_a_sustained_rise_or_a_non_finite_loss() -> None:
    decreasing = [2.0 / (1 + t) for t in range(50)]
    assert not diverged(decreasing) and divergence_step(decreasing) is None
    one_spike = [1.0] * 20 + [1e6] + [1.0] * 20  # a single bad batch is not divergence
    assert not diverged(one_spike)
    rising = [1.0] * 10 + [50.0] * 30
    assert diverged(rising)
    assert divergence_step(rising) == 14, "the end of the first window whose median is above 10x the initial loss"
    nan = [1.0, 0.9, math.nan, math.nan]
    assert diverged(nan) and divergence_step(nan) == 2
    assert divergence_step([1.0, 0.5, math.inf]) == 2


def test_final_loss_and_steps_to_target() -> None:
    curve = [1.0] * 10 + [0.1] * 20
    assert final_loss(curve) == pytest.approx(0.1)
    assert steps_to_target(curve, 0.2, window=5) == 14
    assert steps_to_target(curve, 0.01) is None
    assert steps_to_target([1.0, 0.1, math.nan, 0.0], 0.05, window=1) is None, "a NaN ends the search"
    assert math.isnan(final_loss([1.0, math.nan]))


def test_oscillation_index() -> None:
    assert oscillation_index([4.0, 3.0, 2.0, 1.0]) == pytest.approx(0.0)
    assert oscillation_index([1.0, math.e, 1.0, math.e, 1.0]) == pytest.approx(1.0)
    # up-down by a factor k every step scores log k, whatever the trend
    assert oscillation_index([1.0, 10.0, 1.0, 10.0, 1.0, 10.0, 1.0]) == pytest.approx(math.log(10))
    assert oscillation_index([1.0, 2.0, 1.0, math.nan, 5.0]) == pytest.approx(math.log(2))
    assert math.isnan(oscillation_index([1.0]))


def test_grad_norm_summary_ignores_non_finite() -> None:
    assert grad_norm_summary([1.0, 3.0, math.nan, 2.0, math.inf]) == (3.0, 2.0)
    assert all(math.isnan(v) for v in grad_norm_summary([math.nan]))


def test_wilson_interval() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.4899, abs=1e-4)
    assert wilson_interval(4, 4)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_run_metrics_bundle() -> None:
    metrics = run_metrics([2.0, 1.0, 0.5] * 4, [1.0, 2.0, 5.0], target=1.5)
    assert metrics["diverged"] is False and metrics["max_grad_norm"] == 5.0 and metrics["median_grad_norm"] == 2.0
    assert metrics["steps_to_target"] == 9

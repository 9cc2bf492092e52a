"""The early warning on two of ``benchmarks/early_warning.py``'s families, at the library's defaults: a healthy MLP
(SGD with momentum, constant LR) raises nothing, and an LSTM under Adam with its LR raised slowly (which no signal
warned before the weight acceleration) is warned at least 20 steps (and 10% of the way) before it diverges
(``python benchmarks/early_warning.py`` is the full table)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

import gradguard as gg


@pytest.fixture(scope="module")
def early_warning():
    yield from load_benchmark("early_warning")


def test_a_healthy_family_raises_nothing_and_a_late_diverging_one_is_warned_in_time(early_warning):
    healthy, diverging = early_warning.families(quick=True)
    assert healthy.healthy and not diverging.healthy
    calm, _ = early_warning.run(healthy, 2)
    assert calm.diverged is None
    for signal in early_warning.GRIDS:  # each signal at the library's default
        assert early_warning.first_warning(calm, signal, early_warning.GRIDS[signal][0]) is None, signal
    ramp, _ = early_warning.run(diverging, 2)
    assert ramp.diverged is not None and ramp.diverged > 200
    options = early_warning.GRIDS["weight acceleration"][0]
    assert options == {"acceleration": gg.precursor.Precursor().acceleration}  # the library's default
    warned = early_warning.first_warning(ramp, "weight acceleration", options)
    lead = early_warning.in_time(ramp, warned)
    assert lead is not None and lead >= 20, (warned, ramp.diverged)

"""The soak benchmark's small version: seeded random fault schedules under the Guard's configurations meet
the targets (``benchmarks/soak.py``; ``python benchmarks/soak.py --schedules 500`` is the full one)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # the dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["soak"]


def test_schedules_are_seeded_and_hold_every_kind_of_fault(soak) -> None:
    schedules = [soak.make_schedule(seed, 300, 6) for seed in range(20)]
    assert [f.__dict__ for f in schedules[3].faults] == [f.__dict__ for f in soak.make_schedule(3, 300, 6).faults]
    kinds = {fault.kind for schedule in schedules for fault in schedule.faults}
    assert kinds == set(soak.SINGLE_FAULTS)
    dense = [s for s in schedules if len(s.faults) >= soak.DENSE_WINDOW]
    assert dense, "no dense window in 20 schedules"
    assert all(f.step < 300 - soak.TAIL for s in schedules for f in s.faults)


def test_the_guard_configurations_meet_the_soak_targets(soak) -> None:
    rows, results = soak.soak(20, steps=300, workers=1, configs=soak.GUARD_CONFIGS)
    for config, row in rows.items():
        assert row["nonfinite_end"] == soak.TARGETS["nonfinite_end"], (config, row)
        assert row["silent_nan"] == soak.TARGETS["silent_nan"], (config, row)
        assert row["errors"] == soak.TARGETS["errors"], (config, row)
        assert row["p90"] <= soak.TARGETS["p90"], (config, row)


def test_without_the_guard_the_faults_leave_nan_weights(soak) -> None:
    """The soak can fail: unprotected runs of the same schedules end with non-finite weights, silently."""
    rows, _ = soak.soak(4, steps=120, workers=1, configs=("no Guard", "clip_grad_norm_"))
    assert rows["no Guard"]["silent_nan"] >= 3
    assert rows["clip_grad_norm_"]["silent_nan"] >= 3

"""The soak's recovery families, small (``benchmarks/soak.py --families disk_snapshot,periodic_nan,scaler_overflow``):
damaged snapshot files and harmless skips over a long run meet issue 17's targets under the Guard."""

from __future__ import annotations

import pytest


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_damaged_snapshot_files_and_harmless_skips_meet_their_targets(soak) -> None:
    """Regression: with its snapshot file truncated, a run ended in TrainingDiverged with NaN weights (disk_snapshot,
    seed 10000: no file left to trust); harmless skips (a NaN batch every 10th step over 1000 steps, routine
    GradScaler overflows) end finite at >= 0.5x the starting LR."""
    families = ("disk_snapshot", "periodic_nan", "scaler_overflow")
    rows, _ = soak.soak_families(families, ("SGD",), 1, steps=150 + soak.TAIL, workers=1)
    targets = soak.FAMILY_TARGETS
    for (_, family, config), row in rows.items():
        if config not in soak.GUARD_CONFIGS:
            continue
        assert row["nonfinite_end"] == targets["nonfinite_end"] and row["errors"] == targets["errors"], (family, config, row)
        assert row["diverged"] == 0 and row["max"] <= targets["max_guard"], (family, config, row)
        if family in soak.HARMLESS_FAMILIES:
            assert row["lr_min"] >= targets["lr_ratio"], (family, config, row)

"""The transformers scenario: LR sensitivity and early-warning figures, a tiny run, and the findings."""

from __future__ import annotations

import pytest

from gradguard.lab.findings import transformers_findings
from gradguard.lab.lr_sweep import capped_loss, early_warning, lr_sensitivity
from gradguard.lab.scenarios import build_grid, execute
from gradguard.lab.scenarios.transformers import LRS, QUICK_LRS, REMEDIES


def record(remedy: str, lr: float, seed: int, val: float | None, **extra) -> dict:
    return {"config": {"variant": f"{remedy} / lr {lr:g}", "lr": lr, "seed": seed}, "initial_loss": 4.0,
            "val_loss": val, "diverged": False, "divergence_step": None, **extra}


def test_lr_sensitivity_caps_at_the_initial_loss_and_averages_over_seeds() -> None:
    records = [record("a", 0.1, 0, 2.0), record("a", 1.0, 0, None), record("a", 0.1, 1, 3.0), record("a", 1.0, 1, 2.5),
               record("b", 0.1, 0, 2.0), record("b", 1.0, 0, 2.2)]
    assert capped_loss(records[1]) == 4.0 and capped_loss(record("a", 1, 0, 9.0)) == 4.0
    rows = {row.remedy: row for row in lr_sensitivity(records, lambda r: r["config"]["variant"].split(" / ")[0])}
    # a, seed 0: losses (2, 4) -> mean excess (0 + 2) / 2 = 1; seed 1: (3, 2.5) -> 0.25
    assert rows["a"].sensitivity == pytest.approx(0.625)
    assert (rows["a"].sensitivity_low, rows["a"].sensitivity_high) == (0.25, 1.0)
    assert rows["b"].sensitivity == pytest.approx(0.1) and rows["b"].best_lr == 0.1
    assert rows["a"].capped_loss_by_lr == [2.5, 3.25]


def test_early_warning_counts() -> None:
    runs = [
        record("a", 1, 0, 3, diverged=True, divergence_step=120, warning_step=60),  # in time (60 ahead)
        record("a", 1, 1, 3, diverged=True, divergence_step=120, warning_step=100),  # late
        record("a", 1, 2, 3, diverged=True, divergence_step=30, warning_step=None),  # too early to warn
        record("a", 1, 3, 3, diverged=False, warning_step=50),  # false alarm
        record("a", 1, 4, 3, diverged=False, warning_step=None),
    ]
    warning = early_warning(runs)
    assert (warning.diverged, warning.warned_in_time, warning.warned_late, warning.too_early) == (3, 1, 1, 1)
    assert (warning.not_diverged, warning.false_alarms) == (2, 1)
    assert warning.recall == pytest.approx(1 / 3) and warning.false_alarm_rate == 0.5
    assert warning.lead_times == [60, 20] and warning.lead_quantiles()["median"] == 40
    for run in runs:  # another detector of the same runs: warned at step 10 everywhere
        run["warning_steps"] = {"eager": 10}
    eager = early_warning(runs, setting="eager")
    assert (eager.warned_in_time, eager.false_alarms) == (2, 2)


def test_grid_spans_the_paper_range_with_every_remedy() -> None:
    full, quick = build_grid(["transformers"]), build_grid(["transformers"], quick=True)
    assert max(LRS) / min(LRS) >= 10**1.5 and max(QUICK_LRS) / min(QUICK_LRS) >= 10**1.5
    assert {c["remedy_key"] for c in full} == {c["remedy_key"] for c in quick} == set(REMEDIES)
    assert len(quick) == len(QUICK_LRS) * len(REMEDIES)


def test_a_tiny_run_records_the_instability_signals() -> None:
    configs = build_grid(["transformers"], quick=True, seeds=1, steps=12)
    config = next(c for c in configs if c["remedy_key"] == "both" and c["lr"] == max(QUICK_LRS))
    result = execute(config)
    assert result["steps_run"] == 12 and result["config"]["qk_norm"] and result["config"]["z_loss"] == 1e-4
    assert result["curves"]["max_attn_logit"]["step"] == [0, 10]
    assert result["max_attn_logit"] > 0 and 0 <= result["min_attn_entropy"] <= result["uniform_attn_entropy"]
    assert result["log_z_drift"] >= 0 and "warning_step" in result
    # at lr 1 the weights grow several-fold in the first 10 steps: the defaults warn at the first comparison
    assert result["warning_step"] == 10 and result["warning_steps"]["grad norm alone: ratio 4, alpha 0.9"] is None


def test_findings_say_whether_each_claim_held() -> None:
    def run(remedy, lr, seed, val, logit, drift):
        return record(remedy, lr, seed, val, max_attn_logit=logit, min_attn_entropy=0.5, log_z_drift=drift)

    records = []
    for seed in (0, 1):
        records += [run("no remedy", 0.01, seed, 2.0, 5.0, 1.0), run("no remedy", 1.0, seed, 3.5, 1e4, 50.0),
                    run("qk-layernorm", 0.01, seed, 2.0, 4.0, 1.0), run("qk-layernorm", 1.0, seed, 2.2, 30.0, 40.0),
                    run("z-loss", 0.01, seed, 2.0, 5.0, 1.0), run("z-loss", 1.0, seed, 3.5, 1e4, 45.0)]
    lines = transformers_findings([], records)
    text = " ".join(lines)
    assert "logits grow with the lr, qk-layernorm prevents it) held" in text
    assert "the z-loss prevents it) did not hold" in text  # 45 is not half of 50
    assert "lowers the LR sensitivity held" in text

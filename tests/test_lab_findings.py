"""The report's aggregation and its "what it shows" sentences follow the numbers, whichever way they go."""

from __future__ import annotations

from gradguard.lab.findings import findings_for, spearman
from gradguard.lab.summary import summarize


def recurrence_record(variant: str, seed: int, solved: bool) -> dict:
    return {
        "config": {"scenario": "recurrence", "variant": variant, "seed": seed, "task": "temporal_order",
                   "model": "tanh RNN"},
        "solved": solved, "diverged": False, "params_finite": True, "final_loss": 0.1,
        "steps_to_target": 50 if solved else None, "max_grad_norm": 10.0, "median_grad_norm": 1.0,
        "wall_seconds": 1.0,
    }


def test_summary_counts_and_wilson_interval() -> None:
    records = [recurrence_record("no remedy", seed, solved=seed == 0) for seed in range(4)]
    [row] = summarize(records)
    assert row["runs"] == 4 and row["solved"] == 1 and row["reached_target"] == 1
    low, high = row["solved_interval"]
    assert 0.0 < low < 0.25 < high < 0.81


def test_recurrence_findings_follow_the_numbers() -> None:
    clipped_wins = [recurrence_record("no remedy", s, False) for s in range(8)]
    clipped_wins += [recurrence_record("GlobalNorm", s, True) for s in range(8)]
    lines = findings_for("recurrence", summarize(clipped_wins), clipped_wins)
    assert any("interval lies entirely above it: GlobalNorm" in line for line in lines)

    no_difference = [recurrence_record("no remedy", s, s < 2) for s in range(4)]
    no_difference += [recurrence_record("GlobalNorm", s, s < 3) for s in range(4)]
    lines = findings_for("recurrence", summarize(no_difference), no_difference)
    assert any("No remedy's interval lies entirely above it" in line for line in lines)


def language_model_record(variant: str, seed: int, test_loss: float, clipped: int | None) -> dict:
    return {
        "config": {"scenario": "recurrence", "variant": variant, "seed": seed, "task": "language_model",
                   "model": "lstm", "steps": 300},
        "test_loss": test_loss, "diverged": False, "params_finite": True, "final_loss": test_loss,
        "max_grad_norm": 1.0, "median_grad_norm": 0.3, "wall_seconds": 1.0,
        "remedy_summary": {} if clipped is None else {"clipped": clipped},
    }


def test_language_model_findings_check_the_one_percent_claim_both_ways() -> None:
    def lines_for(guarded_losses: list[float]) -> list[str]:
        records = [language_model_record("LSTM LM / no remedy", s, 2.0, None) for s in range(2)]
        records += [language_model_record("LSTM LM / Guard (defaults)", s, loss, 3 * s)
                    for s, loss in enumerate(guarded_losses)]
        return findings_for("recurrence", summarize(records), records)

    harmless = lines_for([2.0, 2.01])
    assert any("2.0000 -> 2.0000, 2.0000 -> 2.0100 (change +0.00%, +0.50%; clipped steps 0, 3 of 300)" in line
               and "holds on these seeds" in line for line in harmless), harmless
    assert not any("Solved means" in line for line in harmless)
    harmful = lines_for([2.0, 2.06])
    assert any("+3.00%" in line and "does not hold" in line for line in harmful), harmful


def test_regularization_findings_report_a_contradiction() -> None:
    records = []
    for seed, (variant, max_norm, gap) in enumerate([("none", 1.0, 0.2), ("none", 1.1, 0.21), ("L2", 5.0, 0.05),
                                                      ("L2", 6.0, 0.04)]):
        records.append({
            "config": {"scenario": "regularization", "variant": variant, "seed": seed},
            "diverged": False, "params_finite": True, "final_loss": 0.1, "max_grad_norm": max_norm,
            "median_grad_norm": max_norm / 2, "generalization_gap": gap, "train_accuracy": 1.0,
            "test_accuracy": 1.0 - gap, "final_weight_norm": 3.0, "wall_seconds": 1.0,
        })
    lines = findings_for("regularization", summarize(records), records)
    assert "do not support" in lines[-1] and "gap is -0.8 " in lines[-1]


def test_failed_runs_are_named_in_the_findings() -> None:
    records = [{"config": {"scenario": "faults", "variant": "clean / Guard", "seed": 0}, "error": "ImportError: x"}]
    lines = findings_for("faults", summarize(records), records)
    assert lines == ["clean / Guard: 1 run(s) failed: ImportError: x"]


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2], [1, 2]) is None

"""``gradguard lab`` end to end on a tiny grid: report, results files, summary, cache, bad input."""

from __future__ import annotations

import csv
import json
import re
from html import escape

from typer.testing import CliRunner

from gradguard.cli import app
from gradguard.lab.runner import run_one
from gradguard.lab.scenarios import all_scenarios


def test_lab_cli_on_a_tiny_grid(tmp_path) -> None:
    """Every scenario, 1 seed, 3 steps, in 2 worker processes; then one scenario again, from the cache."""
    out = tmp_path / "out"
    tiny = ["--quick", "--seeds", "1", "--steps", "3", "--workers", "2", "--out", str(out)]
    result = CliRunner().invoke(app, ["lab", *tiny])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and "gradguard lab summary" in result.output
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert f"{len(runs)} runs ({len(runs)} executed, 0 cached)" in result.output
    assert {run["config"]["scenario"] for run in runs} == set(all_scenarios())
    assert not [run["error"] for run in runs if "error" in run]

    html = (out / "report.html").read_text()
    for scenario in all_scenarios().values():
        assert escape(scenario.title) in html and escape(scenario.claim) in html
    assert html.count("data:image/png;base64,") >= 10
    assert not re.search(r'src="(?!data:)', html), "self-contained: every image is embedded"
    assert "What it shows" in html and "oscillation index" in html
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(runs) and {"scenario", "variant", "seed", "diverged", "final_loss"} <= set(rows[0])

    # a worker process gives the same run as this process (deterministic per seed)
    config = next(run["config"] for run in runs if run["config"]["scenario"] == "recurrence")
    assert run_one(config)["curves"] == next(run for run in runs if run["config"] == config)["curves"]

    again = CliRunner().invoke(app, ["lab", "faults", *tiny])
    assert again.exit_code == 0, again.output
    assert "13 runs (0 executed, 13 cached)" in again.output
    assert "Depth:" not in (out / "report.html").read_text(), "the report covers the scenarios asked for"


def test_lab_cli_rejects_an_unknown_scenario(tmp_path) -> None:
    result = CliRunner().invoke(app, ["lab", "width", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "valid scenarios: depth, recurrence" in result.output

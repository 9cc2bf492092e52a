"""`gradguard report RUN.jsonl`: the page of a monitored run, read back and rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gradguard.cli import app
from gradguard.report.run import event_rows, layer_norm_matrix, read_jsonl, render_run_report, summarize


def synthetic_run(steps: int = 60) -> list[dict]:
    """A run with a clipped spike at 20, a NaN step (skipped) at 30, an Inf layer at 40, a rollback at 45."""
    records = []
    for s in range(steps):
        norm = math.exp(s / 40) * (30.0 if s == 20 else 1.0)
        record = {
            "step": s,
            "loss": 2.0 * math.exp(-s / 30),
            "total_norm": math.nan if s == 30 else norm,
            "coef": 0.1 if s == 20 else 1.0,
            "clip_threshold": 3.0,
            "skipped": s == 30,
            "clipped": s == 20,
            "lr": 1e-3,
            "events": [],
        }
        if s == 20:
            record["events"].append(
                {"step": s, "kind": "grad_spike", "layer": "fc2", "action": "clip", "z": 9.5}
            )
        if s == 30:
            record["events"].append({"step": s, "kind": "nonfinite_grad", "layer": "fc1", "action": "skip"})
        if s == 45:
            record["events"].append(
                {"step": s, "kind": "rollback", "layer": None, "to_step": 40, "lr_after": 5e-4}
            )
        if s % 10 == 0:
            record["layer_norms"] = {
                "fc1": math.nan if s == 30 else 0.5 * norm,
                "fc2": math.inf if s == 40 else 0.8 * norm,
                "head": 0.01,
            }
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_round_trip_keeps_nan_and_inf(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "run.jsonl", synthetic_run())
    records = read_jsonl(path)
    assert len(records) == 60
    assert math.isnan(records[30]["total_norm"])
    assert records[40]["layer_norms"]["fc2"] == math.inf


def test_bad_log_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl(path)
    path.write_text('{"loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a record with a 'step'"):
        read_jsonl(path)


def test_heatmap_matrix_keeps_nonfinite_cells() -> None:
    names, steps, matrix = layer_norm_matrix(synthetic_run())
    assert names == ["fc1", "fc2", "head"]
    assert steps == [0, 10, 20, 30, 40, 50]
    assert np.isnan(matrix[0, 3])  # fc1 at step 30
    assert np.isposinf(matrix[1, 4])  # fc2 at step 40
    assert np.isfinite(np.delete(matrix, [3, 4], axis=1)).all()


def test_summary_and_event_table() -> None:
    records = synthetic_run()
    summary = summarize(records)
    assert (summary.steps, summary.skipped, summary.clipped, summary.rollbacks) == (60, 1, 1, 1)
    assert summary.nonfinite_norms == 1
    assert summary.max_norm == pytest.approx(30.0 * math.exp(0.5))
    rows = event_rows(records)
    assert [r["kind"] for r in rows] == ["grad_spike", "nonfinite_grad", "rollback"]
    assert rows[0]["details"] == "z=9.5"


def test_page_is_self_contained_with_three_plots() -> None:
    page = render_run_report(synthetic_run())
    assert len(re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,', page)) == 3
    assert "http://" not in page and "https://" not in page
    assert "nonfinite_grad" in page
    with pytest.raises(ValueError, match="no records"):
        render_run_report([])


def test_cli_writes_the_report_and_rejects_bad_input(tmp_path: Path) -> None:
    run = write_jsonl(tmp_path / "run.jsonl", synthetic_run())
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 steps, 1 skipped, 1 clipped, 1 rollbacks" in result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2
    assert "nope.jsonl" in missing.output


def test_a_killed_jobs_log_renders_with_a_warning(tmp_path: Path) -> None:
    """Issue 9.14: the last line cut short by a killed job is skipped with a warning; ``"events": null`` is
    no events."""
    records = synthetic_run(10)
    records[3]["events"] = None
    text = "".join(json.dumps(r) + "\n" for r in records)
    run = tmp_path / "killed.jsonl"
    run.write_text(text + json.dumps(synthetic_run(11)[10])[:25], encoding="utf-8")  # no newline: cut short
    with pytest.warns(UserWarning, match=r"killed.jsonl:11: last line cut short"):
        assert len(read_jsonl(run)) == 10
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "gradguard report: warning: " in result.output and "10 steps" in result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_report_into_a_missing_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    run = write_jsonl(tmp_path / "run.jsonl", synthetic_run(5))
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "no" / "such" / "report.html")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no such folder" in result.output


# --- headless Chromium ----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img.plot')];
  document.body.dataset.plots = imgs.length;
  document.body.dataset.rendered = imgs.filter(i => i.complete && i.naturalWidth > 100).length;
});</script>"""


def load_in_chromium(page: str, tmp_path: Path) -> tuple[dict[str, int], list[str]]:
    """Load ``page`` (with a probe script added) headless; return the probe's counts and console lines."""
    path = tmp_path / "page.html"
    path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom",
    ]  # fmt: skip
    done = subprocess.run([CHROMIUM, *flags, path.as_uri()], capture_output=True, text=True, timeout=120)
    counts = {k: int(v) for k, v in re.findall(r'data-(plots|rendered)="(\d+)"', done.stdout)}
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return counts, console


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (make test installs Debian's chromium where apt-get is available)",
)


@needs_chromium
def test_report_loads_in_chromium_without_console_errors(tmp_path: Path) -> None:
    counts, console = load_in_chromium(render_run_report(synthetic_run()), tmp_path)
    assert console == []
    assert counts == {"plots": 3, "rendered": 3}


@needs_chromium
def test_the_chromium_probe_sees_errors_and_broken_plots(tmp_path: Path) -> None:
    broken = '<html><body><img class="plot" src="data:image/png;base64,AAAA"><script>console.error("x")</script></body></html>'
    counts, console = load_in_chromium(broken, tmp_path)
    assert counts == {"plots": 1, "rendered": 0}
    assert len(console) == 1

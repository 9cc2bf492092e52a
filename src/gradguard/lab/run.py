"""``gradguard lab``: build the grid, run it (cached, in parallel), write results and the HTML report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradguard.lab.executors import Executor, LocalExecutor, Task
from gradguard.lab.export import write_csv, write_json
from gradguard.lab.report import render_lab_report
from gradguard.lab.runner import GridResult, default_workers, describe_config, run_grid
from gradguard.lab.scenarios import Record, RunConfig, build_grid, execute


@dataclass
class LabResult:
    records: list[Record]
    executed: int
    seconds: float
    report: Path
    results_json: Path
    results_csv: Path


def run_lab(
    scenarios: list[str] | None = None,
    quick: bool = False,
    seeds: int | None = None,
    out: Path = Path("gradguard-out"),
    workers: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    executor: Executor | None = None,
) -> LabResult:
    """Run the lab and write ``out/report.html``, ``out/results.json`` and ``out/results.csv``.

    Args:
        scenarios: names (see ``gradguard.lab.scenarios.all_scenarios``); None or empty: all of them.
        quick: the small grid (under 5 minutes on 2 cores) instead of the full one.
        seeds: seeds per variant, overriding each scenario's default.
        out: output folder; finished runs are cached in ``out/cache`` and not run again.
        workers: parallel processes (default: one per CPU core) of the default executor.
        steps: training steps per run, overriding the scenarios' (for tests).
        progress: show a rich progress bar.
        executor: where the runs execute (``gradguard.lab.executors``): default ``LocalExecutor(workers)``;
            a ``RayExecutor`` runs them as Ray tasks, into the same cache.
    """
    configs = build_grid(scenarios, quick=quick, seeds=seeds, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    executor = executor if executor is not None else LocalExecutor(workers or default_workers())
    if progress:
        result = run_with_progress(configs, out, executor, label="lab")
    else:
        result = run_grid(configs, out, executor=executor)
    report = render_lab_report(result.records, out / "report.html", quick=quick, seconds=result.seconds)
    return LabResult(
        records=result.records,
        executed=result.executed,
        seconds=result.seconds,
        report=report,
        results_json=write_json(result.records, out / "results.json"),
        results_csv=write_csv(result.records, out / "results.csv"),
    )


def run_with_progress(
    configs: list[RunConfig], out: Path, executor: Executor, label: str, task: Task = execute
) -> GridResult:
    """``run_grid`` with a rich progress bar (one tick per run, cached ones included)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, transient=False) as bar:
        progress = bar.add_task("", total=len(configs))

        def advance(config: RunConfig, record: Record) -> None:
            status = "failed" if "error" in record else "done"
            bar.update(progress, advance=1, description=f"{describe_config(config)} {status}")

        return run_grid(configs, out, on_record=advance, executor=executor, task=task)

"""Command line: ``gradguard demo | lab | sweep | doctor | replay | report`` (also ``python -m gradguard``).

Each command imports its implementation lazily, so ``gradguard --help`` stays fast and a command's
optional dependencies are only needed when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="gradguard: see, stop, explain and prevent exploding gradients in PyTorch training.",
)


def _writable(path: str | None, command: str) -> None:
    """Exit 2 with one line when ``path`` cannot be written (its folder is missing), before any work."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        typer.echo(f"gradguard {command}: cannot write {path}: no such folder {str(folder)!r}", err=True)
        raise typer.Exit(code=2)


def _write(path: str, text: str, command: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as error:
        typer.echo(f"gradguard {command}: cannot write {path}: {error.strerror or error}", err=True)
        raise typer.Exit(code=2) from None


@app.command()
def demo(
    steps: int = typer.Option(300, help="Training steps per run."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train a tanh RNN on the temporal order problem at an exploding learning rate, unguarded and guarded."""
    from gradguard.demo import run_demo

    run_demo(steps=steps, seed=seed)


@app.command()
def lab(
    scenarios: list[str] | None = typer.Argument(  # noqa: B008 - typer's way of declaring an argument
        None, help="Scenarios: depth, recurrence, learning_rate, regularization, faults, transformers (default: all)."
    ),
    quick: bool = typer.Option(False, "--quick", help="The small grid: under 5 minutes on 2 cores."),
    seeds: int = typer.Option(None, "--seeds", min=1, help="Seeds per variant (default: the scenario's)."),
    out: str = typer.Option("gradguard-out", "--out", help="Output folder (report, results, run cache)."),
    workers: int = typer.Option(None, "--workers", min=1, help="Parallel processes (default: CPU cores)."),
    steps: int = typer.Option(None, "--steps", min=2, help="Training steps per run, overriding the scenarios'."),
    ray: bool = typer.Option(False, "--ray", help="Run each run as a Ray task (Ray comes with gradguard's ray extra)."),
    address: str = typer.Option(None, "--address", help="With --ray: the Ray cluster (auto, ray://host:10001); "
                                "default: start a local Ray instance."),
) -> None:
    """Reproduce exploding gradients and every remedy on real tasks; write OUT/report.html."""
    from pathlib import Path

    from rich.console import Console

    from gradguard.lab.console import print_summary
    from gradguard.lab.run import run_lab
    from gradguard.lab.scenarios import all_scenarios

    valid = list(all_scenarios())
    unknown = [name for name in scenarios or [] if name not in valid]
    if unknown:
        raise typer.BadParameter(f"unknown scenario {unknown[0]!r}; valid scenarios: {', '.join(valid)}")
    console = Console()
    if not console.is_terminal:  # a pipe or a file (`make demo | tee`, CI logs): no cut at 80 columns
        console = Console(width=160)
    executor = _ray_executor("lab", address, 1.0, 0.0, 3) if ray or address else None
    result = run_lab(scenarios or None, quick=quick, seeds=seeds, out=Path(out), workers=workers, steps=steps,
                     executor=executor)
    print_summary(result.records, console)
    console.print(
        f"{len(result.records)} runs ({result.executed} executed, {len(result.records) - result.executed} cached) "
        f"in {result.seconds:.0f} s"
    )
    console.print(f"report: [bold]{result.report.resolve()}[/bold]")
    console.print(f"results: {result.results_csv}, {result.results_json}")


def _ray_executor(command: str, address: str | None, cpus: float, gpus: float, retries: int) -> Any:
    """A ``RayExecutor``, or exit 2 with one line when Ray is missing or the cluster cannot be reached."""
    from gradguard.lab.executors import RayExecutor

    try:
        return RayExecutor(address=address, cpus_per_run=cpus, gpus_per_run=gpus, max_retries=retries)
    except ImportError as error:
        typer.echo(f"gradguard {command}: {error}", err=True)
        raise typer.Exit(code=2) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        typer.echo(f"gradguard {command}: cannot start Ray at {address or 'a local instance'}: {error}", err=True)
        raise typer.Exit(code=2) from None


@app.command()
def sweep(
    target: str = typer.Argument(
        ..., help="path/to/file.py:build or package.module:build; build(lr) returns (model, optimizer, data, "
        "loss_fn) or a gradguard.lab.sweep_factory.SweepRun (see examples/sweep_factory.py)."),
    lr_min: float = typer.Option(1e-3, "--lr-min", help="Smallest learning rate."),
    lr_max: float = typer.Option(1.0, "--lr-max", help="Largest learning rate."),
    points: int = typer.Option(8, "--points", min=2, help="Learning rates, log-spaced from --lr-min to --lr-max."),
    remedies: str = typer.Option(
        "none,global_norm,guard,qk_norm", "--remedies",
        help="Comma-separated: none, global_norm, zclip, agc, guard, warmup, qk_norm, z_loss."),
    seeds: int = typer.Option(2, "--seeds", min=1, help="Seeds per learning rate and remedy."),
    steps: int = typer.Option(300, "--steps", min=2, help="Training steps per run."),
    out: str = typer.Option("gradguard-sweep", "--out", help="Output folder (report, table, results, run cache)."),
    workers: int = typer.Option(None, "--workers", min=1, help="Local processes (default: CPU cores)."),
    ray: bool = typer.Option(False, "--ray", help="Run each run as a Ray task (Ray comes with gradguard's ray extra)."),
    address: str = typer.Option(None, "--address", help="With --ray: the Ray cluster (auto, ray://host:10001); "
                                "default: start a local Ray instance."),
    cpus_per_run: float = typer.Option(1.0, "--cpus-per-run", help="With --ray: CPUs each run reserves."),
    gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help="With --ray: GPUs each run reserves (0.25: "
                                       "four runs share one)."),
    retries: int = typer.Option(3, "--retries", min=0, help="With --ray: reruns of a run whose worker died."),
) -> None:
    """Train the factory at each learning rate with each remedy; write OUT/report.html and OUT/table.md with the
    LR sensitivity (Wortsman et al. 2023) and the largest LR that trains per remedy. Exit code: 0 done, 2 bad
    input (the target, an option), 1 some runs failed."""
    from rich.console import Console

    from gradguard.explain.factory import FactoryError
    from gradguard.lab.sweep import run_sweep
    from gradguard.lab.sweep_report import print_table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    executor = _ray_executor("sweep", address, cpus_per_run, gpus_per_run, retries) if ray or address else None
    try:
        result = run_sweep(target, lr_min=lr_min, lr_max=lr_max, points=points,
                           remedies=[name.strip() for name in remedies.split(",") if name.strip()], seeds=seeds,
                           steps=steps, out=Path(out), executor=executor, workers=workers)
    except (FactoryError, ValueError) as error:
        typer.echo(f"gradguard sweep: {error}", err=True)
        raise typer.Exit(code=2) from None
    print_table(result.rows, result.not_applicable, console)
    failed = sum("error" in record for record in result.records)
    console.print(
        f"{len(result.records)} runs ({result.executed} executed, {len(result.records) - result.executed} cached"
        + (f", {failed} failed: see {result.results_json}" if failed else "") + f") in {result.seconds:.0f} s"
    )
    console.print(f"report: [bold]{result.report.resolve()}[/bold]")
    console.print(f"table: {result.table}; results: {result.results_csv}, {result.results_json}")
    raise typer.Exit(code=1 if failed else 0)


@app.command()
def doctor(
    target: str = typer.Argument(
        ..., help="package.module:factory or path/to/file.py:factory; the factory returns (model, batch, "
        "loss_fn) or (model, batch, loss_fn, optimizer)."),
    html: str | None = typer.Option(None, "--html", help="Also write the report as one HTML page here."),
    json_path: str | None = typer.Option(None, "--json", help="Also write report.to_dict() as JSON here."),
) -> None:
    """Diagnose a model's gradient flow at initialisation. Exit code: 0 healthy, 1 error finding, 2 bad input
    (the target, its model failing on its batch, an output path that cannot be written)."""
    import json

    from gradguard.explain import doctor as run_doctor
    from gradguard.explain.factory import FactoryError, load_patient
    from gradguard.explain.html import render_html

    _writable(html, "doctor")
    _writable(json_path, "doctor")
    try:
        patient = load_patient(target)
        report = run_doctor(patient.model, patient.batch, patient.loss_fn, optimizer=patient.optimizer)
    except (FactoryError, TypeError, ValueError) as error:
        typer.echo(f"gradguard doctor: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(str(report))
    if html is not None:
        _write(html, render_html(report), "doctor")
        typer.echo(f"report written to {html}")
    if json_path is not None:
        _write(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False), "doctor")
        typer.echo(f"report data written to {json_path}")
    raise typer.Exit(code=0 if report.healthy else 1)

@app.command()
def replay(
    bundle: str = typer.Argument(..., help="A replay bundle written by gg.Forensics(bundle_dir=...)."),
    model: str = typer.Option(
        ..., "--model", help="package.module:factory or path/to/file.py:factory, as for `gradguard doctor`: "
        "its model (the bundle's weights are loaded into it), loss_fn and optimizer (if any) are used; its "
        "batch is not."),
) -> None:
    """Run a bad step again from its bundle (trained weights, its batch, its random numbers) and say what to
    blame: the data (the samples, and the gg.forensics.exclude line), a NaN/Inf's module, the weights or the
    learning rate (which layer, what to change), or a transient fault.

    Exit code: 0 transient or nothing to blame, 1 a finding (data, NaN/Inf, weights), 2 bad input (a file
    that is not a readable, complete, uncorrupted bundle; a model that is not the bundle's)."""
    from gradguard.explain.factory import FactoryError, load_patient
    from gradguard.forensics.bundle import BundleError, load_bundle
    from gradguard.forensics.replay import diagnose_step

    def refuse(message: str) -> typer.Exit:
        typer.echo(f"gradguard replay: {' '.join(message.split())}", err=True)
        return typer.Exit(code=2)

    try:
        data = load_bundle(bundle)
        patient = load_patient(model)
    except (BundleError, FactoryError) as error:
        raise refuse(str(error)) from None
    try:
        diagnosis = diagnose_step(data, patient.model, patient.loss_fn, patient.optimizer)
    except BundleError as error:
        raise refuse(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a model that cannot run the bundled step is bad input
        first = (str(error).strip().splitlines() or [""])[0]
        raise refuse(f"cannot replay {bundle} with {model}: {type(error).__name__}: {first}") from None
    typer.echo(str(diagnosis))
    raise typer.Exit(code=1 if diagnosis.finding else 0)


@app.command()
def report(
    run: str = typer.Argument(..., help="A JSON Lines run log written by gg.sinks.JSONL."),
    output: str = typer.Option("report.html", "--output", "-o", help="Where to write the HTML page."),
) -> None:
    """Render a monitored run (loss, gradient norm, per-layer heatmap, events) as one HTML page.

    Exit code: 0 written, 2 bad input (no such log, a line that is not a record, an output folder missing).
    A last line cut short (a job killed while writing) is skipped with a warning."""
    import warnings

    from gradguard.report.run import read_jsonl, render_run_report, summarize

    _writable(output, "report")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = read_jsonl(run)
        for warning in caught:
            typer.echo(f"gradguard report: warning: {warning.message}", err=True)
        page = render_run_report(records, title=f"gradguard run report: {run}")
    except (OSError, ValueError) as error:
        typer.echo(f"gradguard report: {error}", err=True)
        raise typer.Exit(2) from None
    _write(output, page, "report")
    s = summarize(records)
    typer.echo(
        f"{s.steps} steps, {s.skipped} skipped, {s.clipped} clipped, {s.rollbacks} rollbacks, "
        f"{s.lr_backoffs} LR back-offs; report written to {output}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()

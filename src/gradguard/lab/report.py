"""The lab's HTML report: one self-contained page, one section per scenario.

Each section holds the claim tested, the plots (PNG data URIs), the table of variants aggregated over
seeds (``gradguard.lab.summary``) and the "what it shows" paragraph written from the numbers at render
time (``gradguard.lab.findings``). The metric definitions are printed once, from ``gradguard.lab.metrics``.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch

from gradguard.lab import metrics
from gradguard.lab.findings import findings_for, fmt, pct
from gradguard.lab.scenarios import Record, all_scenarios
from gradguard.lab.summary import by_variant, summarize
from gradguard.report.charts import Panel, Series, bars_with_intervals, curves, grouped_bars, scatter

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]


def _count(key: str) -> Callable[[Row], str]:
    return lambda row: f"{row[key]}/{row['runs']}"


def _diverged(row: Row) -> str:
    text = f"{row['diverged']}/{row['runs']}"
    return text + (f" ({row['recovered']} recovered)" if row.get("recovered") else "")


def _number(key: str) -> Callable[[Row], str]:
    return lambda row: fmt(row.get(key))


def _percent(key: str) -> Callable[[Row], str]:
    return lambda row: pct(row.get(key))


def _guard_actions(row: Row) -> str:
    """The Guard's median counts over seeds: skipped steps / rollbacks / LR back-offs; "-" for other remedies."""
    if "rollbacks" not in row:
        return "-"
    return f"{row.get('skipped', 0)} / {row['rollbacks']} / {row.get('lr_backoffs', 0)}"


def _forensics(row: Row) -> str:
    """Forensics of the Guard's bad steps: steps that reproduced / steps analysed, and the precision and
    recall of the samples named where samples were corrupted (means over seeds); "-" without forensics."""
    if row.get("forensics_analysed") is None:
        return "-"
    text = f"{fmt(row['forensics_reproducible'])} / {fmt(row['forensics_analysed'])} reproduced"
    if row.get("forensics_recall") is not None:
        text += f"; samples P {pct(row.get('forensics_precision'))} R {pct(row['forensics_recall'])}"
    return text


def _solved(row: Row) -> str:
    if "solved" not in row:
        return "n/a"
    low, high = row["solved_interval"]
    return f"{row['solved']}/{row['runs']} [{pct(low)}, {pct(high)}]"


COMMON_END: list[Column] = [("wall s / run", _number("wall_seconds"))]
COLUMNS: dict[str, list[Column]] = {
    "depth": [
        ("doctor at init", lambda row: row.get("init_verdict") or "n/a"),
        ("|dL/dy| growth output->input at init", _number("init_growth")),
        ("diverged", _diverged),
        ("final loss", _number("final_loss")),
        ("test acc", _percent("test_accuracy")),
        ("gen gap", _percent("generalization_gap")),
        ("largest |g|", _number("max_grad_norm")),
        ("median |g|", _number("median_grad_norm")),
        ("oscillation", _number("oscillation_index")),
    ],
    "recurrence": [
        ("solved [95% CI]", _solved),
        ("steps to solve", _number("steps_to_target")),
        ("diverged", _diverged),
        ("largest |g|", _number("max_grad_norm")),
        ("median |g|", _number("median_grad_norm")),
        ("oscillation", _number("oscillation_index")),
        ("final loss", _number("final_loss")),
        ("Guard skips / rollbacks / LR cuts", _guard_actions),
    ],
    "learning_rate": [
        ("diverged", _diverged),
        ("final loss", _number("final_loss")),
        ("val loss", _number("val_loss")),
        ("oscillation", _number("oscillation_index")),
        ("largest |g|", _number("max_grad_norm")),
        ("median |g|", _number("median_grad_norm")),
        ("Guard skips / rollbacks / LR cuts", _guard_actions),
    ],
    "regularization": [
        ("train acc", _percent("train_accuracy")),
        ("test acc", _percent("test_accuracy")),
        ("gen gap", _percent("generalization_gap")),
        ("weight norm", _number("final_weight_norm")),
        ("largest |g|", _number("max_grad_norm")),
        ("median |g|", _number("median_grad_norm")),
        ("final loss", _number("final_loss")),
    ],
    "faults": [
        ("diverged", _diverged),
        ("finite weights", _count("params_finite")),
        ("test acc", _percent("test_accuracy")),
        ("gen gap", _percent("generalization_gap")),
        ("final loss", _number("final_loss")),
        ("largest |g|", _number("max_grad_norm")),
        ("Guard skips / rollbacks / LR cuts", _guard_actions),
        ("forensics", _forensics),
    ],
}


def split_parts(records: list[Record]) -> dict[str, list[Record]]:
    """A scenario's records by ``config["part"]`` (e.g. one task of several); "" when it has no parts."""
    parts: dict[str, list[Record]] = {}
    for record in records:
        parts.setdefault(record["config"].get("part", ""), []).append(record)
    return parts


def _series(record: Record, curve: str, label: str, color: int, mark: bool = True) -> Series:
    data = record["curves"][curve]
    return Series(label, data["step"], data["value"], record.get("divergence_step") if mark else None, color)


def _finished(records: list[Record]) -> list[Record]:
    return [record for record in records if "error" not in record]


def _per_variant_panels(records: list[Record], curve: str, vlines: bool = False) -> list[Panel]:
    """One panel per variant, one line per seed, divergence marked."""
    panels = []
    for variant, group in by_variant(_finished(records)).items():
        panel = Panel(variant, vlines=group[0]["config"].get("fault_steps", []) if vlines else ())
        for record in group:
            seed = record["config"]["seed"]
            panel.series.append(_series(record, curve, f"seed {seed}", seed, mark=curve == "loss"))
        panels.append(panel)
    return panels


def depth_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    finished = [record for record in _finished(records) if record["config"]["seed"] == 0]
    flow_panels, loss_panels = [], []
    for activation in ("sigmoid", "tanh", "relu"):
        flow = Panel(activation)
        loss = Panel(activation)
        for color, record in enumerate(r for r in finished if r["config"]["activation"] == activation):
            init = record["config"]["variant"].split(" / ")[1]
            norms = record["layer_flow"]["norms"]
            flow.series.append(Series(init, list(range(len(norms))), norms, None, color))
            loss.series.append(_series(record, "loss", init, color))
        flow_panels.append(flow)
        loss_panels.append(loss)
    sources = sorted({r["layer_flow"]["source"] for r in finished})
    if sources == ["doctor"]:
        what = "error signal ||dL/dy|| at each layer's output (gg.doctor)"
    elif "doctor" not in sources:
        what = f"weight-gradient norm per layer, measured by {sources[0]}" if sources else "gradient norm"
    else:
        what = "error signal (gg.doctor) for some runs, weight-gradient norm for the others: " + "; ".join(sources)
    accuracy = bars_with_intervals(
        [row["variant"] for row in rows], [row["test_accuracy"] or 0.0 for row in rows],
        ylabel="test accuracy", title="Test accuracy (mean over seeds)", ylim=(0, 1),
    )
    return [
        (f"Gradient norm per layer at initialization, seed 0: the {what}; layer 0 is the input side.",
         curves(flow_panels, "gradient norm", xlabel="layer (input -> output)")),
        ("Training loss, seed 0 (red x: diverged).", curves(loss_panels, "training loss")),
        ("Test accuracy after training.", accuracy),
    ]


def recurrence_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    labels = [row["variant"] for row in rows if "solved" in row]
    solved = [row["solved"] / row["runs"] for row in rows if "solved" in row]
    lows = [row["solved_interval"][0] for row in rows if "solved" in row]
    highs = [row["solved_interval"][1] for row in rows if "solved" in row]
    time_panel = Panel("at initialization (gg.doctor)")
    seen: set[tuple[str, int]] = set()
    for record in _finished(records):
        config, time = record["config"], (record.get("layer_flow") or {}).get("time")
        key = (config["model"], config["seed"])
        if not time or not time.get("grad_norm_per_step") or key in seen:
            continue
        seen.add(key)
        norms = time["grad_norm_per_step"]
        color = 0 if config["model"] == "tanh RNN" else 3
        time_panel.series.append(Series(config["model"], list(range(1, len(norms) + 1)), norms, None, color))
    plots = []
    if time_panel.series:
        plots.append((
            "Gradient through time at initialization: ||dL/dh_t|| for t = 1..T, one line per seed (from the "
            "doctor); a curve that falls from left to right grows going back in time.",
            curves([time_panel], "||dL/dh_t||", xlabel="time step t", columns=1),
        ))
    return plots + [
        ("Success rate over seeds with 95% Wilson intervals.",
         bars_with_intervals(labels, solved, lows, highs, ylabel="solved", title="Success rate", ylim=(0, 1.02))),
        ("Training loss per seed (red x: diverged).", curves(_per_variant_panels(records, "loss"), "training loss",
                                                             columns=4, legend=False)),
        ("Gradient norm before clipping (largest per plotted bucket).",
         curves(_per_variant_panels(records, "grad_norm"), "total gradient norm", columns=4, legend=False)),
    ]


def learning_rate_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    return [
        ("Training loss per seed (red x: diverged).",
         curves(_per_variant_panels(records, "loss"), "training loss", columns=4, legend=False)),
        ("Gradient norm before clipping (largest per plotted bucket).",
         curves(_per_variant_panels(records, "grad_norm"), "total gradient norm", columns=4, legend=False)),
    ]


def regularization_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    variants = [row["variant"] for row in rows]
    bars = grouped_bars(variants, {
        "train/test gap": [row["generalization_gap"] for row in rows],
        "weight norm": [row["final_weight_norm"] for row in rows],
        "median |g|": [row["median_grad_norm"] for row in rows],
        "largest |g|": [row["max_grad_norm"] for row in rows],
    })
    points: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        variant: ([r["max_grad_norm"] for r in group], [r["generalization_gap"] for r in group])
        for variant, group in by_variant(_finished(records)).items()
    }
    return [
        ("Means over seeds.", bars),
        ("Each run: largest gradient norm against its train/test accuracy gap.",
         scatter(points, "largest gradient norm", "train - test accuracy", log_x=True)),
        ("Training loss (task loss, without the penalty).",
         curves(_per_variant_panels(records, "loss"), "training loss", legend=False)),
    ]


def faults_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    return [
        ("Training loss per seed; dotted lines: injected faults; red x: diverged.",
         curves(_per_variant_panels(records, "loss", vlines=True), "training loss", legend=False)),
        ("Test accuracy after training.",
         bars_with_intervals([row["variant"] for row in rows], [row["test_accuracy"] or 0.0 for row in rows],
                             ylabel="test accuracy", title="Test accuracy (mean over seeds)", ylim=(0, 1))),
    ]


PLOTS = {
    "depth": depth_plots,
    "recurrence": recurrence_plots,
    "learning_rate": learning_rate_plots,
    "regularization": regularization_plots,
    "faults": faults_plots,
}


def scenario_sections(records: list[Record]) -> list[dict[str, Any]]:
    """The report's sections, one per scenario (and part) present in ``records``, in the lab's order."""
    scenarios = all_scenarios()
    grouped: dict[str, list[Record]] = {}
    for record in records:
        grouped.setdefault(record["config"]["scenario"], []).append(record)
    sections = []
    for name, scenario in scenarios.items():
        for part, part_records in split_parts(grouped.get(name, [])).items():
            rows = summarize(part_records)
            columns = COLUMNS[name] + COMMON_END
            plots = PLOTS[name](part_records, rows) if _finished(part_records) else []
            sections.append({
                "name": name,
                "title": scenario.title + (f" - {part}" if part else ""),
                "claim": scenario.claim,
                "plots": plots,
                "header": ["variant", "runs", *[label for label, _ in columns]],
                "table": [[row["variant"], str(row["runs"]), *[cell(row) for _, cell in columns]] for row in rows],
                "findings": findings_for(name, rows, part_records),
                "config": _shared_config(part_records),
            })
    return sections


def _shared_config(records: list[Record]) -> str:
    """The config keys every run of a section shares, as ``key=value`` text (the setup, for readers)."""
    configs = [record["config"] for record in records]
    if not configs:
        return ""
    shared = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs) and k not in ("scenario", "part")}
    return ", ".join(f"{key}={value}" for key, value in shared.items())


def render_lab_report(records: list[Record], path: Path, quick: bool, seconds: float) -> Path:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("gradguard.lab", ""), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )
    html = environment.get_template("report.html.j2").render(
        sections=scenario_sections(records),
        definitions=metric_definitions(),
        window=metrics.WINDOW,
        factor=metrics.DIVERGENCE_FACTOR,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        mode="quick" if quick else "full",
        runs=len(records),
        seconds=seconds,
        environment=f"Python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def metric_definitions() -> list[tuple[str, str]]:
    """(term, definition) pairs from the bullet list of ``gradguard.lab.metrics``' module docstring."""
    doc = metrics.__doc__ or ""
    bullets: list[str] = []
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith("* "):
            bullets.append(stripped[2:])
        elif bullets and stripped and line.startswith("  "):
            bullets[-1] += " " + stripped
    definitions = []
    for bullet in bullets:
        term, _, text = bullet.partition(":")
        definitions.append((term.strip("* "), text.strip()))
    return definitions

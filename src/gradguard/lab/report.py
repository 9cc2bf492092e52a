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
from gradguard.lab.lr_sweep import early_warning, lr_sensitivity
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
    if row.get("watch_recall") is not None:  # silent bad data: the data watch, not forensics
        return (f"detector: {fmt(row.get('detector_flagged_steps'))} steps flagged; data watch: "
                f"{fmt(row.get('watch_flagged'))} rows, P {pct(row.get('watch_precision'))} R {pct(row['watch_recall'])}")
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
        ("test loss", _number("test_loss")),
        ("clipped steps", _number("clipped")),
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
    "transformers": [
        ("diverged", _diverged),
        ("final loss", _number("final_loss")),
        ("val loss", _number("val_loss")),
        ("largest attn logit", _number("max_attn_logit")),
        ("final min head entropy", _number("final_attn_entropy")),
        ("log Z drift", _number("log_z_drift")),
        ("warned", _count("warned")),
        ("Guard skips / rollbacks / LR cuts", _guard_actions),
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


def _remedy_of(record: Record) -> str:
    return record["config"]["variant"].split(" / lr ")[0]


def transformers_plots(records: list[Record], rows: list[Row]) -> list[tuple[str, str]]:
    finished = _finished(records)
    sweep = lr_sensitivity(finished, _remedy_of)
    loss_panel = Panel("final validation loss, capped at the initial loss")
    logit, entropy, drift = Panel("largest attention logit"), Panel("smallest head entropy (nats)"), Panel("log Z drift")
    for color, row in enumerate(sweep):
        loss_panel.series.append(Series(row.remedy, row.lrs, row.capped_loss_by_lr, None, color))
        logit.series.append(Series(row.remedy, row.lrs, row.max_attn_logit_by_lr, None, color))
        entropy.series.append(Series(row.remedy, row.lrs, row.min_attn_entropy_by_lr, None, color))
        drift.series.append(Series(row.remedy, row.lrs, row.log_z_drift_by_lr, None, color))
    plots = [
        ("Final validation loss against the learning rate, median over seeds, each run's loss capped at its "
         "loss at initialisation (as Wortsman et al. 2023 do): the flatter the curve, the less sensitive to the LR.",
         curves([loss_panel], "validation loss", xlabel="peak learning rate", log_y=False, columns=1, log_x=True)),
        ("The two instabilities against the learning rate (median over seeds): the largest attention logit seen "
         "during training (every 10 steps) and the largest drift of the mean log Z of the output from its value at "
         "initialisation; then the smallest head entropy (uniform attention over the causal window: "
         f"{fmt(_uniform_entropy(finished))} nats).",
         curves([logit, drift], "", xlabel="peak learning rate", columns=2, log_x=True)),
        ("Smallest head entropy seen during training (nats), median over seeds.",
         curves([entropy], "entropy (nats)", xlabel="peak learning rate", columns=1, log_x=True, log_y=False)),
    ]
    lrs = sorted({record["config"]["lr"] for record in finished})
    if lrs:
        shown = lrs[-2] if len(lrs) > 1 else lrs[0]
        at_lr = [r for r in finished if r["config"]["lr"] == shown and r["config"]["seed"] == 0]
        panels = [Panel(f"training loss, lr {shown:g}"), Panel(f"largest attention logit, lr {shown:g}"),
                  Panel(f"mean log Z, lr {shown:g}")]
        for color, record in enumerate(at_lr):
            label = _remedy_of(record)
            panels[0].series.append(_series(record, "loss", label, color))
            panels[1].series.append(_series(record, "max_attn_logit", label, color, mark=False))
            panels[2].series.append(_series(record, "log_z", label, color, mark=False))
        plots.append((f"Seed 0 at the second-largest learning rate of the sweep ({shown:g}), one line per remedy "
                      "(red x: diverged).", curves(panels, "", columns=3)))
    warning = early_warning(finished)
    if warning.diverged:
        bins = [("never / after", lambda lead: lead is None or lead <= 0), ("1-24", lambda lead: 0 < lead < 25),
                ("25-49", lambda lead: 25 <= lead < 50), ("50-99", lambda lead: 50 <= lead < 100),
                ("100-199", lambda lead: 100 <= lead < 200), (">= 200", lambda lead: lead >= 200)]
        leads = [_lead(record) for record in finished if record.get("diverged")]
        counts = [sum(1 for lead in leads if test(lead)) for _, test in bins]
        plots.append((f"Early warning: steps between the first precursor warning and the divergence, for the "
                      f"{warning.diverged} diverged runs (a warning in time is >= {warning.lead} steps ahead).",
                      bars_with_intervals([label for label, _ in bins], counts, ylabel="runs",
                                          title="lead time (steps)")))
    return plots


def _uniform_entropy(records: list[Record]) -> float | None:
    return next((r["uniform_attn_entropy"] for r in records if r.get("uniform_attn_entropy") is not None), None)


def _lead(record: Record) -> int | None:
    warning = record.get("warning_step")
    return None if warning is None else record["divergence_step"] - warning


def transformers_tables(records: list[Record]) -> list[dict[str, Any]]:
    finished = _finished(records)
    sweep = lr_sensitivity(finished, _remedy_of)
    sensitivity = {
        "title": "LR sensitivity (Wortsman et al. 2023): mean over the sweep of (capped final validation loss - best)",
        "header": ["remedy", "LR sensitivity (mean over seeds)", "[min, max] over seeds", "best lr", "best loss",
                   "diverged", "largest attn logit (top lr)", "log Z drift (top lr)"],
        "rows": [[row.remedy, fmt(row.sensitivity), f"[{fmt(row.sensitivity_low)}, {fmt(row.sensitivity_high)}]",
                  f"{row.best_lr:g}", fmt(row.best_loss), f"{row.diverged}/{row.runs}",
                  fmt(row.max_attn_logit_by_lr[-1]), fmt(row.log_z_drift_by_lr[-1])] for row in sweep],
    }
    settings = list(next((r["warning_steps"] for r in finished if r.get("warning_steps")), {}) or [None])
    rows = []
    for setting in settings:
        warning = early_warning(finished, setting=setting)
        quantiles = warning.lead_quantiles() or {}
        rows.append([setting or "default", str(warning.diverged),
                     f"{warning.warned_in_time} ({pct(warning.recall)})", str(warning.warned_late),
                     str(warning.too_early), str(warning.not_diverged),
                     f"{warning.false_alarms} ({pct(warning.false_alarm_rate)})",
                     " / ".join(fmt(quantiles.get(k)) for k in ("min", "p10", "median", "max"))])
    lead = early_warning(finished).lead
    early = {
        "title": f"Early warning (gg.precursor.Precursor, on the device): warned >= {lead} steps before divergence, "
                 "and false alarms; the first row is the detector's defaults (the Guard's), the others are other "
                 "operating points measured on the same runs",
        "header": ["detector", "diverged runs", f"warned >= {lead} steps ahead (recall)", "warned later",
                   f"diverged before step {lead}", "runs that did not diverge", "false alarms",
                   "lead time min / p10 / median / max"],
        "rows": rows,
    }
    return [sensitivity, early]


TABLES: dict[str, Callable[[list[Record]], list[dict[str, Any]]]] = {"transformers": transformers_tables}


PLOTS = {
    "depth": depth_plots,
    "recurrence": recurrence_plots,
    "learning_rate": learning_rate_plots,
    "regularization": regularization_plots,
    "faults": faults_plots,
    "transformers": transformers_plots,
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
                "tables": TABLES[name](part_records) if name in TABLES and _finished(part_records) else [],
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

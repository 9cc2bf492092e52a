"""What ``gradguard sweep`` shows: one row per remedy, the table it prints and writes, and its HTML page.

Per remedy (from the finished runs; ``gradguard.lab.lr_sweep.lr_sensitivity`` computes the first four):

* **LR sensitivity** (Wortsman et al. 2023): ``E_lr[min(L(lr), L0) - min_lr L(lr)]`` per seed, then the
  mean over seeds, with the smallest and largest over seeds;
* **best LR** and its loss: the learning rate of the lowest median (over seeds) capped final loss;
* **largest LR that trains**: the largest learning rate of the sweep at which every seed's run trained: it
  did not diverge (``gradguard.lab.metrics``) and its final loss is below its loss at initialisation;
* **diverged**: runs that diverged / runs.

The page is the lab's (``report.html.j2``, the charts of ``gradguard.report.charts``): final loss against
the LR per remedy with the first diverging LR marked, the training loss at the top LR, and the table.
"""

from __future__ import annotations

import datetime
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch

from gradguard.lab import metrics
from gradguard.lab.findings import fmt
from gradguard.lab.lr_sweep import Sensitivity, lr_sensitivity
from gradguard.lab.report import metric_definitions
from gradguard.lab.scenarios import Record
from gradguard.report.charts import Panel, Series, curves

HEADER = ["remedy", "LR sensitivity", "[min, max] over seeds", "best lr", "best loss", "largest lr that trains",
          "diverged"]


@dataclass
class SweepRow:
    """One remedy over the sweep."""

    remedy: str
    sensitivity: Sensitivity
    largest_lr: float | None  # None: no learning rate of the sweep trains on every seed
    first_diverged_lr: float | None  # the smallest learning rate at which a run diverged

    def cells(self) -> list[str]:
        s = self.sensitivity
        return [self.remedy, fmt(s.sensitivity), f"[{fmt(s.sensitivity_low)}, {fmt(s.sensitivity_high)}]",
                f"{s.best_lr:g}", fmt(s.best_loss), "none" if self.largest_lr is None else f"{self.largest_lr:g}",
                f"{s.diverged}/{s.runs}"]


def remedy_of(record: Record) -> str:
    return record["config"]["remedy_label"]


def trained(record: Record) -> bool:
    """The run did not diverge and ended below its loss at initialisation."""
    final, initial = record.get("val_loss"), record.get("initial_loss")
    return (not record.get("diverged") and final is not None and initial is not None
            and math.isfinite(final) and final < initial)


def sweep_rows(records: list[Record]) -> list[SweepRow]:
    """One :class:`SweepRow` per remedy with finished runs, in the sweep's order."""
    finished = [record for record in records if "error" not in record]
    rows = []
    for sensitivity in lr_sensitivity(finished, remedy_of):
        group = [record for record in finished if remedy_of(record) == sensitivity.remedy]
        at = {lr: [r for r in group if r["config"]["lr"] == lr] for lr in sensitivity.lrs}
        training = [lr for lr, runs in at.items() if all(trained(r) for r in runs)]
        diverging = [lr for lr, runs in at.items() if any(r.get("diverged") for r in runs)]
        rows.append(SweepRow(sensitivity.remedy, sensitivity, max(training, default=None), min(diverging, default=None)))
    return rows


def table_lines(rows: list[SweepRow], not_applicable: dict[str, str]) -> list[list[str]]:
    """The table's rows as text: one per remedy that ran, then one per remedy not applicable."""
    lines = [row.cells() for row in rows]
    lines += [[label, f"not applicable: {reason}", "", "", "", "", ""] for label, reason in not_applicable.items()]
    return lines


def write_table(rows: list[SweepRow], not_applicable: dict[str, str], path: Path) -> Path:
    """The table as Markdown."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_lines(rows, not_applicable)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def print_table(rows: list[SweepRow], not_applicable: dict[str, str], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title="gradguard sweep: LR sensitivity",
                  caption="LR sensitivity (Wortsman et al. 2023): mean over the LRs of min(L(lr), L0) - best, "
                  "mean over seeds; largest lr that trains: every seed finite and below its initial loss")
    for index, name in enumerate(HEADER):
        table.add_column(escape(name), justify="left" if index == 0 else "right", no_wrap=True)
    for cells in table_lines(rows, not_applicable):
        table.add_row(*(escape(cell) for cell in cells))  # "[min, max]" is text, not rich markup
    console.print(table)


def sweep_plots(records: list[Record], rows: list[SweepRow]) -> list[tuple[str, str]]:
    loss = Panel("final loss, capped at the loss at initialisation")
    for color, row in enumerate(rows):
        s = row.sensitivity
        loss.series.append(Series(row.remedy, s.lrs, s.capped_loss_by_lr, row.first_diverged_lr, color))
    plots = [("Final loss against the learning rate, median over seeds, each run's loss capped at its loss at "
              "initialisation (Wortsman et al. 2023); red x: the smallest learning rate at which a run diverged. "
              "The flatter the curve, the less sensitive to the learning rate.",
              curves([loss], "final loss", xlabel="learning rate", log_y=False, columns=1, log_x=True))]
    finished = [record for record in records if "error" not in record]
    if finished:
        top = max(record["config"]["lr"] for record in finished)
        panel = Panel(f"training loss at lr {top:g}, seed 0")
        for color, row in enumerate(rows):
            for record in finished:
                config = record["config"]
                if remedy_of(record) == row.remedy and config["lr"] == top and config["seed"] == 0:
                    curve = record["curves"]["loss"]
                    panel.series.append(Series(row.remedy, curve["step"], curve["value"],
                                               record.get("divergence_step"), color))
        plots.append((f"Training loss at the largest learning rate of the sweep ({top:g}), seed 0, one line per "
                      "remedy (red x: diverged).", curves([panel], "training loss", columns=1)))
    return plots


def sweep_findings(rows: list[SweepRow], not_applicable: dict[str, str]) -> list[str]:
    """Sentences written from the numbers: the baseline against each remedy."""
    lines = []
    baseline = next((row for row in rows if row.remedy == "no remedy"), None)
    for row in rows:
        text = (f"{row.remedy}: LR sensitivity {fmt(row.sensitivity.sensitivity)}, trains up to lr "
                f"{'none' if row.largest_lr is None else f'{row.largest_lr:g}'}, best loss {fmt(row.sensitivity.best_loss)} "
                f"at lr {row.sensitivity.best_lr:g}")
        if baseline is not None and row is not baseline and baseline.sensitivity.sensitivity > 0:
            ratio = row.sensitivity.sensitivity / baseline.sensitivity.sensitivity
            text += f" ({ratio:.2f}x the sensitivity without a remedy)"
        lines.append(text + ".")
    lines += [f"{label}: not applicable ({reason})." for label, reason in not_applicable.items()]
    return lines


def render_sweep_report(
    records: list[Record], rows: list[SweepRow], not_applicable: dict[str, str], path: Path, target: str,
    seconds: float, where: str,
) -> Path:
    """The sweep's page, in the lab's template: one section, its plots, table and findings."""
    finished = [record for record in records if "error" not in record]
    first = finished[0]["config"] if finished else {}
    section = {
        "name": "sweep",
        "title": f"LR sensitivity of {target}",
        "claim_label": "Question.",
        "claim": ("Up to which learning rate does this model train, and how much does each remedy widen that "
                  "range? Wortsman et al. 2023 summarise a sweep by the LR sensitivity: the lower, the less the "
                  "final loss depends on the learning rate."),
        "config": f"steps={first.get('steps')}, seeds={len({r['config']['seed'] for r in finished})}, "
                  f"lrs={sorted({r['config']['lr'] for r in finished})}",
        "plots": sweep_plots(records, rows) if finished else [],
        "header": HEADER,
        "table": table_lines(rows, not_applicable),
        "tables": [],
        "findings": sweep_findings(rows, not_applicable)
        + [f"{sum('error' in r for r in records)} runs failed (see results.json)."] * any("error" in r for r in records),
    }
    definitions = [
        ("LR sensitivity", "E over the sweep's learning rates of min(L(lr), L0) - min over lr of L(lr) (Wortsman et al. "
         "2023), L the final loss (on the factory's eval_batch, else the mean of the last W training losses), L0 the "
         "loss at initialisation; per seed, then the mean over seeds. A diverged run counts as L0."),
        ("largest lr that trains", "the largest learning rate at which every seed's run did not diverge and ended "
         "below its loss at initialisation."),
        *metric_definitions(),
    ]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("gradguard.lab", ""), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )
    html = environment.get_template("report.html.j2").render(
        page_title="gradguard sweep report",
        heading="gradguard sweep: learning-rate sensitivity and remedies",
        intro=(f"{len(records)} training runs of {target} on {where}, {seconds:.0f} s of wall time for the runs "
               f"executed this time; generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; Python "
               f"{platform.python_version()}, torch {torch.__version__}, {platform.machine()}. Every run is seeded and "
               "cached: rerun the same command to reproduce the page."),
        sections=[section],
        definitions=definitions,
        window=metrics.WINDOW,
        factor=metrics.DIVERGENCE_FACTOR,
    )
    path = Path(path)
    path.write_text(html, encoding="utf-8")
    return path

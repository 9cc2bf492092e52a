"""The lab's one-screen summary on the terminal: one line per variant, the scenario's key numbers."""

from __future__ import annotations

from typing import Any

from gradguard.lab.findings import fmt, pct
from gradguard.lab.summary import summarize

Record = dict[str, Any]


def headline(scenario: str, row: dict[str, Any]) -> str:
    """The one number that answers each scenario's question for a variant."""
    if row["runs"] == 0:
        return f"failed: {row['error']}"[:60]
    if scenario == "recurrence":
        low, high = row["solved_interval"]
        return f"solved {row['solved']}/{row['runs']} [{pct(low)}-{pct(high)}]"
    if scenario == "learning_rate":
        return f"val loss {fmt(row['val_loss'])}"
    if scenario == "regularization":
        return f"gap {pct(row['generalization_gap'])}, |w| {fmt(row['final_weight_norm'])}"
    return f"test acc {pct(row['test_accuracy'])}"


def summary_rows(records: list[Record]) -> list[list[str]]:
    """[scenario, variant, diverged, key result, final loss, largest |g|] per variant, in grid order."""
    grouped: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        config = record["config"]
        grouped.setdefault((config["scenario"], config.get("part", "")), []).append(record)
    lines = []
    for (scenario, part), group in grouped.items():
        for row in summarize(group):
            name = scenario if not part else f"{scenario} ({part})"
            lines.append([
                name, row["variant"], f"{row['diverged']}/{row['runs']}", headline(scenario, row),
                fmt(row["final_loss"]), fmt(row["max_grad_norm"]),
            ])
    return lines


def print_summary(records: list[Record], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for header in ("scenario", "variant", "diverged", "key result", "final loss", "largest |g|"):
        table.add_column(header, justify="left" if header in ("scenario", "variant", "key result") else "right")
    previous = None
    for line in summary_rows(records):
        table.add_row(line[0] if line[0] != previous else "", *line[1:])
        previous = line[0]
    console.print(table)

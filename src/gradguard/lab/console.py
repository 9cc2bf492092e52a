"""The lab's one-screen summary on the terminal: one line per variant, the scenario's key numbers."""

from __future__ import annotations

from typing import Any

from gradguard.lab.findings import fmt, pct
from gradguard.lab.scenarios import Record
from gradguard.lab.summary import summarize


def headline(scenario: str, row: dict[str, Any]) -> str:
    """The one number that answers each scenario's question for a variant."""
    if row["runs"] == 0:
        return f"{row['errors']} failed (see report)"
    if scenario == "recurrence" and "solved" not in row:  # the healthy language model: no task to solve
        clipped = f", clipped {row['clipped']} steps" if "clipped" in row else ""
        return f"test loss {fmt(row.get('test_loss'))}{clipped}"
    if scenario == "recurrence":
        low, high = row["solved_interval"]
        return f"solved {row['solved']}/{row['runs']} (CI {100 * low:.0f}-{100 * high:.0f}%)"
    if scenario == "learning_rate":
        return f"val loss {fmt(row['val_loss'])}"
    if scenario == "transformers":
        return f"val loss {fmt(row['val_loss'])}, attn logit {fmt(row.get('max_attn_logit'))}"
    if scenario == "regularization":
        return f"gap {pct(row['generalization_gap'])} |w| {fmt(row['final_weight_norm'])}"
    return f"test acc {pct(row['test_accuracy'])}"


def diverged_cell(row: dict[str, Any]) -> str:
    text = f"{row['diverged']}/{row['runs']}"
    return text + (f" ({row['recovered']} rec.)" if row.get("recovered") else "")


def summary_rows(records: list[Record]) -> list[list[str]]:
    """[scenario, variant, diverged, key result, largest |g|] per variant, in grid order."""
    grouped: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        config = record["config"]
        grouped.setdefault((config["scenario"], config.get("part", "")), []).append(record)
    lines = []
    for (scenario, part), group in grouped.items():
        for row in summarize(group):
            name = scenario if not part else f"{scenario}: {part.split(',')[0].replace(' problem', '')}"
            lines.append([
                name, row["variant"], diverged_cell(row), headline(scenario, row),
                fmt(row["max_grad_norm"]),
            ])
    return lines


def print_summary(records: list[Record], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title="gradguard lab summary",
                  caption="diverged: runs that diverged (rec.: recovered by the end) / runs; max |g|: largest "
                  "gradient norm over seeds")
    table.add_column("variant", no_wrap=True, min_width=20)
    table.add_column("diverged", justify="right", no_wrap=True)
    table.add_column("key result", no_wrap=True)
    table.add_column("max |g|", justify="right", no_wrap=True)
    previous = None
    for line in summary_rows(records):
        if line[0] != previous:
            table.add_row(f"[bold underline]{line[0]}[/bold underline]", "", "", "")
            previous = line[0]
        table.add_row("  " + line[1], *line[2:])
    console.print(table)

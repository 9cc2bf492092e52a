"""``results.json`` (every run's record, curves included) and ``results.csv`` (one row per run, scalars only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from gradguard.lab.scenarios import Record

CONFIG_COLUMNS = ("scenario", "part", "variant", "seed")
SKIPPED_KEYS = ("config", "curves", "layer_flow", "traceback", "remedy_summary")


def write_json(records: list[Record], path: Path) -> Path:
    path.write_text(json.dumps({"runs": records}, indent=1, allow_nan=False))
    return path


def flat_row(record: Record) -> dict[str, Any]:
    """A record's config identifiers and scalar results; the remedy's counters as ``remedy_<name>``."""
    row: dict[str, Any] = {key: record["config"].get(key, "") for key in CONFIG_COLUMNS}
    for key, value in record.items():
        if key not in SKIPPED_KEYS and not isinstance(value, (dict, list)):
            row[key] = value
    for key, value in (record.get("remedy_summary") or {}).items():
        row[f"remedy_{key}"] = value
    return row


def write_csv(records: list[Record], path: Path) -> Path:
    rows = [flat_row(record) for record in records]
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path

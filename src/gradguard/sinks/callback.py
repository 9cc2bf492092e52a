"""The callback sink: a function called with each flushed record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradguard.sinks import Record


class Callback:
    """Calls ``fn(record)`` for each flushed record, oldest first."""

    def __init__(self, fn: Callable[[Record], Any]):
        if not callable(fn):
            raise ValueError(f"Callback: fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self.fn(record)

    def close(self) -> None:
        pass

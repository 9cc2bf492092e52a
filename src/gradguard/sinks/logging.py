"""The Python ``logging`` sink.

This module is ``gradguard.sinks.logging``; ``import logging`` below is the standard library's (imports are
absolute), which is why the class is reached as ``gradguard.sinks.Logging``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gradguard.sinks import Record


class Logging:
    """Logs through Python ``logging``: each event at WARNING, and one summary line per flush at ``level``.

    Args:
        logger: a ``logging.Logger`` or the name of one (default ``"gradguard"``).
        level: level of the per-flush summary line.
    """

    def __init__(self, logger: logging.Logger | str = "gradguard", level: int = logging.INFO):
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        for record in records:
            for event in record["events"]:
                values = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("step", "kind"))
                self.logger.warning("step %d: %s (%s)", event["step"], event["kind"], values)
        last = records[-1]
        skipped = sum(r["skipped"] for r in records)
        clipped = sum(r["clipped"] for r in records)
        self.logger.log(
            self.level,
            "steps %d-%d: loss %.4g, grad norm %.4g, %d skipped, %d clipped, lr %.3g",
            records[0]["step"],
            last["step"],
            last["loss"],
            last["total_norm"],
            skipped,
            clipped,
            last["lr"],
        )

    def close(self) -> None:
        pass

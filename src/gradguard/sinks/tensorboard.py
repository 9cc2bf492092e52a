"""The TensorBoard sink (``torch.utils.tensorboard``, imported when a writer is made)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from gradguard.sinks import Record, scalars_of


class TensorBoard:
    """Writes the records to TensorBoard with ``torch.utils.tensorboard.SummaryWriter``.

    Tags are those of :func:`scalars_of`; each event of a step also becomes a text entry. Needs the
    ``tensorboard`` package (``pip install gradguard[tensorboard]``).

    Args:
        log_dir: the run's folder (``tensorboard --logdir`` over its parent), or
        writer: an existing ``SummaryWriter`` (e.g. Lightning's ``TensorBoardLogger.experiment``), which
            ``close()`` leaves open.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, writer: Any = None):
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoard: give exactly one of log_dir and writer")
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert log_dir is not None
            writer = SummaryWriter(log_dir=os.fspath(log_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            for tag, value in scalars_of(record).items():
                self.writer.add_scalar(tag, value, record["step"])
            for event in record.get("events", ()):
                details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("step", "kind"))
                self.writer.add_text(f"gradguard_events/{event['kind']}", details, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()

"""Sinks: where the Guard's flushed history goes.

A sink is any object with ``write(records)`` and ``close()`` (the :class:`Sink` protocol). The Guard calls
``write`` every ``log_every`` steps with the records flushed since the last call, oldest first, and
``close`` from ``guard.close()``. Records are plain dicts, one per optimizer step, in the format documented
in :mod:`gradguard.history` (step, loss, total_norm, coef, clip_threshold, skipped, clipped, lr, events,
and layer_norms every ``layer_every`` steps). A sink must not keep references it mutates: the same dicts
go to every sink and to ``guard.history``.

Sinks here: :class:`JSONL` (a file), :class:`Logging` (Python ``logging``), :class:`Callback` (a function),
:class:`TensorBoard`. A new one implements the two methods::

    class Print:
        def write(self, records):
            for r in records:
                print(r["step"], r["total_norm"], [e["kind"] for e in r["events"]])
        def close(self):
            pass
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol, runtime_checkable

from gradguard.history import StepRecord

#: What a sink receives: one record per guarded step (the schema: :class:`gradguard.history.StepRecord`).
Record = StepRecord

__all__ = ["JSONL", "Callback", "Logging", "Record", "Sink", "TensorBoard", "scalars_of"]


@runtime_checkable
class Sink(Protocol):
    """Receives flushed history records."""

    def write(self, records: Sequence[Record]) -> None:
        """Take the records flushed since the last call, oldest first."""

    def close(self) -> None:
        """Release files or writers; called once, by ``Guard.close()``."""


class JSONL:
    """Writes one JSON object per line (JSON Lines). NaN and infinities are written as ``NaN`` and
    ``Infinity``, as Python's ``json`` does (``json.loads`` reads them back).

    Args:
        path: the file; its folder is created. It is opened here, so that a path that cannot be written
            fails now (``ValueError`` naming it), not at the first flush.
        append: add to an existing file (a resumed run) instead of starting a new one.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        try:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._file: IO[str] | None = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise ValueError(f"JSONL: cannot write path {self.path!r}: {error.strerror or error}") from error

    def write(self, records: Sequence[Record]) -> None:
        if self._file is None:  # written to after close(): append, never truncate what was written
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the rows not yet flushed by the Guard

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JSONL({self.path!r})"


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


def scalars_of(record: Record) -> dict[str, float]:
    """The scalars of a record under the tags every logging integration uses.

    ``gradguard/{loss, total_norm, coef, clip_threshold, skipped, clipped, lr}`` and, on steps that carry
    per-layer norms, ``gradguard_layers/<layer>``: one tag prefix, so TensorBoard shows the layers as one group.
    Booleans become 0/1; a missing loss or threshold is left out; NaN and Inf are kept.
    """
    scalars = {}
    values = {"loss": record.get("loss"), "total_norm": record.get("total_norm"), "coef": record.get("coef"),
              "clip_threshold": record.get("clip_threshold"), "lr": record.get("lr")}
    for key, value in values.items():
        if value is not None:
            scalars[f"gradguard/{key}"] = float(value)
    for key in ("skipped", "clipped"):
        scalars[f"gradguard/{key}"] = float(bool(record.get(key)))
    for name, norm in (record.get("layer_norms") or {}).items():
        scalars[f"gradguard_layers/{name}"] = float(norm)
    return scalars


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

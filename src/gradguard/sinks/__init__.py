"""Sinks: where the Guard's flushed history goes.

A sink is any object with ``write(records)`` and ``close()`` (the :class:`Sink` protocol). The Guard calls
``write`` every ``log_every`` steps with the records flushed since the last call, oldest first, and
``close`` from ``guard.close()``. Records are plain dicts, one per optimizer step, in the format documented
in :mod:`gradguard.history` (step, loss, total_norm, coef, clip_threshold, skipped, clipped, lr, events,
and layer_norms every ``layer_every`` steps). A sink must not keep references it mutates: the same dicts
go to every sink and to ``guard.history``.

Sinks here, one module each (a tracker's library is imported only when its sink is made): :class:`JSONL`
(``jsonl.py``, a file), :class:`Logging` (``logging.py``, Python ``logging``), :class:`Callback`
(``callback.py``, a function), :class:`TensorBoard` (``tensorboard.py``). A new one implements the two methods::

    class Print:
        def write(self, records):
            for r in records:
                print(r["step"], r["total_norm"], [e["kind"] for e in r["events"]])
        def close(self):
            pass
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from gradguard.history import StepRecord

#: What a sink receives: one record per guarded step (the schema: :class:`gradguard.history.StepRecord`).
Record = StepRecord

__all__ = ["JSONL", "Callback", "Layers", "Logging", "MLflow", "Record", "Sink", "TensorBoard", "WandB",
           "event_scalars", "scalars_of", "step_scalars"]


@runtime_checkable
class Sink(Protocol):
    """Receives flushed history records.

    A sink is a side channel: the Guard calls ``write`` and ``close`` inside a ``try``, so an exception
    from a sink never stops training nor replaces the Guard's own ``TrainingDiverged``; the first failure
    of each sink is warned (naming the sink and the error) and the records it failed to take are counted
    in ``guard.summary()["dropped_records"]``. On a give-up path the Guard restores the last good snapshot
    before any sink runs. A sink should still fail early where it can (``JSONL`` opens its file when made).
    """

    def write(self, records: Sequence[Record]) -> None:
        """Take the records flushed since the last call, oldest first."""

    def close(self) -> None:
        """Release files or writers; called once, by ``Guard.close()``."""


def step_scalars(record: Record) -> dict[str, float]:
    """The step's own scalars: ``gradguard/{loss, total_norm, coef, clip_threshold, skipped, clipped, lr}``
    and ``gradguard/{rollback, lr_backoff}`` (how many of these actions the step carries, 0 on most steps).

    ``gradguard/skipped`` is there on every step, 0 or 1: the "step skipped" series MaxText and OLMo-core
    log. Booleans become 0/1; a missing loss or threshold is left out; NaN and Inf are kept.
    """
    scalars = {}
    values = {"loss": record.get("loss"), "total_norm": record.get("total_norm"), "coef": record.get("coef"),
              "clip_threshold": record.get("clip_threshold"), "lr": record.get("lr")}
    for key, value in values.items():
        if value is not None:
            scalars[f"gradguard/{key}"] = float(value)
    for key in ("skipped", "clipped"):
        scalars[f"gradguard/{key}"] = float(bool(record.get(key)))
    kinds = [event["kind"] for event in record.get("events") or ()]
    for kind in ("rollback", "lr_backoff"):
        scalars[f"gradguard/{kind}"] = float(kinds.count(kind))
    return scalars


def event_scalars(record: Record) -> dict[str, float]:
    """One scalar per event of the step, ``gradguard_events/<kind>/<layer>`` (``gradguard_events/<kind>``
    when the event names no layer), valued the number of such events (1): a tracker that only plots
    numbers shows which layer a skipped step blamed, at its step."""
    scalars: dict[str, float] = {}
    for event in record.get("events") or ():
        tag = f"gradguard_events/{event['kind']}" + (f"/{event['layer']}" if event.get("layer") else "")
        scalars[tag] = scalars.get(tag, 0.0) + 1.0
    return scalars


def scalars_of(record: Record) -> dict[str, float]:
    """The scalars of a record under the tags every logging integration uses.

    :func:`step_scalars`, :func:`event_scalars` and, on steps that carry per-layer norms,
    ``gradguard_layers/<layer>``: one tag prefix, so TensorBoard shows the layers as one group. (The W&B
    and MLflow sinks give a scalar to some layers only and summarise the rest: ``gradguard.sinks.Layers``.)
    """
    scalars = {**step_scalars(record), **event_scalars(record)}
    for name, norm in (record.get("layer_norms") or {}).items():
        scalars[f"gradguard_layers/{name}"] = float(norm)
    return scalars


# The sinks, each in its own module; imported after Record and scalars_of, which they use.
from gradguard.sinks.callback import Callback  # noqa: E402
from gradguard.sinks.jsonl import JSONL  # noqa: E402
from gradguard.sinks.layers import Layers  # noqa: E402
from gradguard.sinks.logging import Logging  # noqa: E402
from gradguard.sinks.mlflow import MLflow  # noqa: E402
from gradguard.sinks.tensorboard import TensorBoard  # noqa: E402
from gradguard.sinks.wandb import WandB  # noqa: E402

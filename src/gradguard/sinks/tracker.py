"""What the tracker sinks (``gradguard.sinks.WandB``, ``gradguard.sinks.MLflow``) share.

* **Rank 0 only.** The flushed records are the same on every rank (the Guard all-reduces its statistics),
  so one rank logs them; the others' tracker sinks do nothing.
* **A tracker never stops training.** A tracker that cannot be reached when the sink is made, or that
  fails while logging, is reported by one :class:`TrackerWarning` (later failures are counted in
  ``sink.failures``, not warned again) and the run goes on: the JSON Lines log (``gradguard.sinks.JSONL``)
  stays the record of the run. A missing package is not such a failure: it raises ``ImportError`` with
  the install line, when the sink is made.
* **The run's own files at the end.** Each sink keeps the records it was given in a JSON Lines file of
  its own (a temporary folder, removed at ``close()``) and at ``close()`` uploads it with the run report
  rendered from it (``gradguard report``, :mod:`gradguard.report.run`), so that the tracker holds the whole
  run and the page that explains it.
* **Events as rows** of one table (:data:`EVENT_COLUMNS`, :func:`event_row`): kind, step, layer, action,
  and the forensics of the step (the layer where it starts, the samples responsible, reproducible?).

Everything here runs inside ``Guard.flush()`` or ``Guard.close()``, on host values: no tensor is read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from gradguard.sinks import Record
from gradguard.sinks.jsonl import JSONL


class TrackerWarning(UserWarning):
    """A tracker (W&B, MLflow) could not be reached or failed to log; training went on without it."""


#: Columns of the events table, in order; every value a string except ``step``.
EVENT_COLUMNS = ("step", "kind", "layer", "action", "details", "forensics_layer", "samples", "reproducible",
                 "origin")


def event_row(event: Any) -> list[Any]:
    """One event as a row of :data:`EVENT_COLUMNS` (``samples``: the ids forensics named, most responsible
    first, comma-separated; ``reproducible``: ``"yes"``, ``"no"`` or ``""`` when not recomputed)."""
    details = {k: v for k, v in event.items() if k not in ("step", "kind", "layer", "action", "forensics")}
    forensics = event.get("forensics") or {}
    origin = forensics.get("origin") or {}
    reproducible = forensics.get("reproducible")
    return [
        int(event["step"]),
        str(event["kind"]),
        str(event.get("layer") or ""),
        str(event.get("action") or ""),
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items()),
        str(forensics.get("layer") or ""),
        ", ".join(str(s) for s in forensics.get("samples") or ()),
        "" if reproducible is None else "yes" if reproducible else "no",
        f"{origin.get('kind', '')} from {origin.get('module', '')} ({origin.get('phase', '')})" if origin else "",
    ]


def is_rank_zero() -> bool:
    """Whether this process logs: not distributed, or rank 0 of the default group."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class Tracker:
    """The part of a tracker sink that does not depend on the tracker: rank 0, failing soft, the run's
    JSON Lines copy and report. A subclass connects in its ``__init__`` (inside :meth:`_connect`) and
    implements :meth:`_log` (one flush), :meth:`_upload` (the run's files at close) and :meth:`_end`.

    Args:
        owner: the sink's name in messages (``"WandB"``).
        report: upload the run report (HTML) and the records (JSON Lines) at ``close()``.
    """

    def __init__(self, owner: str, report: bool):
        self.owner = owner
        self.report = report
        self.active = is_rank_zero()
        self.failures = 0
        #: the run so far as ``guard.summary()`` counts it (from the records written to this sink)
        self.totals = {"steps": 0, "skipped": 0, "clipped": 0, "rollbacks": 0, "lr_backoffs": 0}
        self._files: str | None = None
        self._jsonl: JSONL | None = None
        self._closed = False

    def _connect(self, connect: Any) -> None:
        """Run ``connect()`` (start or join the tracker's run); where it fails the sink logs nothing."""
        if not self.active:
            return
        try:
            connect()
        except Exception as error:
            self.active = False
            self.failures += 1
            warnings.warn(
                f"{self.owner}: could not start or join a run ({type(error).__name__}: {error}); this sink logs "
                "nothing and training goes on (keep a gg.sinks.JSONL: it is the record of the run)",
                TrackerWarning, stacklevel=3,
            )

    def _failed(self, what: str, error: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            warnings.warn(
                f"{self.owner}: {what} failed ({type(error).__name__}: {error}); training goes on (the "
                "JSON Lines log keeps the run); later failures of this sink are counted in .failures",
                TrackerWarning, stacklevel=3,
            )

    def write(self, records: Sequence[Record]) -> None:
        if not self.active or self._closed or not records:
            return
        for record in records:
            kinds = [event["kind"] for event in record["events"]]
            self.totals["steps"] += 1
            self.totals["skipped"] += bool(record["skipped"])
            self.totals["clipped"] += bool(record["clipped"])
            self.totals["rollbacks"] += kinds.count("rollback")
            self.totals["lr_backoffs"] += kinds.count("lr_backoff")
        try:
            if self.report:
                if self._jsonl is None:
                    self._files = tempfile.mkdtemp(prefix="gradguard-tracker-")
                    self._jsonl = JSONL(os.path.join(self._files, "run.jsonl"))
                self._jsonl.write(records)
            self._log(records)
        except Exception as error:
            self._failed("logging a flush", error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        try:
            if self._jsonl is not None:
                self._jsonl.close()
                self._upload(self._run_files())
        except Exception as error:
            self._failed("uploading the run's files", error)
        try:
            self._end()
        except Exception as error:
            self._failed("ending the run", error)
        finally:
            if self._files is not None:
                shutil.rmtree(self._files, ignore_errors=True)

    def _run_files(self) -> list[str]:
        """The records' JSON Lines file and, where the report's packages are installed, the report."""
        assert self._jsonl is not None
        paths = [self._jsonl.path]
        try:
            from gradguard.report.run import read_jsonl, render_run_report
        except ImportError as error:  # jinja2 / matplotlib: gradguard[report]
            warnings.warn(f"{self.owner}: no run report ({error}); pip install 'gradguard[report]'",
                          TrackerWarning, stacklevel=3)
            return paths
        report = os.path.join(os.path.dirname(self._jsonl.path), "report.html")
        with open(report, "w", encoding="utf-8") as file:
            file.write(render_run_report(read_jsonl(self._jsonl.path)))
        return [*paths, report]

    def _log(self, records: Sequence[Record]) -> None:
        raise NotImplementedError

    def _upload(self, paths: list[str]) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

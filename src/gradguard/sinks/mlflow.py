"""The MLflow sink: ``gg.sinks.MLflow()``.

::

    guard = gg.Guard(model, optimizer, sinks=[gg.sinks.JSONL("run.jsonl"), gg.sinks.MLflow()])

What a run holds (each flush, every ``log_every`` steps, inside ``Guard.flush()``: no host read per step):

* metrics at the Guard's step (the optimizer step, from 0; MLflow takes any step order): the step's scalars
  (:func:`gradguard.sinks.step_scalars`: ``gradguard/loss``, ``total_norm``, ``coef``, ``clip_threshold``,
  ``skipped`` (0/1, every step), ``clipped``, ``lr``, ``rollback``, ``lr_backoff``), its events
  (:func:`gradguard.sinks.event_scalars`: ``gradguard_events/<kind>/<layer>``), and on steps with per-layer
  norms their summary (``gradguard/layer_norm_p50``, ``layer_norm_p99``, ``layer_norm_max``,
  ``layers_nonfinite``) and ``gradguard_layers/<layer>`` for the layers :class:`gradguard.sinks.Layers`
  picks. They go through ``MlflowClient.log_batch``, at most 1000 metrics a request (MLflow's limit);
* ``gradguard/events.json``: every event (:data:`gradguard.sinks.tracker.EVENT_COLUMNS`, the forensics of
  the step included) as a table (``{"columns", "data"}``, as ``mlflow.log_table`` writes one), rewritten at
  each flush that adds events;
* at ``close()``: ``gradguard/run.jsonl`` (the records) and ``gradguard/report.html`` (the run report of
  ``gradguard report``) as artifacts, and the counts of ``guard.summary()`` as tags
  (``gradguard.skipped`` ...).

The tracking store is MLflow's: ``tracking_uri=`` or else ``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri``
(e.g. ``sqlite:///mlflow.db``, a local store; MLflow 3 keeps the plain ``mlruns/`` folder store in
maintenance mode). MLflow is imported when the sink is made (``pip install 'gradguard[mlflow]'``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from gradguard.sinks import Record, event_scalars, step_scalars
from gradguard.sinks.layers import Layers
from gradguard.sinks.tracker import EVENT_COLUMNS, Tracker, event_row

#: At most this many metrics in one ``log_batch`` request (MLflow's ``MAX_METRICS_PER_BATCH``).
BATCH = 1000

_NOT_IN_A_KEY = re.compile(r"[^/\w.\- ]")  # what MLflow refuses in a metric name (a colon too, on Windows)


def metric_key(tag: str) -> str:
    """A tag as an MLflow metric name: a character MLflow refuses becomes ``_``."""
    return _NOT_IN_A_KEY.sub("_", tag)


class MLflow(Tracker):
    """Logs the Guard's records to an MLflow run.

    Args:
        run_id: the run to log to. None: the active run (``mlflow.active_run()``, when ``tracking_uri`` is
            not given), else a run this sink creates in ``experiment`` and ends at ``close()``. A run the sink
            did not create is never ended by it.
        tracking_uri: the tracking store (None: MLflow's configured one).
        experiment: the experiment's name for a run the sink creates (made when missing; None: MLflow's
            default experiment).
        artifact_location: where a new experiment keeps its artifacts (None: MLflow's default, which for a
            local store is ``./mlruns`` under the current folder).
        run_name: the name of a run the sink creates.
        layers: which layers get a metric of their own (default: the 8 largest norms of each layer step, a
            non-finite one always first); every layer is summarised.
        report: upload the records and the run report at ``close()``.

    Where the store cannot be reached or fails later, one ``TrackerWarning`` says so and training goes on
    (``gradguard.sinks.tracker``).
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 experiment: str | None = None, artifact_location: str | None = None, run_name: str | None = None,
                 layers: Layers | None = None, report: bool = True):
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("MLflow: the mlflow package is not installed: pip install 'gradguard[mlflow]'") from None
        if run_id is not None and (experiment is not None or run_name is not None or artifact_location is not None):
            raise ValueError("MLflow: give either run_id or experiment / artifact_location / run_name (for a new "
                             "run), not both")
        super().__init__("MLflow", report)
        self._metric = Metric
        self.layers = layers if layers is not None else Layers()
        self.client: Any = None
        self.run_id = run_id
        self.owns_run = False
        self._events: list[list[Any]] = []

        def connect() -> None:
            self.client = MlflowClient(tracking_uri)
            active = mlflow.active_run() if tracking_uri is None else None
            if self.run_id is None and active is not None:
                self.run_id = active.info.run_id
            if self.run_id is None:
                experiment_id = None
                if experiment is not None:
                    found = self.client.get_experiment_by_name(experiment)
                    experiment_id = found.experiment_id if found else self.client.create_experiment(
                        experiment, artifact_location=artifact_location)
                self.run_id = self.client.create_run(experiment_id or "0", run_name=run_name).info.run_id
                self.owns_run = True
            else:
                self.client.get_run(self.run_id)  # fails now, not at the first flush, on an unknown run

        self._connect(connect)

    def _log(self, records: Sequence[Record]) -> None:
        now = int(time.time() * 1000)
        metrics = []
        new_events = False
        for record in records:
            values = {**step_scalars(record), **event_scalars(record)}
            norms = record.get("layer_norms")
            if norms:
                values.update({f"gradguard_layers/{name}": norm for name, norm in self.layers.pick(norms).items()})
                values.update({f"gradguard/{key}": value for key, value in Layers.summary(norms).items()})
            metrics += [self._metric(metric_key(key), value, now, record["step"]) for key, value in values.items()]
            for event in record["events"]:
                self._events.append(event_row(event))
                new_events = True
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])
        if new_events:
            self.client.log_dict(self.run_id, {"columns": list(EVENT_COLUMNS), "data": self._events},
                                 "gradguard/events.json")

    def _upload(self, paths: list[str]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, path, "gradguard")

    def _end(self) -> None:
        if self.client is None or self.run_id is None:
            return
        for key, value in self.totals.items():
            self.client.set_tag(self.run_id, f"gradguard.{key}", str(value))
        if self.owns_run:
            self.client.set_terminated(self.run_id)

    def __repr__(self) -> str:
        return f"MLflow(run_id={self.run_id!r})"

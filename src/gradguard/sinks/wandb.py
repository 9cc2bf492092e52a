"""The Weights & Biases sink: ``gg.sinks.WandB()``.

::

    guard = gg.Guard(model, optimizer, sinks=[gg.sinks.JSONL("run.jsonl"), gg.sinks.WandB(project="my-run")])

What a run holds (each flush, every ``log_every`` steps, inside ``Guard.flush()``: no host read per step):

* one history row per guarded step, on the Guard's step axis ``gradguard/step`` (the optimizer step, from 0;
  every ``gradguard*`` chart is drawn against it through ``run.define_metric``): the step's scalars
  (:func:`gradguard.sinks.step_scalars`: loss, total norm, clip coefficient and threshold, skipped (0/1,
  every step), clipped, LR, rollbacks, LR back-offs) and its events (:func:`gradguard.sinks.event_scalars`:
  ``gradguard_events/<kind>/<layer>``);
* on steps with per-layer norms (``layer_every``): a histogram of log10 of the finite layer norms
  (``gradguard/layer_norms_log10``, at most 512 bins, W&B's limit), the summary of
  :meth:`gradguard.sinks.Layers.summary` (``gradguard/layer_norm_p50`` ... ``gradguard/layers_nonfinite``)
  and one series ``gradguard_layers/<layer>`` for the layers :class:`gradguard.sinks.Layers` picks;
* ``gradguard/events``: a table of every event (:data:`gradguard.sinks.tracker.EVENT_COLUMNS`, the forensics
  of the step included), logged incrementally (each flush adds its rows);
* at ``close()``: an artifact ``gradguard-<run id>`` of type ``gradguard-run`` holding ``run.jsonl`` (the
  records) and ``report.html`` (the run report of ``gradguard report``), and the counts of
  ``guard.summary()`` in the run summary (``gradguard_summary/skipped`` ...).

Why a step metric of its own and no ``step=``: the Guard flushes steps that are already in the past (up to
``log_every`` steps back), and W&B drops a row logged at a step below the run's current one. Rows without
``step=`` are never dropped; the charts use ``gradguard/step``, which is the user's optimizer step. In a
run of your own that also logs with an explicit ``step=``, define your metrics' axis the same way
(``run.define_metric("train/*", step_metric="train/step")``), since each gradguard row advances W&B's
internal ``_step``.

``WANDB_MODE=offline`` writes the run under ``WANDB_DIR`` for ``wandb sync`` to upload later. W&B is
imported when the sink is made (``pip install 'gradguard[wandb]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradguard.sinks import Record, event_scalars, step_scalars
from gradguard.sinks.layers import Layers
from gradguard.sinks.tracker import EVENT_COLUMNS, Tracker, event_row

#: The x-axis of every gradguard chart: the Guard's step.
STEP_METRIC = "gradguard/step"


class WandB(Tracker):
    """Logs the Guard's records to a Weights & Biases run.

    Args:
        run: the run to log to. None: the active run (``wandb.run``) when there is one, else a run this
            sink starts with ``wandb.init(**init_kwargs)`` and finishes at ``close()``. A run the sink did
            not start is never finished by it.
        layers: which layers get a series of their own (default: the 8 largest norms of each layer step,
            a non-finite one always first).
        bins: bins of the layer-norm histogram, 1 to 512.
        report: upload the records and the run report as an artifact at ``close()``.
        **init_kwargs: for ``wandb.init`` (``project=``, ``name=``, ``config=``, ``dir=``, ...) when the sink
            starts the run.

    Where W&B cannot be reached (``wandb.init`` fails) or fails later, one ``TrackerWarning`` says so and
    training goes on (``gradguard.sinks.tracker``).
    """

    def __init__(self, run: Any = None, *, layers: Layers | None = None, bins: int = 64, report: bool = True,
                 **init_kwargs: Any):
        try:
            import wandb
        except ImportError:
            raise ImportError("WandB: the wandb package is not installed: pip install 'gradguard[wandb]'") from None
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 512:
            raise ValueError(f"WandB: bins must be an int from 1 to 512 (W&B's limit), got {bins!r}")
        if run is not None and init_kwargs:
            raise ValueError(f"WandB: give either run or wandb.init arguments, not both (got run and "
                             f"{', '.join(sorted(init_kwargs))})")
        super().__init__("WandB", report)
        self._wandb = wandb
        self.layers = layers if layers is not None else Layers()
        self.bins = bins
        self.run: Any = None
        self.owns_run = False
        self._table: Any = None
        self._connect(lambda: self._start(run, init_kwargs))

    def _start(self, run: Any, init_kwargs: dict[str, Any]) -> None:
        wandb = self._wandb
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self.owns_run = True
        self.run = run
        run.define_metric(STEP_METRIC)
        for prefix in ("gradguard/*", "gradguard_layers/*", "gradguard_events/*"):
            run.define_metric(prefix, step_metric=STEP_METRIC)
        self._table = wandb.Table(columns=list(EVENT_COLUMNS), log_mode="INCREMENTAL")

    def _log(self, records: Sequence[Record]) -> None:
        new_events = False
        for i, record in enumerate(records):
            row: dict[str, Any] = {STEP_METRIC: record["step"], **step_scalars(record), **event_scalars(record)}
            norms = record.get("layer_norms")
            if norms:
                row.update({f"gradguard_layers/{name}": norm for name, norm in self.layers.pick(norms).items()})
                row.update({f"gradguard/{key}": value for key, value in Layers.summary(norms).items()})
                histogram = self._histogram(norms.values())
                if histogram is not None:
                    row["gradguard/layer_norms_log10"] = histogram
            for event in record["events"]:
                self._table.add_data(*event_row(event))
                new_events = True
            if new_events and i == len(records) - 1:
                row["gradguard/events"] = self._table
            self.run.log(row)

    def _histogram(self, norms: Any) -> Any:
        """W&B's histogram of log10 of the finite, positive norms (the norms of a model's layers span
        decades: on a linear axis all but the largest share the first bin). None when there is none."""
        logs = [math.log10(n) for n in norms if math.isfinite(n) and n > 0]
        if not logs:
            return None
        return self._wandb.Histogram(np_histogram=np.histogram(logs, bins=self.bins))

    def _upload(self, paths: list[str]) -> None:
        artifact = self._wandb.Artifact(f"gradguard-{self.run.id}", type="gradguard-run",
                                        description="gradguard: the run's records (run.jsonl) and report")
        for path in paths:
            artifact.add_file(path)
        self.run.log_artifact(artifact)

    def _end(self) -> None:
        if self.run is None:
            return
        self.run.summary.update({f"gradguard_summary/{key}": value for key, value in self.totals.items()})
        if self.owns_run:
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandB(run={getattr(self.run, 'id', None)!r})"

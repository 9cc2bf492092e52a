"""History: a bounded ring buffer of per-step scalars on the device, read by the host in one copy.

Each guarded step writes one row of ``FIELDS`` (float32; float64 when the norms are) into a ``(capacity, len(FIELDS))`` tensor on the
gradients' device, and every ``layer_every`` steps one row of per-layer norms into a second ring. Writing
is a device copy; nothing is read. :meth:`History.drain` copies the filled rows to the host at once (the
only host read of the monitoring path) and :func:`to_record` turns each into a :class:`StepRecord`::

    {
        "step": int,                  # optimizer step (accumulation boundary), from 0
        "loss": float,                # loss passed to guard.step (summed over accumulated micro-batches)
        "total_norm": float,          # global gradient norm before clipping (NaN/inf when not finite)
        "action": str,                # what was done with the step: "step", "clip" or "skip" (a skip wins)
        "coef": float,                # factor applied to the gradients (1.0: not clipped, or skipped)
        "clip_threshold": float|None, # the total norm allowed this step: total_norm * coef when clipped,
                                      # else the known ceiling (GlobalNorm's max_norm, the spike threshold
                                      # when spikes are clipped); None when there is none
        "skipped": bool,              # the optimizer did not update (parameters and its state unchanged)
        "clipped": bool,              # the gradients were scaled down (never on a skipped step)
        "lr": float,                  # learning rate of the first parameter group at this step
        "events": [                   # what the detector saw, and what the Guard did about it
            {"step": int, "kind": str, "layer": str|None, "action": str, ...values},
        ],
        "layer_norms": {name: float}, # only on steps that are multiples of layer_every
    }

Event kinds are those of ``gradguard.detect.EVENT_KINDS`` plus the Guard's own actions ``"lr_backoff"``,
``"lr_recover"``, ``"rollback"`` and ``"loss_relevel"`` (action ``"relevel"``), and ``"data_outlier"`` (``gradguard.forensics.DataWatch``: samples,
scores, losses; action ``"log"``). Their values: ``nonfinite_grad``: total_norm; ``nonfinite_loss``: loss;
``grad_spike``: total_norm, z, threshold; ``loss_spike``: loss, z; ``growth``: total_norm, rate (per-step
factor); ``precursor``: total_norm, signal (``"weight_growth"``, ``"weight_acceleration"`` or ``"grad_climb"``),
factor, advice (``gradguard.precursor``); ``update_jump``: ratio (the step's predicted
``||dW|| / ||W||``), usual, advice (``gradguard.update_size``); ``update_size``: ratio (the layer's smoothed
update size), advice; ``nonfinite_param``: none (layer is the parameter's name); ``lr_backoff`` and ``lr_recover``:
lr_before, lr_after; ``rollback``: reason, to_step, lr_before, lr_after; ``loss_relevel``: reason, loss_before, loss_after
(``gradguard.recover``: the loss's level moved, not the weights). With ``gg.Forensics``, the events
of kinds ``nonfinite_grad``, ``nonfinite_loss``, ``grad_spike`` and ``loss_spike`` also hold ``forensics``:
``{"layer", "samples", "scores", "reproducible", "origin", "bundle", ...}`` (``gradguard.forensics``). ``action`` is what was done about
the event (``"log"``, ``"clip"``, ``"skip"``, ``"rollback"``, ``"raise"``: the configured response, except
that a ``"clip"`` response on a skipped step is ``"skip"``), or the action's own name for the Guard's
actions. On the fused path, events of host actions are attached to the step whose row triggered them (or
to the last row of the flush).
Floats may be NaN or inf (the JSON Lines sink writes them as ``NaN`` / ``Infinity``, as ``json`` does).
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import torch
from torch import Tensor

from gradguard.decide import Responses
from gradguard.detect import Verdict, kinds_of
from gradguard.precursor import SIGNAL_NAMES, WEIGHT_ACCELERATION, WEIGHT_GROWTH
from gradguard.update_size import UpdateSizeVerdict


class _EventKeys(TypedDict):
    step: int
    kind: str
    layer: str | None
    action: str


class Event(_EventKeys, total=False):
    """One event of a :class:`StepRecord` (the values present depend on the kind, see the module docstring)."""

    total_norm: float
    loss: float
    z: float
    threshold: float
    rate: float
    lr_before: float
    lr_after: float
    lr_scale: float  # lr_backoff / lr_recover: the LR cut in force after it (gradguard.recover)
    state: str  # lr_backoff / lr_recover / rollback: gradguard.recover.RecoveryState after the action
    reason: str
    to_step: int | None
    loss_before: float  # loss_relevel: the loss level before (the restored snapshot's loss; NaN: not known)
    loss_after: float  # loss_relevel: the level the losses on the restored weights moved to (gradguard.recover)
    forensics: dict[str, Any]  # gg.Forensics' analysis of the step (gradguard.forensics.ForensicsRecord)
    samples: list[Any]  # data_outlier: the flagged samples' ids (gradguard.forensics.DataWatch)
    scores: list[float]  # data_outlier: their robust z within the batch (< 0: suspiciously low loss)
    losses: list[float]  # data_outlier: their losses
    ratio: float
    usual: float
    advice: str
    signal: str  # precursor: "weight_growth", "weight_acceleration" or "grad_climb" (gradguard.precursor.SIGNAL_NAMES)
    factor: float  # precursor: how far above its threshold's baseline (growth, or norm over its floor)


class _StepKeys(TypedDict):
    step: int
    loss: float
    total_norm: float
    action: str
    coef: float
    clip_threshold: float | None
    skipped: bool
    clipped: bool
    lr: float
    events: list[Event]


class StepRecord(_StepKeys, total=False):
    """One guarded step, as flushed to ``guard.history`` and the sinks (see the module docstring)."""

    layer_norms: dict[str, float]


#: Columns of a history row, in order.
FIELDS = (
    "loss",
    "total_norm",
    "coef",
    "clip_threshold",
    "skipped",
    "clipped",
    "flags",  # bit i set: STEP_KINDS[i] was detected
    "grad_z",
    "loss_z",
    "spike_threshold",
    "growth_rate",
    "layer",
    "update_ratio",  # the predicted ||dW|| / ||W|| of the step (gradguard.update_size; NaN: none)
    "update_usual",  # its usual size
    "update_layer",  # the layer whose measured update size is furthest past its thresholds
    "update_layer_ratio",  # that layer's smoothed update size
    "precursor_signal",  # the early-warning signal above its threshold (gradguard.precursor.SIGNAL_NAMES; 0: none)
    "precursor_factor",  # how far above it
)
COLUMN = {name: i for i, name in enumerate(FIELDS)}


def _float_or_none(x: float) -> float | None:
    return None if math.isinf(x) and x > 0 else x


def history_row(loss: Tensor, verdict: Verdict, total_norm: Tensor, coef: Tensor, ceiling: Tensor, skip: Tensor,
                flags: Tensor, bits: Tensor, codes: Tensor, in_place: Tensor | None,
                update: UpdateSizeVerdict | None = None) -> tuple[Tensor, Tensor]:
    """One step's row of ``FIELDS`` (one ``stack``) and its ``[skipped, clipped]`` as floats, from the step's
    device tensors; a pure function. The row is float32, or float64 when the norms are (a float64 gradient
    of 1e100 has a finite norm, recorded as such).

    ``loss`` is the step's loss (NaN when none was given); ``flags`` are ``[skip, coef < 1, flag per kind]``,
    ``bits`` the same as floats and ``codes`` their two codes (the flags' own code second); ``in_place`` is the
    coefficient of a per-layer / per-element clip strategy that clipped the gradients itself, or None;
    ``update`` the update size's verdict, or None (its columns are then NaN)."""
    dtype = torch.float64 if total_norm.dtype == torch.float64 else torch.float32
    total = total_norm.to(dtype)
    skipped, clipped, was_clipped = bits[0], bits[1], flags[1]  # coef < 1 only on a real step
    coef = coef.to(dtype)
    counts = bits[:2]
    if in_place is not None:  # the recorded coefficient is the least of the two
        coef = torch.where(skip, coef, torch.minimum(coef, in_place.to(dtype)))
        was_clipped = coef < 1.0
        clipped = was_clipped.float()
        counts = torch.stack([skipped, clipped])
    values = {
        "loss": loss.reshape(()).to(device=total.device),
        "total_norm": total,
        "coef": coef,
        "clip_threshold": torch.where(was_clipped, total * coef, ceiling.to(dtype)),
        "skipped": skipped,
        "clipped": clipped,
        "flags": codes[1],
        "grad_z": verdict.grad_z,
        "loss_z": verdict.loss_z,
        "spike_threshold": verdict.spike_threshold,
        "growth_rate": verdict.growth_rate,
        "layer": verdict.layer,
        "precursor_signal": verdict.precursor_signal,
        "precursor_factor": verdict.precursor_factor,
    }
    if update is None:
        nan = torch.full((), math.nan, dtype=dtype, device=total.device)
        values.update(update_ratio=nan, update_usual=nan, update_layer=nan, update_layer_ratio=nan)
    else:
        values.update(update_ratio=update.predicted, update_usual=update.usual, update_layer=update.layer,
                      update_layer_ratio=update.layer_ratio)
    return torch.stack([values[name].to(dtype) for name in FIELDS]), counts


class History:
    """Bounded device ring buffer of per-step rows and periodic per-layer norms.

    Args:
        capacity: rows kept on the device; older unread rows are overwritten (the Guard drains every
            ``log_every`` steps and sizes the ring to that, so nothing is lost).
        layer_every: steps between two rows of per-layer norms (0: never).
    """

    def __init__(self, capacity: int, layer_every: int):
        self.capacity = capacity
        self.layer_every = layer_every
        self._rows: Tensor | None = None
        self._steps: list[int] = []  # host bookkeeping of the unread rows, oldest first
        self._lrs: list[float] = []
        self._names: list[list[str]] = []
        self._written = 0
        self._layer_rows: Tensor | None = None
        self._layer_steps: list[int] = []
        self._layer_names: list[str] = []
        self._layer_written = 0

    @property
    def pending(self) -> int:
        """Rows written and not yet drained."""
        return len(self._steps)

    def record(self, step: int, row: Tensor, lr: float, names: list[str], layer_norms: Tensor | None) -> None:
        """Write one step: ``row`` is a float32 (or float64) vector in ``FIELDS`` order (a device copy, no read)."""
        if self._rows is None or self._rows.device != row.device:
            self._rows = torch.zeros((self.capacity, len(FIELDS)), dtype=row.dtype, device=row.device)
        elif self._rows.dtype != row.dtype:  # float64 norms from now on: keep the unread rows, widened
            self._rows = self._rows.to(torch.promote_types(self._rows.dtype, row.dtype))
        self._rows[self._written % self.capacity] = row
        self._written += 1
        self._steps.append(step)
        self._lrs.append(lr)
        self._names.append(names)
        if len(self._steps) > self.capacity:  # overwritten on the device: forget it here too
            del self._steps[0], self._lrs[0], self._names[0]
        if layer_norms is not None and self.layer_every and step % self.layer_every == 0:
            self._record_layers(step, layer_norms, names)

    def loss_of(self, step: int) -> float | None:
        """The loss of ``step`` if its row is written and not yet drained (None otherwise): one host read of one
        value, for the rare moment that needs it before the flush (a rollback to a snapshot whose own step is
        not flushed yet, see ``Guard._put_loss_level``)."""
        if step not in self._steps:
            return None
        assert self._rows is not None
        back = len(self._steps) - self._steps.index(step)  # rows written since it, itself included
        return float(self._unread(self._rows, self._written, back)[0, FIELDS.index("loss")])

    def _record_layers(self, step: int, layer_norms: Tensor, names: list[str]) -> None:
        size = max(1, math.ceil(self.capacity / self.layer_every) + 1)
        reshape = self._layer_rows is None or self._layer_rows.shape != (size, layer_norms.numel())
        if reshape or names != self._layer_names:
            if self._layer_steps and names != self._layer_names:
                # a new set of layers; the unread rows of the old set are dropped (rare: frozen layers)
                self._layer_steps = []
            self._layer_rows = torch.zeros(
                (size, layer_norms.numel()), device=layer_norms.device,
                dtype=torch.float64 if layer_norms.dtype == torch.float64 else torch.float32
            )
            self._layer_names = list(names)
            self._layer_written = 0
        assert self._layer_rows is not None
        self._layer_rows[self._layer_written % size] = layer_norms.to(self._layer_rows.dtype)
        self._layer_written += 1
        self._layer_steps.append(step)
        if len(self._layer_steps) > size:
            del self._layer_steps[0]

    def _unread(self, rows: Tensor, written: int, count: int) -> Tensor:
        size = rows.shape[0]
        index = [(written - count + i) % size for i in range(count)]
        return rows[torch.tensor(index, device=rows.device)]

    def drain(self, extra: Tensor | None = None) -> tuple[list[dict[str, Any]], list[float]]:
        """Copy the unread rows (and ``extra``, a small 1-d float tensor) to the host in one transfer.

        Returns the raw rows (dicts of ``FIELDS`` plus ``step``, ``lr``, ``names`` and, when recorded,
        ``layer_norms``) and ``extra`` as floats.
        """
        pieces: list[Tensor] = []
        n = len(self._steps)
        if n:
            assert self._rows is not None
            pieces.append(self._unread(self._rows, self._written, n).flatten())
        n_layer = len(self._layer_steps)
        if n_layer:
            assert self._layer_rows is not None
            pieces.append(self._unread(self._layer_rows, self._layer_written, n_layer).flatten())
        if extra is not None:
            pieces.append(extra.flatten())
        if not pieces:
            return [], []
        device = pieces[0].device
        flat = torch.cat([p.to(device) for p in pieces]).cpu().numpy().tolist()  # the one host read

        width = len(FIELDS)
        rows: list[dict[str, Any]] = []
        for i in range(n):
            values = flat[i * width : (i + 1) * width]
            row: dict[str, Any] = dict(zip(FIELDS, values))
            row.update(step=self._steps[i], lr=self._lrs[i], names=self._names[i])
            rows.append(row)
        offset = n * width
        layers_of_step: dict[int, dict[str, float]] = {}
        n_names = len(self._layer_names)
        for j, step in enumerate(self._layer_steps):
            values = flat[offset + j * n_names : offset + (j + 1) * n_names]
            layers_of_step[step] = dict(zip(self._layer_names, values))
        offset += n_layer * n_names
        for row in rows:
            if row["step"] in layers_of_step:
                row["layer_norms"] = layers_of_step[row["step"]]
        self._steps, self._lrs, self._names, self._layer_steps = [], [], [], []
        return rows, flat[offset:]

    def state_dict(self) -> dict[str, Any]:
        """Unread rows included, so that a resumed run flushes exactly what the uninterrupted one does."""
        return {
            "rows": None if self._rows is None else self._rows.clone(),
            "steps": list(self._steps),
            "lrs": list(self._lrs),
            "names": [list(n) for n in self._names],
            "written": self._written,
            "layer_rows": None if self._layer_rows is None else self._layer_rows.clone(),
            "layer_steps": list(self._layer_steps),
            "layer_names": list(self._layer_names),
            "layer_written": self._layer_written,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state["rows"]
        if rows is not None and rows.shape[1] < len(FIELDS):  # saved before the last columns existed: NaN there
            rows = torch.cat([rows, rows.new_full((rows.shape[0], len(FIELDS) - rows.shape[1]), math.nan)], 1)
        self._rows = None if rows is None else rows.clone()
        self._steps, self._lrs = list(state["steps"]), list(state["lrs"])
        self._names = [list(n) for n in state["names"]]
        self._written = int(state["written"])
        self._layer_rows = None if state["layer_rows"] is None else state["layer_rows"].clone()
        self._layer_steps = list(state["layer_steps"])
        self._layer_names = list(state["layer_names"])
        self._layer_written = int(state["layer_written"])


def precursor_event(row: dict[str, Any], layer: str | None) -> tuple[str, float, str]:
    """A ``precursor`` event's signal, factor and advice: which signal fired, how far, what to do
    (``gradguard.precursor``)."""
    code = int(row["precursor_signal"]) if math.isfinite(row["precursor_signal"]) else 0
    signal = SIGNAL_NAMES.get(code, "unknown")
    factor = row["precursor_factor"]
    if code == WEIGHT_GROWTH:
        advice = (f"the weights' norm grew {factor:.3g} times since the last sample: the learning rate is too large "
                  "for the weights' scale (Wortsman et al. 2023); lower it or warm up longer (on a transformer: "
                  "qk-layernorm, z-loss); the layer whose gradient is furthest above its average is "
                  f"{layer}")
    elif code == WEIGHT_ACCELERATION:
        advice = (f"the weights' growth per sample sped up {factor:.3g} times over its slowest: the learning rate "
                  "is rising past the stable range (or a recurrent layer is blowing up); stop raising it, lower it, "
                  "or roll back before the climb (responses={'precursor': 'rollback'}); the layer whose gradient "
                  f"is furthest above its average is {layer}")
    else:
        advice = (f"the smoothed gradient norm climbed {factor:.3g} times above its floor, led by {layer}: the run "
                  "is turning unstable; lower the learning rate, or roll back before the climb "
                  "(responses={'precursor': 'rollback'})")
    return signal, factor, advice


def to_record(row: dict[str, Any], responses: Responses) -> StepRecord:
    """Turn a drained row into a :class:`StepRecord` (see the module docstring)."""
    names: list[str] = row["names"]
    layer_index = int(row["layer"])
    layer = names[layer_index] if 0 <= layer_index < len(names) else None
    step: int = row["step"]
    skipped = bool(row["skipped"])
    events: list[Event] = []
    for kind in kinds_of(int(row["flags"])):
        event: Event = {"step": step, "kind": kind, "layer": layer, "action": responses.taken(kind, skipped)}
        if kind in ("nonfinite_grad", "grad_spike", "growth", "precursor"):
            event["total_norm"] = row["total_norm"]
        if kind in ("nonfinite_loss", "loss_spike"):
            event["loss"] = row["loss"]
        if kind == "grad_spike":
            event["z"], event["threshold"] = row["grad_z"], row["spike_threshold"]
        if kind == "loss_spike":
            event["z"] = row["loss_z"]
        if kind == "growth":
            event["rate"] = row["growth_rate"]
        if kind == "precursor":
            event["signal"], event["factor"], event["advice"] = precursor_event(row, layer)
        if kind == "update_jump":
            event["layer"] = None  # the whole step: its learning rate
            event["ratio"], event["usual"] = row["update_ratio"], row["update_usual"]
            event["advice"] = (f"this step would move the weights {row['update_ratio']:.3g} of their norm, "
                               f"{row['update_ratio'] / row['update_usual']:.3g} times the usual "
                               f"{row['update_usual']:.3g}: the learning rate jumped (a burst, a schedule's "
                               "restart); the step is not taken while it lasts")
        if kind == "update_size":
            update_layer = int(row["update_layer"]) if math.isfinite(row["update_layer"]) else -1
            event["layer"] = names[update_layer] if 0 <= update_layer < len(names) else None
            event["ratio"] = row["update_layer_ratio"]
            event["advice"] = (f"each step moves {event['layer']} by {row['update_layer_ratio']:.3g} of its norm, "
                               "far above its usual: the learning rate is too large for these weights; lower it "
                               "(or warm up longer) before the run diverges")
        events.append(event)
    clipped = bool(row["clipped"])
    record: StepRecord = {
        "step": step,
        "loss": row["loss"],
        "total_norm": row["total_norm"],
        "action": "skip" if skipped else "clip" if clipped else "step",
        "coef": row["coef"],
        "clip_threshold": _float_or_none(row["clip_threshold"]),
        "skipped": skipped,
        "clipped": clipped,
        "lr": row["lr"],
        "events": events,
    }
    if "layer_norms" in row:
        record["layer_norms"] = row["layer_norms"]
    return record

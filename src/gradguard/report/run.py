"""The report of a monitored run: ``gradguard report RUN.jsonl -o report.html``.

Reads the records a :class:`gradguard.sinks.JSONL` sink wrote (format: :mod:`gradguard.history`) and
renders one self-contained page:

* the loss, with skipped, clipped, rollback and LR back-off steps marked on it;
* the total gradient norm (log scale) with the clip threshold over it;
* a heatmap of per-layer gradient norms (layer x step, log colour scale) in which NaN and Inf cells have
  their own colours, never dropped;
* the table of events, with each bad step's forensics (``gg.Forensics``): the layer where it starts, the
  samples responsible, whether it reproduced, its replay bundle.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, cast

import jinja2
import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gradguard.history import StepRecord as Record
from gradguard.report.figures import png_data_uri

NAN_COLOUR = "#e0009d"  # magenta: a layer norm that is NaN
INF_COLOUR = "#000000"  # black: a layer norm that is +Inf
MARKS = {  # how each kind of step is drawn on the loss and norm curves
    "skipped": {"color": "#d62728", "marker": "x", "label": "skipped step"},
    "clipped": {"color": "#ff7f0e", "marker": ".", "label": "clipped step"},
}


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """The records of a JSON Lines run log; NaN and Infinity are read back as floats.

    A last line that is not JSON is what a job killed while writing leaves: it is skipped with a
    ``UserWarning`` that names the file and line. A record whose ``"events"`` is null has no events.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line before the last that is not a JSON object with a ``step``; names the file and
            line number.
    """
    with open(path, encoding="utf-8") as file:
        lines = [(number, line) for number, line in enumerate(file, start=1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == lines[-1][0]:
                warnings.warn(f"{os.fspath(path)}:{number}: last line cut short ({error.msg}), skipped: the job "
                              "was probably killed while writing it", stacklevel=2)
                break
            raise ValueError(f"{os.fspath(path)}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(
                f"{os.fspath(path)}:{number}: expected a record with a 'step', got {line[:80]!r}"
            )
        records.append(cast(Record, record))
    return records


def _events(record: Record) -> list[Any]:
    """The record's events; none when the key is missing or null."""
    return list(record.get("events") or [])


@dataclass
class RunSummary:
    steps: int
    skipped: int
    clipped: int
    rollbacks: int
    lr_backoffs: int
    final_loss: float | None
    max_norm: float | None
    nonfinite_norms: int


def summarize(records: Sequence[Record]) -> RunSummary:
    events = [e for r in records for e in _events(r)]
    norms = [r["total_norm"] for r in records if r.get("total_norm") is not None]
    finite_norms = [n for n in norms if math.isfinite(n)]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    return RunSummary(
        steps=len(records),
        skipped=sum(bool(r.get("skipped")) for r in records),
        clipped=sum(bool(r.get("clipped")) for r in records),
        rollbacks=sum(e["kind"] == "rollback" for e in events),
        lr_backoffs=sum(e["kind"] == "lr_backoff" for e in events),
        final_loss=losses[-1] if losses else None,
        max_norm=max(finite_norms) if finite_norms else None,
        nonfinite_norms=len(norms) - len(finite_norms),
    )


def _event_steps(records: Sequence[Record], kind: str) -> list[int]:
    return [e["step"] for r in records for e in _events(r) if e["kind"] == kind]


def _mark_events(ax: Any, records: Sequence[Record]) -> None:
    for i, step in enumerate(_event_steps(records, "rollback")):
        ax.axvline(step, color="#9467bd", lw=1.2, label="rollback" if i == 0 else None)
    for i, step in enumerate(_event_steps(records, "lr_backoff")):
        ax.axvline(step, color="#8c564b", lw=1.0, ls="--", label="LR back-off" if i == 0 else None)


def _plot_with_marks(ax: Any, records: Sequence[Record], key: Literal["loss", "total_norm"]) -> None:
    """Plot ``key`` over steps on a log axis; non-finite values are drawn as triangles at the top."""
    steps = np.array([r["step"] for r in records])
    values = np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=np.float64)
    finite = np.isfinite(values) & (values > 0)
    ax.plot(steps[finite], values[finite], lw=1.0, color="#1f77b4", label=key.replace("_", " "))
    for flag, style in MARKS.items():
        chosen = np.array([bool(r.get(flag)) for r in records]) & finite
        if chosen.any():
            ax.scatter(steps[chosen], values[chosen], s=18, zorder=3, **style)
    if (~np.isfinite(values)).any():
        top = values[finite].max() if finite.any() else 1.0
        bad = ~np.isfinite(values)
        ax.scatter(
            steps[bad],
            np.full(bad.sum(), top),
            marker="^",
            color=NAN_COLOUR,
            zorder=4,
            label=f"non-finite {key}",
        )
    if finite.any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    _mark_events(ax, records)


def loss_figure(records: Sequence[Record]) -> Figure:
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    _plot_with_marks(ax, records, "loss")
    ax.set_ylabel("loss")
    ax.set_title("Loss, with skipped and clipped steps, rollbacks and LR back-offs")
    ax.legend(loc="best", fontsize=8)
    return fig


def norm_figure(records: Sequence[Record]) -> Figure:
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    _plot_with_marks(ax, records, "total_norm")
    steps = [r["step"] for r in records if r.get("clip_threshold") is not None]
    thresholds = [t for r in records if (t := r.get("clip_threshold")) is not None]
    if steps:
        ax.plot(steps, thresholds, color="#2ca02c", lw=1.0, ls="--", label="clip threshold")
    ax.set_ylabel("total gradient norm")
    ax.set_title("Total gradient norm (log scale) and the clip threshold")
    ax.legend(loc="best", fontsize=8)
    return fig


def layer_norm_matrix(records: Sequence[Record]) -> tuple[list[str], list[int], np.ndarray]:
    """(layer names, steps, norms[layer, step]) from the records that carry ``layer_norms``."""
    with_layers = [r for r in records if r.get("layer_norms")]
    names: list[str] = []
    for r in with_layers:
        names += [n for n in r["layer_norms"] if n not in names]
    matrix = np.full((len(names), len(with_layers)), np.nan)
    present = np.zeros_like(matrix, dtype=bool)
    for j, r in enumerate(with_layers):
        for i, name in enumerate(names):
            if name in r["layer_norms"]:
                value = r["layer_norms"][name]
                matrix[i, j] = np.nan if value is None else value
                present[i, j] = True
    matrix[~present] = -1.0  # absent (no gradient that step): drawn blank, unlike NaN
    return names, [r["step"] for r in with_layers], matrix


def heatmap_figure(records: Sequence[Record]) -> Figure | None:
    names, steps, matrix = layer_norm_matrix(records)
    if not names:
        return None
    fig = Figure(figsize=(9, max(2.5, 0.22 * len(names) + 1.2)))
    ax = fig.subplots()
    finite = np.isfinite(matrix) & (matrix > 0)
    shown = np.ma.masked_where(~finite, matrix)
    low = matrix[finite].min() if finite.any() else 1e-8
    high = matrix[finite].max() if finite.any() else 1.0
    norm = colors.LogNorm(vmin=low, vmax=max(high, low * 1.0001))
    extent = (-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm, extent=extent)
    # NaN and Inf get their own colours on a second layer, so they are never mistaken for small values.
    special = np.full(matrix.shape, np.nan)
    special[np.isnan(matrix)] = 0
    special[np.isposinf(matrix)] = 1
    special_cmap = colors.ListedColormap([NAN_COLOUR, INF_COLOUR])
    ax.imshow(
        np.ma.masked_invalid(special),
        aspect="auto",
        interpolation="nearest",
        cmap=special_cmap,
        vmin=0,
        vmax=1,
        extent=extent,
    )
    fig.colorbar(image, ax=ax, label="layer gradient norm")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 10)).astype(int)
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")
    ax.set_title("Per-layer gradient norm (log colour scale)")
    ax.legend(
        handles=[Patch(color=NAN_COLOUR, label="NaN"), Patch(color=INF_COLOUR, label="Inf")],
        loc="upper left",
        bbox_to_anchor=(1.15, 1.0),
        fontsize=8,
    )
    return fig


def event_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """One row per event, the data watch's excepted (:func:`suspect_rows`)."""
    rows = []
    for r in records:
        for event in _events(r):
            if event["kind"] == "data_outlier":
                continue
            details = {k: v for k, v in event.items()
                       if k not in ("step", "kind", "layer", "action", "forensics")}
            rows.append(
                {
                    "step": str(event["step"]),
                    "kind": event["kind"],
                    "layer": event.get("layer") or "",
                    "action": event.get("action") or "",
                    "details": ", ".join(f"{k}={_fmt(v)}" for k, v in details.items()),
                    "forensics": forensics_text(event.get("forensics")),
                }
            )
    return rows


def suspect_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """The data watch's flagged samples (``"data_outlier"`` events, ``gg.forensics.DataWatch``), one row
    each: step, id, side (a loss too high or too low), loss, robust z within its batch."""
    rows = []
    for r in records:
        for event in _events(r):
            if event["kind"] != "data_outlier":
                continue
            for sample, z, loss in zip(event.get("samples", []), event.get("scores", []), event.get("losses", [])):
                rows.append({"step": str(event["step"]), "id": str(sample), "side": "high" if z > 0 else "low",
                             "loss": _fmt(loss), "z": _fmt(z)})
    return rows


def exclude_code(rows: Sequence[dict[str, str]]) -> str:
    """The ``gg.forensics.exclude`` line that leaves the flagged samples out of a resumed run."""
    ids = sorted({int(r["id"]) if r["id"].lstrip("-").isdigit() else r["id"] for r in rows}, key=str)
    return f"loader = DataLoader(gg.forensics.exclude(dataset, {ids!r}), batch_size=..., shuffle=True)"


def forensics_text(forensics: dict[str, Any] | None) -> str:
    """One line of an event's forensics (``gg.Forensics``): origin layer, samples, reproducible, bundle."""
    if not forensics:
        return ""
    if forensics.get("error"):
        return f"analysis failed: {forensics['error']}"
    parts = []
    if forensics.get("layer"):
        parts.append(f"starts in {forensics['layer']}")
    samples = forensics.get("samples") or []
    scores = forensics.get("scores") or []
    by_rank = forensics.get("samples_by_rank")
    if by_rank:  # distributed: every rank's own samples, merged
        parts.append("samples " + "; ".join(f"rank {r}: {', '.join(map(str, s)) or '-'}" for r, s in by_rank.items()))
    elif samples:
        parts.append("samples " + ", ".join(f"{s} ({_fmt(z)})" for s, z in zip(samples, scores)))
    else:
        parts.append("no sample stands out")
    reproducible = forensics.get("reproducible")
    parts.append({True: "reproducible", False: "did not reproduce (transient)", None: "not recomputed"}
                 .get(reproducible, f"reproducible={reproducible}"))
    origin = forensics.get("origin")
    if origin:
        parts.append(f"{origin.get('kind', '').upper()} from {origin.get('module')} ({origin.get('phase')})")
    if forensics.get("bundle"):
        parts.append(f"bundle {forensics['bundle']}")
    return "; ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_run_report(records: Sequence[Record], title: str = "gradguard run report") -> str:
    """The HTML of the report, one self-contained page."""
    if not records:
        raise ValueError("render_run_report: the run has no records")
    heatmap = heatmap_figure(records)
    suspects = suspect_rows(records)
    template = jinja2.Template(
        resources.files("gradguard.report").joinpath("run.html.j2").read_text(encoding="utf-8"),
        autoescape=True,
    )
    return template.render(
        title=title,
        summary=summarize(records),
        loss_png=png_data_uri(loss_figure(records)),
        norm_png=png_data_uri(norm_figure(records)),
        heatmap_png=None if heatmap is None else png_data_uri(heatmap),
        events=event_rows(records),
        suspects=suspects,
        exclude=exclude_code(suspects) if suspects else "",
        fmt=_fmt,
    )

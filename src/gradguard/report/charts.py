"""Reusable matplotlib charts for the HTML reports, each returned as a PNG data URI (``figures.py``).

The functions take plain series (lists of steps and values), not lab records, so that any report can use
them: small multiples of curves with divergence marked, per-layer profiles, bars with intervals, scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from matplotlib.ticker import NullFormatter

from gradguard.report.figures import plt, png_data_uri

COLORS = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
DPI = 80  # small multiples stay legible; rendering time and page size grow with the square of it


@dataclass
class Series:
    """One line: ``values`` at ``steps`` (None = missing); ``mark`` is a step to mark with an x (divergence)."""

    label: str
    steps: Sequence[float]
    values: Sequence[float | None]
    mark: float | None = None
    color_index: int = 0


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    vlines: Sequence[float] = ()  # steps to mark with a dotted vertical line (injected faults)


def _clean(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]


def _wide_range(values: Sequence[float], ratio: float = 20.0) -> bool:
    """True when the positive finite ``values`` span more than ``ratio``: a log axis then helps; on a
    narrower range it would show no major tick at all."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return bool(positive) and max(positive) > ratio * min(positive)


def _grid(count: int, columns: int, width: float, height: float):
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False
    )
    fig.subplots_adjust(wspace=0.32, hspace=0.5)  # cheaper than a layout engine; savefig trims the margins
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def curves(
    panels: list[Panel],
    ylabel: str,
    xlabel: str = "step",
    log_y: bool = True,
    columns: int = 3,
    legend: bool = True,
    log_x: bool = False,
) -> str:
    """Small multiples of line charts (log y-axis where the values span more than a factor 20; log x-axis
    with ``log_x``, e.g. for learning rates).
    A series' ``mark`` is drawn as a red x on its last finite value at
    or before that step (the point where it diverged)."""
    fig, axes = _grid(len(panels), columns, 4.2, 2.9)
    for ax, panel in zip(axes, panels):
        for series in panel.series:
            values = _clean(series.values)
            color = COLORS[series.color_index % len(COLORS)]
            ax.plot(series.steps, values, color=color, linewidth=1.1, alpha=0.85, label=series.label)
            if series.mark is not None:
                finite = [(s, v) for s, v in zip(series.steps, values) if s <= series.mark and math.isfinite(v)]
                if finite:
                    ax.plot(*finite[-1], marker="x", color="red", markersize=9, markeredgewidth=2.2)
                else:
                    ax.axvline(series.mark, color="red", linewidth=1.5)
        for step in panel.vlines:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        if log_y and _wide_range([v for series in panel.series for v in _clean(series.values)]):
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        if log_x:
            ax.set_xscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if legend and panel.series:
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=6.5, loc="best")
    return png_data_uri(fig, dpi=DPI)


def bars_with_intervals(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float] | None = None,
    highs: Sequence[float] | None = None,
    ylabel: str = "",
    title: str = "",
    ylim: tuple[float, float] | None = None,
) -> str:
    """Vertical bars with asymmetric error bars from ``lows`` to ``highs`` (e.g. Wilson intervals)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(labels)), 3.2))
    positions = range(len(labels))
    errors = None
    if lows is not None and highs is not None:
        errors = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    ax.bar(positions, values, yerr=errors, capsize=4, color=[COLORS[i % len(COLORS)] for i in positions])
    ax.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    return png_data_uri(fig, dpi=DPI)


def grouped_bars(
    groups: Sequence[str], metrics: dict[str, Sequence[float | None]], title: str = "", log_y: bool = False
) -> str:
    """One panel per metric, one bar per group: for quantities on different scales side by side."""
    fig, axes = _grid(len(metrics), len(metrics), 3.3, 3.0)
    for ax, (name, values) in zip(axes, metrics.items()):
        cleaned = _clean(values)
        ax.bar(range(len(groups)), cleaned, color=[COLORS[i % len(COLORS)] for i in range(len(groups))])
        ax.set_xticks(list(range(len(groups))), groups, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        if log_y:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return png_data_uri(fig, dpi=DPI)


def scatter(
    points: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
) -> str:
    """One colour per label: ``{label: (xs, ys)}``."""
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    for i, (label, (xs, ys)) in enumerate(points.items()):
        ax.scatter(xs, ys, color=COLORS[i % len(COLORS)], label=label, s=22)
    if log_x and _wide_range([float(x) for xs, _ in points.values() for x in xs]):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return png_data_uri(fig, dpi=DPI)

"""The doctor's report as one self-contained HTML page: plots embedded as PNG data URIs, then the tables.

Plots (matplotlib, log scale): the error signal ``||dL/dy||`` and the weight-gradient norm per layer against
depth, the layer where the trouble starts marked; for recurrent models ``||dL/dh_t||`` against the step
``t``. Tables: findings with their fixes, the flow per layer, activation statistics, the init audit,
recurrent bounds, Jacobian spectral norms and update sizes. The template is ``doctor.html.j2`` next to this
module, rendered with jinja2 (autoescaped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from gradguard.report.figures import plt, png_data_uri

if TYPE_CHECKING:
    from gradguard.explain.report import DoctorReport

__all__ = ["render_html"]

_TEMPLATE = Path(__file__).with_name("doctor.html.j2")


def _positive(values: Sequence[float | None]) -> list[float]:
    # log axes: a 0 or NaN norm is drawn at the bottom of the axis instead of breaking the plot
    return [v if v is not None and math.isfinite(v) and v > 0 else float("nan") for v in values]


def depth_figure(report: DoctorReport) -> str | None:
    layers = report.depth.layers
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    depth = list(range(len(layers)))
    ax.semilogy(depth, _positive([layer.error_signal for layer in layers]), "o-",
                label="error signal ||dL/dy|| at the layer output")
    ax.semilogy(depth, _positive([layer.weight_grad for layer in layers]), "s--",
                label="weight gradient ||dL/dW||", alpha=0.7)
    names = [layer.name for layer in layers]
    if report.depth.start_layer in names:
        ax.axvline(names.index(report.depth.start_layer), color="crimson", linestyle=":",
                   label=f"starts at {report.depth.start_layer}")
    step = max(1, len(layers) // 20)
    ax.set_xticks(depth[::step], names[::step], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("norm (log scale)")
    ax.set_title(f"gradient flow across depth: {report.depth.verdict}, "
                 f"x{report.depth.growth_per_layer:.3g} per layer")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return png_data_uri(fig)


def time_figure(report: DoctorReport) -> str | None:
    if report.time is None:
        return None
    norms = report.time.grad_norm_per_step
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.semilogy(range(1, len(norms) + 1), _positive(norms), "o-", markersize=3)
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dh_t|| (log scale)")
    ax.set_title(f"gradient flow across time in {report.time.module}: {report.time.verdict}, "
                 f"||dh_T/dh_0|| = {report.time.dhT_dh0:.3g}")
    ax.grid(True, which="both", alpha=0.3)
    return png_data_uri(fig)


def _number(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def render_html(report: DoctorReport) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["num"] = _number
    template = environment.from_string(_TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        report=report,
        summary=report.summary_lines(),
        depth_png=depth_figure(report),
        time_png=time_figure(report),
    )

"""Gradient flow across depth: the error signal ``||dL/dy_l||`` at each layer's output, and its growth.

Why the error signal and not only the weight gradients: for ``y_l = W_l x_l`` the weight gradient is
``dL/dW_l = dL/dy_l x_l^T``. In a deep linear network the forward signal ``x_l`` and the error signal
``dL/dy_l`` change in opposite directions, so the weight gradients stay roughly level across layers while
the error signal grows or shrinks geometrically (Glorot & Bengio 2010, eqs. 13-14). The error signal is
what the lower layers receive; it is read with a tensor hook on each layer's output (``trace.py``).

Growth: between two consecutive layers the error signal is multiplied by the *gain*

    g_l = ||dL/dy_{l-1}|| / ||dL/dy_l||          (g_0 uses the gradient w.r.t. the model input)

which covers layer ``l`` and what runs between the two layers (the activation after ``l-1``). Gains across
a recurrent module are left out here: their growth is over time, see ``time_flow.py``. The log of the error
signal, chained through the counted gains from the last layer down, is fitted by least squares against the
layer index; its slope gives the *growth per layer* ``f`` and the *total growth* ``G = f^n`` over the ``n``
counted gains.

Verdict: ``G > 10`` is *exploding*, ``G < 1/10`` *vanishing*, anything between *stable*. An order of
magnitude across the network is the line drawn because with one learning rate it means the bottom layers
take steps at least 10x larger (or smaller) relative to their gradient scale than the top ones; He et al.
2015 (section 2.2) and Glorot & Bengio 2010 ask for a gain of 1 per layer, and a well-initialised network
of any depth stays well inside the line (finite width adds a few percent per layer of noise).

The layer where it starts: when one layer's gain alone makes at least half of the growth (in log, the
product of the counted gains, which telescopes to the ratio of the end signals) and is at least
``sqrt(10)`` by itself, the growth is a *jump* at that layer (one layer 30x off-scale among well
initialised ones) and that layer is named; the total growth is then the measured ratio of the end
signals, not the fit, which a step misstates. Otherwise the growth is spread over the layers, and it starts
at the first layer, in forward order, whose own gain goes the verdict's way by more than the larger of
``10^(1/n)`` (the per-layer rate that compounds to the verdict line) and 1.25 (a margin above the
finite-width noise of a well-initialised layer); when no single layer does, the layer with the most
extreme gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.stats import GradStats, per_tensor_norms
from gradguard.trace import ModuleCall

__all__ = ["GROWTH_LIMIT", "JUMP_SHARE", "LAYER_GAIN_TOLERANCE", "DepthFlow", "LayerFlow", "depth_flow",
           "fit_growth", "jump_of", "safe_exp", "start_of", "verdict_of"]

GROWTH_LIMIT = 10.0
LAYER_GAIN_TOLERANCE = 1.25
JUMP_SHARE = 0.5  # one layer making at least this share of the growth (in log) is a jump
_TINY = 1e-30  # floor for log() of an error signal that is exactly 0 (a dead network)


@dataclass
class LayerFlow:
    """The gradient flow at one layer.

    Attributes:
        name: module path.
        error_signal: ``||dL/dy||`` at the layer's output (root-sum-square over calls if called twice).
        weight_grad: ``||dL/dtheta||`` of the layer's own parameters (from ``grad_stats``).
        weight_norm: ``||theta||`` of the same parameters.
        grad_to_weight: ``weight_grad / weight_norm``.
        gain: error signal before this layer / at this layer (see the module docstring); None for the first
            layer when the input takes no gradient.
        recurrent: True when the gain crosses a recurrent module and is left out of the fit.
    """

    name: str
    error_signal: float
    weight_grad: float
    weight_norm: float
    grad_to_weight: float
    gain: float | None
    recurrent: bool


@dataclass
class DepthFlow:
    """The gradient flow across depth and its verdict.

    Attributes:
        layers: one entry per layer with parameters, in forward order.
        input_error_signal: ``||dL/dx||`` at the model input, None when the input takes no gradient.
        growth_per_layer: fitted factor by which the error signal grows per layer, going down.
        total_growth: ``growth_per_layer ** counted_gains``: from the last layer to the first.
        counted_gains: the gains in the fit.
        verdict: ``"exploding"``, ``"vanishing"`` or ``"stable"``.
        start_layer: where the explosion or vanishing starts; None when stable.
        jump_gain: when the growth is a jump at ``start_layer`` (module docstring), that layer's gain;
            else None.
    """

    layers: list[LayerFlow]
    input_error_signal: float | None
    growth_per_layer: float
    total_growth: float
    counted_gains: int
    verdict: str
    start_layer: str | None
    jump_gain: float | None = None


def verdict_of(total_growth: float) -> str:
    """``"exploding"`` above ``GROWTH_LIMIT``, ``"vanishing"`` below its inverse, else ``"stable"``."""
    if not math.isfinite(total_growth) or total_growth > GROWTH_LIMIT:
        return "exploding"
    if total_growth < 1.0 / GROWTH_LIMIT:
        return "vanishing"
    return "stable"


def safe_exp(x: float) -> float:
    """``exp(x)``, Inf instead of OverflowError (a 1000-layer explosion is a number, not a crash)."""
    return math.inf if x > 709.0 else math.exp(x)


def fit_growth(log_profile: list[float]) -> float:
    """Least-squares slope of ``log_profile`` against ``0, 1, 2, ...`` (0 for fewer than two points)."""
    n = len(log_profile)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(log_profile) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    sxy = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(log_profile))
    return sxy / sxx


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _call_signal(call: ModuleCall) -> Tensor | None:
    norms = [n for n in call.output_grad_norms if n is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def start_of(names: list[str], gains: list[float], verdict: str) -> str | None:
    """The first layer whose gain goes the verdict's way beyond the per-layer tolerance (see module doc)."""
    if verdict == "stable" or not gains:
        return None
    tolerance = max(GROWTH_LIMIT ** (1.0 / len(gains)), LAYER_GAIN_TOLERANCE)
    direction = 1.0 if verdict == "exploding" else -1.0
    scores = [direction * math.log(max(g, _TINY)) for g in gains]
    for name, score in zip(names, scores):
        if score > math.log(tolerance):
            return name
    return names[max(range(len(scores)), key=scores.__getitem__)]


def jump_of(gains: list[float], verdict: str) -> int | None:
    """Index of the layer whose gain is a jump (see the module docstring), or None."""
    if verdict == "stable" or not gains:
        return None
    direction = 1.0 if verdict == "exploding" else -1.0
    scores = [direction * math.log(max(g, _TINY)) for g in gains]
    total = sum(scores)
    worst = max(range(len(scores)), key=scores.__getitem__)
    if total > 0 and scores[worst] >= JUMP_SHARE * total and scores[worst] >= 0.5 * math.log(GROWTH_LIMIT):
        return worst
    return None


def depth_flow(
    calls: list[ModuleCall],
    stats: GradStats,
    input_grad_norm: Tensor | None,
    recurrent_call_ids: set[int],
    skip_modules: set[int],
) -> DepthFlow:
    """Build the depth profile from a traced forward/backward pass.

    Args:
        calls: the trace, in completion order.
        stats: ``grad_stats(model)`` after the backward pass.
        input_grad_norm: ``||dL/dx||`` at the model input, or None.
        recurrent_call_ids: ``id()`` of the calls that belong to a recurrent module (its own and, for
            hand-written cells, those of its submodules); gains across them are left out.
        skip_modules: ``id()`` of modules not to list (the insides of hand-written cells).
    """
    first_position: dict[int, int] = {}
    signals: dict[int, list[Tensor]] = {}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for position, call in enumerate(calls):
        key = id(call.module)
        if not call.is_leaf or not _owns_parameters(call.module) or key in skip_modules:
            continue
        signal = _call_signal(call)
        if signal is None:
            continue
        first_position.setdefault(key, position)
        signals.setdefault(key, []).append(signal)
        modules[key] = (call.name, call.module)
    order = sorted(first_position, key=first_position.__getitem__)
    recurrent_positions = [p for p, c in enumerate(calls) if id(c) in recurrent_call_ids]

    # One host read for every number of the profile.
    values = [torch.linalg.vector_norm(torch.stack(signals[k])) for k in order]
    weight_norms = [
        torch.linalg.vector_norm(torch.stack(per_tensor_norms(
            [p.detach() for p in modules[k][1].parameters(recurse=False)], 2.0)))
        for k in order
    ]
    grad_norm_of = dict(zip(stats.names, stats.norms.tolist()))
    host = torch.stack(values + weight_norms).tolist() if order else []
    error_signals, weight_norm_values = host[: len(order)], host[len(order):]
    input_signal = float(input_grad_norm) if input_grad_norm is not None else None

    layers: list[LayerFlow] = []
    previous_signal, previous_position = input_signal, -1
    for i, key in enumerate(order):
        name, module = modules[key]
        position = first_position[key]
        signal = error_signals[i]
        gain = None
        if previous_signal is not None:
            gain = max(previous_signal, _TINY) / max(signal, _TINY)
        crosses_recurrent = isinstance(module, nn.RNNBase) or any(
            previous_position < p <= position for p in recurrent_positions)
        weight_grad = grad_norm_of.get(name, 0.0)
        weight_norm = weight_norm_values[i]
        layers.append(LayerFlow(
            name=name,
            error_signal=signal,
            weight_grad=weight_grad,
            weight_norm=weight_norm,
            grad_to_weight=weight_grad / weight_norm if weight_norm > 0 else math.inf,
            gain=gain,
            recurrent=crosses_recurrent,
        ))
        previous_signal, previous_position = signal, position

    counted = [layer for layer in layers if layer.gain is not None and not layer.recurrent]
    # Chain the counted gains from the last layer down: log error signal relative to the last layer.
    log_profile = [0.0]
    for layer in reversed(counted):
        log_profile.append(log_profile[-1] + math.log(max(layer.gain or 0.0, _TINY)))
    slope = fit_growth(log_profile)
    growth = safe_exp(slope)
    total = safe_exp(slope * len(counted)) if counted else 1.0
    verdict = verdict_of(total) if counted else "stable"
    gains: list[float] = [layer.gain for layer in counted]  # type: ignore[misc]
    jump = jump_of(gains, verdict)
    if jump is not None:
        # A step, not a geometric profile: the fit misstates it, the measured end-to-end ratio does not.
        measured = safe_exp(sum(math.log(max(g, _TINY)) for g in gains))
        if verdict_of(measured) == verdict:
            return DepthFlow(layers, input_signal, measured ** (1.0 / len(gains)), measured, len(counted), verdict,
                             counted[jump].name, gains[jump])
    start = start_of([layer.name for layer in counted], gains, verdict)
    return DepthFlow(layers, input_signal, growth, total, len(counted), verdict, start)

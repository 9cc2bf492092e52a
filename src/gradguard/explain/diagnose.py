"""``gg.doctor(model, batch, loss_fn)``: one traced forward/backward pass, the measurements, the findings.

The order of work:

1. one forward and backward pass on ``batch`` under a :class:`~gradguard.trace.ForwardTrace`
   (``nn.RNN/GRU/LSTM`` stepped by hand, see ``recurrent.py``), the floating-point inputs made leaves that
   take a gradient; then ``grad_stats(model)`` for the weight gradients;
2. gradient flow across depth (``flow.py``) and, for a recurrent model, across time (``time_flow.py``);
3. activation statistics, init audit and recurrent bounds from the same pass;
4. the relative update of one (undone) optimizer step, when an optimizer is given;
5. when the loss or a gradient is not finite, :func:`locate_nonfinite` names where it starts;
6. Jacobian spectral norms, input-output and per block (``blocks.py``), by power iteration;
6b. attention: the largest attention logit and entropy per attention module, log Z of the output
    (``attention.py``, one more forward pass; its fixes tried on copies when an optimizer is given);
7. findings, ranked; the fix of each flow finding is tried on a deep copy of the model (``remedies.py``).

The batch follows ``gradguard.batch``: ``(inputs, targets)`` with ``loss_fn(output, targets)``, or a dict of
keyword inputs with the loss read from ``output.loss`` when ``loss_fn`` is None (a Hugging Face model
given ``labels``). A ``torch.compile``'d model is diagnosed eagerly (``trace.eager``): the same modules,
run as Python, so each one's output and gradient can be read.

The model is left as it was: parameters, ``.grad``, buffers (batch-norm statistics), optimizer state and
training mode (``preserve.py``). Layers are the modules that own parameters directly; activations are
seen only when they are modules (``nn.ReLU``, not ``torch.relu``). The gradient flow is measured in the
model's own mode; the Jacobians in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.batch import (
    Batch,
    LossFn,
    as_batch,
    check_model_and_loss_fn,
    forward_loss,
    leaf_inputs,
    scalar_loss,
)
from gradguard.explain.activation_stats import activation_stats
from gradguard.explain.attention import attention_report
from gradguard.explain.blocks import find_blocks, measure_jacobians, short_error
from gradguard.explain.findings import CAUSES, Finding, build_findings, keep_trained, rank
from gradguard.explain.flow import DepthFlow, depth_flow
from gradguard.explain.init_audit import (
    OffScaleLayer,
    audit_init,
    audit_recurrent,
    fixed_std_convention,
    off_scale_layer,
    tied_weights,
)
from gradguard.explain.learning_rate import relative_updates
from gradguard.explain.nonfinite import NonfiniteOrigin, locate_nonfinite
from gradguard.explain.preserve import preserved
from gradguard.explain.remedies import first_stabilising, flow_candidates
from gradguard.explain.report import DoctorReport
from gradguard.explain.time_flow import RecurrentRecorder, TimeFlow, cell_time_flow, rnn_time_flow
from gradguard.init import following_in_order
from gradguard.stats import GradStats, grad_stats
from gradguard.trace import ForwardTrace, ModuleCall, RecurrentCell, eager, find_recurrent_cells, norm32

__all__ = ["VERDICTS", "doctor"]

# The report's verdict: NaN/Inf in the pass, else the flow over depth and time, the worse first.
VERDICTS = ("nonfinite", "exploding", "vanishing", "stable")
GATED = (nn.GRU, nn.LSTM, nn.GRUCell, nn.LSTMCell)


def _check_arguments(model: nn.Module, batch: object, loss_fn: object, optimizer: object) -> Batch:
    check_model_and_loss_fn(model, loss_fn, "doctor")
    split = as_batch(batch, "doctor")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"doctor: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("doctor: model has no parameters to diagnose")
    return split


def _execution_order(calls: list[ModuleCall]) -> list[tuple[str, nn.Module]]:
    """Leaf modules (and recurrent modules) in the order of their first call."""
    seen: set[int] = set()
    order: list[tuple[str, nn.Module]] = []
    for call in calls:
        if call.name and call.is_leaf and id(call.module) not in seen:
            seen.add(id(call.module))
            order.append((call.name, call.module))
    return order


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _cell_square_weights(cells: list[RecurrentCell]) -> set[int]:
    square: set[int] = set()
    for cell in cells:
        sizes = {cell.calls[0].inputs[i].shape[-1] for i in cell.state_inputs}
        for param in cell.calls[0].module.parameters():
            if param.dim() == 2 and param.shape[0] == param.shape[1] and param.shape[0] in sizes:
                square.add(id(param))
    return square


def _time_flow(trace: ForwardTrace, recorder: RecurrentRecorder, cells: list[RecurrentCell],
               iterations: int, notes: list[str]) -> tuple[TimeFlow | None, bool]:
    """Time flow of the recurrent module that runs first, and whether that module is gated (GRU/LSTM)."""
    position = {id(call): i for i, call in enumerate(trace.calls)}
    first_position: dict[str, int] = {}
    for i, call in enumerate(trace.calls):
        first_position.setdefault(call.name, i)
    candidates: list[tuple[int, nn.Module | None, Callable[[], TimeFlow]]] = []
    for run in recorder.runs:
        candidates.append((first_position.get(run.name, 0), run.module, functools.partial(rnn_time_flow, run, iterations)))
    for cell in cells:
        candidates.append((position[id(cell.calls[0])], cell.calls[0].module,
                           functools.partial(cell_time_flow, cell, iterations)))
    for name, reason in recorder.skipped.items():
        notes.append(f"time flow of {name} not measured: {reason}")
    notes.extend(recorder.notes)
    if not candidates:
        return None, False
    _, module, measure = min(candidates, key=lambda c: c[0])
    try:
        return measure(), isinstance(module, GATED)
    except Exception as error:
        notes.append(f"time flow not measured: {short_error(error)}")
        return None, False


@dataclass
class _TracedPass:
    """The doctor's forward/backward pass: its trace, the recurrent runs, the loss and the gradients."""

    trace: ForwardTrace
    recorder: RecurrentRecorder
    loss: Tensor
    stats: GradStats
    input_grad_norm: Tensor | None


def _traced_pass(model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> _TracedPass:
    """One forward and backward pass under a trace; floating-point inputs made leaves with a gradient."""
    leafy, leaves = leaf_inputs(batch)
    recorder = RecurrentRecorder()
    with ForwardTrace(model, rewrite_output=recorder) as trace:
        _, loss = forward_loss(model, leafy, loss_fn)
    loss = scalar_loss(loss, "doctor")
    if not loss.requires_grad:
        raise ValueError("doctor: the loss does not depend on any parameter that requires grad")
    loss.backward()
    input_norms = [norm32(leaf.grad) for leaf in leaves if leaf.grad is not None]
    input_grad_norm = torch.linalg.vector_norm(torch.stack(input_norms)) if input_norms else None
    return _TracedPass(trace, recorder, loss, grad_stats(model), input_grad_norm)


def _overall_verdict(depth: DepthFlow, time: TimeFlow | None,
                     origin: NonfiniteOrigin | None) -> tuple[str, str | None]:
    """``"nonfinite"`` when NaN/Inf appear, else exploding if depth or time explodes, else vanishing if either
    vanishes; and where."""
    if origin is not None:
        return "nonfinite", origin.module
    verdicts = [depth.verdict] + ([time.verdict] if time is not None else [])
    verdict = next((v for v in ("exploding", "vanishing") if v in verdicts), "stable")
    if verdict == "stable":
        return verdict, None
    if depth.verdict == verdict:
        return verdict, depth.start_layer
    return verdict, time.module if time is not None else None


def _lone_start(depth: DepthFlow, lone: OffScaleLayer | None) -> DepthFlow:
    """The flow with its start at the one off-scale layer, when there is one, it is in the profile and it
    pushes the way the flow goes (too large for an explosion, too small for a vanishing). Its own gain may
    be hidden by what follows it (a tanh it saturates passes less back), so the gains alone would put the
    start at the first layer of a spread-out profile."""
    if lone is None or depth.verdict == "stable" or lone.check.layer not in {layer.name for layer in depth.layers}:
        return depth
    if (lone.factor < 1.0) != (depth.verdict == "exploding"):
        return depth
    return dataclasses.replace(depth, start_layer=lone.check.layer)


def _updates(model: nn.Module, optimizer: torch.optim.Optimizer | None, notes: list[str]) -> list | None:
    if optimizer is None:
        return None
    try:
        return relative_updates(model, optimizer)
    except Exception as error:  # an optimizer whose step needs a closure (LBFGS), a custom one that fails
        notes.append(f"update sizes not measured: {short_error(error)}")
        return None


_DEPTH_CAUSES = ("init_scale", "activation", "depth", "nonfinite")  # nonfinite: an overflow of the signal


def _check_flow_fixes(findings: list[Finding], model: nn.Module, batch: Any, loss_fn: LossFn | None,
                      iterations: int, cells_present: bool) -> None:
    """Apply each flow finding's remedy to a copy of the model and keep the first remedy that works.

    When that is not the finding's own remedy, the finding says so and names the cause the kept one
    addresses (``findings.CAUSES``): the explanation and the checked fix tell one story.
    """
    for finding in findings:
        if finding.remedy is None:
            continue
        over_time = finding.cause == "recurrent"
        if not over_time and finding.cause not in _DEPTH_CAUSES:
            continue

        def verdict_after(trial: nn.Module, over_time: bool = over_time) -> str:
            report = doctor(trial, batch, loss_fn, jacobians=False, jacobian_iterations=iterations,
                            check_fixes=False)
            if over_time:
                return report.time.verdict if report.time is not None else "stable"
            return report.depth.verdict

        own = finding.remedy
        candidates = [own] if over_time else flow_candidates(own, model, cells_present)
        remedy, outcome, own_outcome = first_stabilising(candidates, model, batch, verdict_after)
        finding.remedy, finding.fix = remedy, remedy.code
        axis = "over time" if over_time else "across depth"
        finding.evidence["flow_after_fix"] = outcome or "stable"
        if outcome is not None:
            finding.message += f" (checked on a copy of the model: after this fix the flow {axis} is {outcome})"
        elif remedy is not own:
            finding.message += (f"; but on a copy of the model, {own.code.split('  #')[0]} leaves the flow "
                                f"{own_outcome} while {remedy.code.split('  #')[0]} makes it stable: the cause "
                                f"it addresses is {CAUSES.get(remedy.cause, remedy.cause)}")
            if finding.cause != "nonfinite":
                finding.cause = remedy.cause


def doctor(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    jacobians: bool = True,
    jacobian_iterations: int = 20,
    check_fixes: bool = True,
    trained: bool = False,
) -> DoctorReport:
    """Diagnose how gradients flow through ``model`` at its current weights, and what to change.

    Args:
        model: called as ``model(inputs)``, or ``model(**batch)`` for a dict batch.
        batch: ``(inputs, targets)``, or a dict of keyword inputs (``gradguard.batch``); a few dozen
            samples are enough.
        loss_fn: ``loss_fn(output, targets)`` returns a scalar; None for a dict batch reads the loss from
            the output (``output.loss``).
        optimizer: optional; when given, the relative update of one step is measured (and undone).
        jacobians: measure the input-output and per-block Jacobian spectral norms (the costliest part:
            ``2 * jacobian_iterations`` passes per block). ``||dh_T/dh_0||`` is always measured.
        jacobian_iterations: power-iteration steps at most for each spectral norm.
        check_fixes: apply the fix of each flow finding to a deep copy of the model and diagnose the copy
            (without Jacobians); when it does not make the flow stable, try the other flow remedies
            (``remedies.py``) and report the first that does. Costs one doctor pass per remedy tried.
        trained: the weights are trained (``gradguard replay`` on a bad step), not at their init: no fix
            that re-initialises is offered (``findings.keep_trained``); rescaling one off-scale layer and
            learning-rate changes are.

    For a quick reading of the flow alone (what the lab does for every run), pass ``jacobians=False,
    check_fixes=False``: one forward/backward pass, plus the power iteration of ``||dh_T/dh_0||`` for
    recurrent models.

    Returns:
        A :class:`DoctorReport`: ``print(report)``, ``report.verdict`` (one of :data:`VERDICTS`),
        ``report.start_layer``, ``report.findings``, ``report.time_flow``, ``report.to_dict()``,
        ``report.to_html(path)``.
    """
    split = _check_arguments(model, batch, loss_fn, optimizer)
    if jacobian_iterations < 1:
        raise ValueError(f"doctor: jacobian_iterations must be >= 1, got {jacobian_iterations}")
    notes: list[str] = []
    blocks = find_blocks(model)
    with preserved(model), eager():
        traced = _traced_pass(model, split, loss_fn)
        trace, stats = traced.trace, traced.stats

        cells = find_recurrent_cells(trace.calls)
        cell_names = [c.name for c in cells]
        recurrent_call_ids = {id(c) for c in trace.calls
                              if isinstance(c.module, nn.RNNBase) or _inside(c.name, cell_names)}
        inside_cells = {id(c.module) for c in trace.calls if _inside(c.name, cell_names)}
        depth = depth_flow(trace.calls, stats, traced.input_grad_norm, recurrent_call_ids, inside_cells)
        time, time_gated = _time_flow(trace, traced.recorder, cells, jacobian_iterations, notes)

        order = _execution_order(trace.calls)
        weight_layers = {id(m) for _, m in order if next(m.parameters(recurse=False), None) is not None}
        activations = activation_stats(trace.calls, weight_layers)
        square = _cell_square_weights(cells)
        fixed = fixed_std_convention(model, len(blocks.blocks) if blocks.repeated else 1)
        init_checks = audit_init(order, following_in_order(order), square, fixed)
        lone = off_scale_layer(init_checks)
        depth = _lone_start(depth, lone)
        notes += [f"{layer!r} shares its weight with the embedding {embedding!r} (tied): not audited as a "
                  "separate layer" for layer, embedding in tied_weights(order).items()]
        if any(c.scheme == "fixed" for c in init_checks) and fixed is not None:
            notes.append(f"weights checked against the transformer convention ({fixed.source}) where they "
                         "fail He/Xavier: scheme 'fixed' in the init audit")
        cell_leaves = {c: [m for n, m in order if _inside(n, [c])] for c in cell_names}
        bounds = audit_recurrent(order, cells, cell_leaves)
        updates = _updates(model, optimizer, notes)

        loss_value, total_norm = float(traced.loss.detach()), float(stats.total_norm)
        origin = None
        if not (math.isfinite(loss_value) and math.isfinite(total_norm)):
            origin = locate_nonfinite(model, batch, loss_fn)
        jacobian: dict[str, Any] = {"input_output": None, "blocks": {}, "blocks_covered": None}
        if jacobians:
            run: Callable[[Any], Any] = (lambda x: model(**x)) if split.keyword else model
            jacobian = measure_jacobians(model, run, split.inputs, trace.calls, blocks, jacobian_iterations, notes)
        attention = attention_report(model, split, loss_fn, optimizer, check_fixes)

    verdict, start = _overall_verdict(depth, time, origin)
    findings = build_findings(depth=depth, time=time, init_checks=init_checks, bounds=bounds,
                              activations=activations, updates=updates, origin=origin, jacobian=jacobian,
                              model=model, cells_present=any(square), time_gated=time_gated, lone=lone)
    if trained:
        keep_trained(findings)
    if check_fixes:
        _check_flow_fixes(findings, model, batch, loss_fn, jacobian_iterations, cells_present=any(square))
    return DoctorReport(verdict, start, rank(findings + attention.findings), depth, time, activations,
                        init_checks, bounds, jacobian, updates, origin, loss_value, total_norm,
                        notes + attention.notes, attention=attention)

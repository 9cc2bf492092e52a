"""``gg.doctor(model, batch, loss_fn)``: one traced forward/backward pass, the measurements, the findings.

The order of work:

1. one forward and backward pass on ``batch`` under a :class:`~gradguard.trace.ForwardTrace`
   (``nn.RNN/GRU/LSTM`` stepped by hand, see ``recurrent.py``), the input made a leaf that takes a
   gradient; then ``grad_stats(model)`` for the weight gradients;
2. gradient flow across depth (``flow.py``) and, for a recurrent model, across time (``time_flow.py``);
3. activation statistics, init audit and recurrent bounds from the same pass;
4. the relative update of one (undone) optimizer step, when an optimizer is given;
5. when the loss or a gradient is not finite, :func:`locate_nonfinite` names where it starts;
6. Jacobian spectral norms, input-output and per block, by power iteration;
7. findings, ranked; the fix of each flow finding is tried on a deep copy of the model (``remedies.py``).

The model is left as it was: parameters, ``.grad``, buffers (batch-norm statistics), optimizer state and
training mode (``preserve.py``). Layers are the
modules that own parameters directly; activations are seen only when they are modules (``nn.ReLU``, not
``torch.relu``). The gradient flow is measured in the model's own mode; the Jacobians in eval mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.explain.activation_stats import activation_stats
from gradguard.explain.findings import Finding, build_findings
from gradguard.explain.flow import DepthFlow, depth_flow
from gradguard.explain.init_audit import audit_init, audit_recurrent
from gradguard.explain.jacobian import spectral_norm
from gradguard.explain.learning_rate import relative_updates
from gradguard.explain.nonfinite import NonfiniteOrigin, locate_nonfinite
from gradguard.explain.preserve import preserved
from gradguard.explain.remedies import first_stabilising, flow_candidates
from gradguard.explain.report import DoctorReport
from gradguard.explain.time_flow import RecurrentRecorder, TimeFlow, cell_time_flow, rnn_time_flow
from gradguard.init import following_in_order
from gradguard.stats import GradStats, grad_stats
from gradguard.trace import (
    ForwardTrace,
    ModuleCall,
    RecurrentCell,
    eager,
    find_recurrent_cells,
    flat_tensors,
    norm32,
)

__all__ = ["doctor"]


def _check_arguments(model: object, batch: object, loss_fn: object, optimizer: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("doctor: batch must be an (inputs, targets) pair; the model is called as model(inputs)")
    if not callable(loss_fn):
        raise TypeError(f"doctor: loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"doctor: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("doctor: model has no parameters to diagnose")


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


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks: the children of the first module (from the root down) with more than one child."""
    prefix, module = "", model
    while True:
        children = list(module.named_children())
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    return [(prefix + name, child) for name, child in children
            if next(child.parameters(), None) is not None]


def _first_floating(call: ModuleCall) -> int | None:
    leaves = [i for i, x in enumerate(call.args) if isinstance(x, Tensor)]
    return next((i for i in leaves if call.args[i].is_floating_point()), None)


def _short(error: Exception) -> str:
    text = str(error).split(". ")[0]
    return f"{type(error).__name__}: {text[:160]}"


def _jacobians(model: nn.Module, inputs: Any, calls: list[ModuleCall], iterations: int,
               notes: list[str]) -> dict[str, Any]:
    """Largest singular value of the input-output Jacobian and of each block's Jacobian, in eval mode.

    Every power-iteration step must see the same function: eval mode turns dropout off and makes batch
    norm use its running statistics instead of updating them in place (which ``torch.func`` refuses).
    Each module's own mode is restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return _measure_jacobians(model, inputs, calls, iterations, notes)
    finally:
        for module, training in modes:
            module.training = training


def _measure_jacobians(model: nn.Module, inputs: Any, calls: list[ModuleCall], iterations: int,
                       notes: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"input_output": None, "blocks": {}}
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        try:
            result["input_output"] = spectral_norm(lambda x: tuple(flat_tensors(model(x))), (inputs,),
                                                   iterations).value
        except Exception as error:  # an op without forward-mode AD, a data-dependent branch...
            notes.append(f"input-output Jacobian not measured: {_short(error)}")
    else:
        notes.append("input-output Jacobian not measured: the model input is not a floating-point tensor")
    first_call: dict[int, ModuleCall] = {}
    for call in calls:
        first_call.setdefault(id(call.module), call)
    for name, block in _blocks(model):
        block_call = first_call.get(id(block))
        position = _first_floating(block_call) if block_call is not None else None
        if block_call is None or position is None:
            continue
        args = list(block_call.args)

        def block_fn(x: Tensor, block: nn.Module = block, args: list = args, position: int = position,
                     kwargs: dict = block_call.kwargs) -> tuple:
            return tuple(flat_tensors(block(*args[:position], x, *args[position + 1:], **kwargs)))

        try:
            result["blocks"][name] = spectral_norm(block_fn, (args[position].detach(),), iterations).value
        except Exception as error:
            result["blocks"][name] = None
            notes.append(f"Jacobian of block {name} not measured: {_short(error)}")
    return result


def _time_flow(trace: ForwardTrace, recorder: RecurrentRecorder, cells: list[RecurrentCell],
               iterations: int, notes: list[str]) -> TimeFlow | None:
    """Time flow of the recurrent module that runs first."""
    position = {id(call): i for i, call in enumerate(trace.calls)}
    first_position: dict[str, int] = {}
    for i, call in enumerate(trace.calls):
        first_position.setdefault(call.name, i)
    candidates: list[tuple[int, Callable[[], TimeFlow]]] = []
    for run in recorder.runs:
        candidates.append((first_position.get(run.name, 0), functools.partial(rnn_time_flow, run, iterations)))
    for cell in cells:
        candidates.append((position[id(cell.calls[0])], functools.partial(cell_time_flow, cell, iterations)))
    for name, reason in recorder.skipped.items():
        notes.append(f"time flow of {name} not measured: {reason}")
    notes.extend(recorder.notes)
    if not candidates:
        return None
    try:
        return min(candidates, key=lambda c: c[0])[1]()
    except Exception as error:
        notes.append(f"time flow not measured: {_short(error)}")
        return None


@dataclass
class _TracedPass:
    """The doctor's forward/backward pass: its trace, the recurrent runs, the loss and the gradients."""

    trace: ForwardTrace
    recorder: RecurrentRecorder
    loss: Tensor
    stats: GradStats
    input_grad_norm: Tensor | None


def _traced_pass(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], Tensor]) -> _TracedPass:
    """One forward and backward pass under a trace; the input, if a float tensor, made a leaf with a gradient."""
    leaf_input = inputs
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        leaf_input = inputs.detach().requires_grad_(True)
    recorder = RecurrentRecorder()
    with ForwardTrace(model, rewrite_output=recorder) as trace:
        loss = loss_fn(model(leaf_input), targets)
    if not (isinstance(loss, Tensor) and loss.numel() == 1):
        raise TypeError(f"doctor: loss_fn must return a scalar tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError("doctor: the loss does not depend on any parameter that requires grad")
    loss.reshape(()).backward()
    input_grad = leaf_input.grad if leaf_input is not inputs else None
    input_grad_norm = norm32(input_grad) if input_grad is not None else None
    return _TracedPass(trace, recorder, loss, grad_stats(model), input_grad_norm)


def _overall_verdict(depth: DepthFlow, time: TimeFlow | None,
                     origin: NonfiniteOrigin | None) -> tuple[str, str | None]:
    """Exploding if depth or time explodes (or NaN/Inf appear), else vanishing if either vanishes; and where."""
    if origin is not None:
        return "exploding", origin.module
    verdicts = [depth.verdict] + ([time.verdict] if time is not None else [])
    verdict = next((v for v in ("exploding", "vanishing") if v in verdicts), "stable")
    if verdict == "stable":
        return verdict, None
    if depth.verdict == verdict:
        return verdict, depth.start_layer
    return verdict, time.module if time is not None else None


def _updates(model: nn.Module, optimizer: torch.optim.Optimizer | None, notes: list[str]) -> list | None:
    if optimizer is None:
        return None
    try:
        return relative_updates(model, optimizer)
    except Exception as error:  # an optimizer whose step needs a closure (LBFGS), a custom one that fails
        notes.append(f"update sizes not measured: {_short(error)}")
        return None


_DEPTH_CAUSES = ("init_scale", "activation", "depth", "nonfinite")  # nonfinite: an overflow of the signal


def _check_flow_fixes(findings: list[Finding], model: nn.Module, batch: tuple[Any, Any],
                      loss_fn: Callable[[Any, Any], Tensor], iterations: int, cells_present: bool) -> None:
    """Apply each flow finding's remedy to a copy of the model and keep the first remedy that works."""
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

        candidates = [finding.remedy] if over_time else flow_candidates(finding.remedy, model, cells_present)
        remedy, outcome = first_stabilising(candidates, model, batch, verdict_after)
        finding.remedy, finding.fix = remedy, remedy.code
        axis = "over time" if over_time else "across depth"
        finding.evidence["flow_after_fix"] = outcome or "stable"
        if outcome is not None:
            finding.message += f" (checked on a copy of the model: after this fix the flow {axis} is {outcome})"


def doctor(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    jacobians: bool = True,
    jacobian_iterations: int = 20,
    check_fixes: bool = True,
) -> DoctorReport:
    """Diagnose how gradients flow through ``model`` at its current weights, and what to change.

    Args:
        model: called as ``model(inputs)``.
        batch: ``(inputs, targets)``; a few dozen samples are enough.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar.
        optimizer: optional; when given, the relative update of one step is measured (and undone).
        jacobians: measure the input-output and per-block Jacobian spectral norms (the costliest part:
            ``2 * jacobian_iterations`` passes per block). ``||dh_T/dh_0||`` is always measured.
        jacobian_iterations: power-iteration steps at most for each spectral norm.
        check_fixes: apply the fix of each flow finding to a deep copy of the model and diagnose the copy
            (without Jacobians); when it does not make the flow stable, try the other flow remedies
            (``remedies.py``) and report the first that does. Costs one doctor pass per remedy tried.

    For a quick reading of the flow alone (what the lab does for every run), pass ``jacobians=False,
    check_fixes=False``: one forward/backward pass, plus the power iteration of ``||dh_T/dh_0||`` for
    recurrent models.

    Returns:
        A :class:`DoctorReport`: ``print(report)``, ``report.verdict``, ``report.start_layer``,
        ``report.findings``, ``report.time_flow``, ``report.to_dict()``, ``report.to_html(path)``.
    """
    _check_arguments(model, batch, loss_fn, optimizer)
    if jacobian_iterations < 1:
        raise ValueError(f"doctor: jacobian_iterations must be >= 1, got {jacobian_iterations}")
    inputs, targets = batch
    notes: list[str] = []
    with preserved(model), eager():
        traced = _traced_pass(model, inputs, targets, loss_fn)
        trace, stats = traced.trace, traced.stats

        cells = find_recurrent_cells(trace.calls)
        cell_names = [c.name for c in cells]
        recurrent_call_ids = {id(c) for c in trace.calls
                              if isinstance(c.module, nn.RNNBase) or _inside(c.name, cell_names)}
        inside_cells = {id(c.module) for c in trace.calls if _inside(c.name, cell_names)}
        depth = depth_flow(trace.calls, stats, traced.input_grad_norm, recurrent_call_ids, inside_cells)
        time = _time_flow(trace, traced.recorder, cells, jacobian_iterations, notes)

        order = _execution_order(trace.calls)
        weight_layers = {id(m) for _, m in order if next(m.parameters(recurse=False), None) is not None}
        activations = activation_stats(trace.calls, weight_layers)
        square = _cell_square_weights(cells)
        init_checks = audit_init(order, following_in_order(order), square)
        cell_leaves = {c: [m for n, m in order if _inside(n, [c])] for c in cell_names}
        bounds = audit_recurrent(order, cells, cell_leaves)
        updates = _updates(model, optimizer, notes)

        loss_value, total_norm = float(traced.loss.detach()), float(stats.total_norm)
        origin = None
        if not (math.isfinite(loss_value) and math.isfinite(total_norm)):
            origin = locate_nonfinite(model, batch, loss_fn)
        jacobian = _jacobians(model, inputs, trace.calls, jacobian_iterations, notes) if jacobians \
            else {"input_output": None, "blocks": {}}

    verdict, start = _overall_verdict(depth, time, origin)
    findings = build_findings(depth=depth, time=time, init_checks=init_checks, bounds=bounds,
                              activations=activations, updates=updates, origin=origin, jacobian=jacobian,
                              model=model, cells_present=any(square))
    if check_fixes:
        _check_flow_fixes(findings, model, batch, loss_fn, jacobian_iterations, cells_present=any(square))
    return DoctorReport(verdict, start, findings, depth, time, activations, init_checks, bounds, jacobian,
                        updates, origin, loss_value, total_norm, notes)

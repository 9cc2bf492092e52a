"""Where a NaN or Inf first appears: the module, the pass, and what went into it.

``torch.autograd.detect_anomaly`` checks the backward pass only, for NaN only, names an autograd function
rather than a module, and slows every op. :func:`locate_nonfinite` instead runs one forward and one backward
pass with a hook on every module:

* forward: each module's output gets an on-device finiteness flag (``aminmax``) as its forward hook runs;
  hooks run in completion order (a child before its container), so the first flagged call is the innermost
  module that first produced a non-finite value;
* backward: a tensor hook on each module output flags ``dL/dy`` in the order backward computes them. The
  first non-finite ``dL/dy`` was produced by the backward of the module that *consumed* ``y`` (found by
  tensor identity); a module whose own parameter gradients are non-finite while its ``dL/dy`` is finite is
  caught from ``grad_stats``.

All flags stay on the device until one host read after the forward pass and one after the backward pass:
the cost is one training step plus a reduction per module output and gradient (measured in
``benchmarks/bench_nonfinite.py``). The backward pass runs only when the forward pass and the loss are finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.doctor.preserve import preserved
from gradguard.doctor.trace import flat_tensors
from gradguard.stats import grad_stats

__all__ = ["NonfiniteOrigin", "TensorStats", "locate_nonfinite", "tensor_stats"]

INPUTS = "(inputs)"
LOSS = "(loss_fn)"
ROOT = "(model)"  # an operation in the root module's own forward, outside any submodule


@dataclass
class TensorStats:
    """Summary of one tensor: min/max/mean/std over its finite elements, and its NaN and Inf counts."""

    shape: list[int]
    dtype: str
    min: float
    max: float
    mean: float
    std: float
    nan: int
    inf: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.dtype}{self.shape} min={self.min:.3g} max={self.max:.3g} mean={self.mean:.3g} "
                f"std={self.std:.3g} nan={self.nan} inf={self.inf}")


def tensor_stats(t: Tensor) -> TensorStats:
    x = t.detach()
    if not x.is_floating_point():
        x = x.float()
    finite = x[torch.isfinite(x)].float()
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    if finite.numel():
        low, high, mean = float(finite.min()), float(finite.max()), float(finite.mean())
        std = float(finite.std()) if finite.numel() > 1 else 0.0
    else:
        low = high = mean = std = float("nan")
    return TensorStats(list(t.shape), str(t.dtype).replace("torch.", ""), low, high, mean, std, nan, inf)


@dataclass
class NonfiniteOrigin:
    """The first place a NaN or Inf appears.

    Attributes:
        module: module path; ``"(inputs)"`` when the batch inputs already hold one; ``"(loss_fn)"`` when the
            loss function produced it (forward) or its gradient (backward); ``"(model)"`` for an operation in
            the root module's own ``forward``, outside any submodule.
        phase: ``"forward"`` (in the module's output) or ``"backward"`` (in the gradient its backward made).
        kind: ``"nan"`` or ``"inf"`` (NaN wins when both are present).
        inputs: statistics of the module's input tensors (forward values).
        inputs_finite: whether those inputs were all finite; False means the values came in already bad,
            from an operation outside any module (a ``torch.*`` call in a ``forward``) or from the data.
        grad_outputs: backward phase only: statistics of ``dL/dy`` arriving at the module's outputs.
    """

    module: str
    phase: str
    kind: str
    inputs: list[TensorStats] = field(default_factory=list)
    inputs_finite: bool = True
    grad_outputs: list[TensorStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "phase": self.phase,
            "kind": self.kind,
            "inputs": [s.to_dict() for s in self.inputs],
            "inputs_finite": self.inputs_finite,
            "grad_outputs": [s.to_dict() for s in self.grad_outputs],
        }

    def __str__(self) -> str:
        where = {"forward": "output", "backward": "gradient"}[self.phase]
        lines = [f"first {self.kind.upper()}: {where} of {self.module!r} in the {self.phase} pass"]
        if not self.inputs_finite:
            lines.append("  its inputs were already non-finite (an op outside any module, or the data)")
        lines += [f"  input {i}: {s}" for i, s in enumerate(self.inputs)]
        lines += [f"  dL/d output {i}: {s}" for i, s in enumerate(self.grad_outputs)]
        return "\n".join(lines)


@dataclass
class _Call:
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    finite: Tensor


def _finite(t: Tensor) -> Tensor:
    """0-d bool tensor: every element of ``t`` is finite.

    One min/max reduction instead of ``isfinite(t).all()``: min and max propagate NaN and reach +-Inf, so
    they are finite exactly when every element is, and the reduction writes no boolean tensor of ``t``'s
    size (on CPU, ``isfinite`` costs several times a reduction).
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t.detach())
    return torch.isfinite(low) & torch.isfinite(high)


def _all_finite(tensors: list[Tensor]) -> Tensor:
    flags = [_finite(t) for t in tensors if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def _kind(tensors: list[Tensor]) -> str:
    return "nan" if any(bool(torch.isnan(t).any()) for t in tensors if t.is_floating_point()) else "inf"


def _floating(tensors: list[Tensor]) -> list[Tensor]:
    return [t for t in tensors if t.is_floating_point()]


def _check_batch(model: object, batch: object, loss_fn: object) -> tuple[Any, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate_nonfinite: model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("locate_nonfinite: batch must be an (inputs, targets) pair")
    if not callable(loss_fn):
        raise TypeError(f"locate_nonfinite: loss_fn must be callable, got {type(loss_fn).__name__}")
    return batch[0], batch[1]


def locate_nonfinite(
    model: nn.Module, batch: tuple[Any, Any], loss_fn: Callable[[Any, Any], Tensor]
) -> NonfiniteOrigin | None:
    """The first module, in execution order, whose forward output or backward gradient holds NaN or Inf.

    Args:
        model: called as ``model(inputs)``.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar.

    Returns:
        None when the forward values, the loss and every gradient are finite, else a
        :class:`NonfiniteOrigin`. The model's parameters and ``.grad`` are left as they were.
    """
    inputs, targets = _check_batch(model, batch, loss_fn)
    input_tensors = _floating(flat_tensors(inputs))
    if input_tensors and not bool(_all_finite(input_tensors)):
        return NonfiniteOrigin(INPUTS, "forward", _kind(input_tensors), [tensor_stats(t) for t in input_tensors])
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        # A leaf that takes a gradient, so the first module's backward is checked too.
        inputs = inputs.detach().requires_grad_(True)

    calls: list[_Call] = []
    grad_flags: list[tuple[int, Tensor, Tensor]] = []  # (call index, finite, the gradient) in backward order

    def forward_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            outs = flat_tensors(output)
            index = len(calls)
            calls.append(_Call(name, flat_tensors((args, kwargs)), outs, _all_finite(outs)))
            for out in outs:
                if out.requires_grad:
                    out.register_hook(lambda g, i=index: grad_flags.append((i, _finite(g), g)))

        return hook

    handles = [m.register_forward_hook(forward_hook(n), with_kwargs=True) for n, m in model.named_modules()
               if n]  # the root's output is the model output: checked as the loss's input below
    try:
        with preserved(model):
            return _run(model, inputs, targets, loss_fn, calls, grad_flags, input_tensors)
    finally:
        for handle in handles:
            handle.remove()


def _run(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], Tensor], calls: list[_Call],
         grad_flags: list[tuple[int, Tensor, Tensor]], input_tensors: list[Tensor]) -> NonfiniteOrigin | None:
    """The checked forward pass, the loss, and the checked backward pass (hooks already in place)."""
    output = model(inputs)
    # A module with no floating output has a CPU flag; gather every flag on one device for one read.
    device = calls[0].finite.device if calls else None
    forward_flags = torch.stack([c.finite.to(device) for c in calls]).tolist() if calls else []
    for call, finite in zip(calls, forward_flags):
        if not finite:
            return NonfiniteOrigin(
                call.name, "forward", _kind(call.outputs), [tensor_stats(t) for t in call.inputs],
                bool(_all_finite(call.inputs)))
    output_tensors = flat_tensors(output)
    if output_tensors and not bool(_all_finite(output_tensors)):  # an op in the root's own forward
        return NonfiniteOrigin(ROOT, "forward", _kind(output_tensors),
                               [tensor_stats(t) for t in input_tensors], True)
    loss = loss_fn(output, targets)
    if not bool(_all_finite([loss])):
        return NonfiniteOrigin(LOSS, "forward", _kind([loss]), [tensor_stats(t) for t in output_tensors])
    loss.backward()
    return _backward_origin(model, calls, grad_flags, output_tensors, inputs)


def _consumer(calls: list[_Call], tensor: Tensor, after: int) -> int | None:
    """Index of the first call after ``after`` that took ``tensor`` as an input."""
    for j in range(after + 1, len(calls)):
        if any(t is tensor for t in calls[j].inputs):
            return j
    return None


def _backward_origin(model: nn.Module, calls: list[_Call], grad_flags: list[tuple[int, Tensor, Tensor]],
                     output_tensors: list[Tensor], inputs: Any) -> NonfiniteOrigin | None:
    stats = grad_stats(model)
    device = grad_flags[0][1].device if grad_flags else stats.norms.device
    flags = torch.stack([f.to(device) for _, f, _ in grad_flags] + [stats.norms.isfinite().all().to(device)]).tolist()
    params_finite = flags.pop()
    layer_finite = {} if params_finite else dict(zip(stats.names, stats.norms.isfinite().tolist()))
    grad_finite_at: dict[int, bool] = {}
    for (index, _, _), finite in zip(grad_flags, flags):
        grad_finite_at[index] = grad_finite_at.get(index, True) and finite

    # (call index whose backward made a non-finite gradient, the non-finite gradients it made)
    candidates: list[tuple[int, list[Tensor]]] = []
    first_bad = next(((i, g) for (i, _, g), ok in zip(grad_flags, flags) if not ok), None)
    if first_bad is not None:
        index, grad = first_bad
        if any(t.requires_grad and any(t is o for o in output_tensors) for t in calls[index].outputs):
            return NonfiniteOrigin(LOSS, "backward", _kind([grad]), [], True, [tensor_stats(grad)])
        bad_tensor = next(t for t in calls[index].outputs if t.requires_grad)
        consumer = _consumer(calls, bad_tensor, index)
        candidates.append((consumer if consumer is not None else index, [grad]))
    for j, call in enumerate(calls):  # parameter gradients made non-finite by the module's own backward
        if layer_finite.get(call.name, True) is False and grad_finite_at.get(j, True):
            own = [p.grad for n, p in call_parameters(model, call.name) if p.grad is not None]
            candidates.append((j, own))
    input_grad = inputs.grad if isinstance(inputs, Tensor) else None
    if not candidates and input_grad is not None and not bool(torch.isfinite(input_grad).all()):
        consumer = _consumer(calls, inputs, -1)
        candidates.append((consumer if consumer is not None else 0, [input_grad]))
    if not candidates:
        return None
    # Backward runs in reverse: the origin is the candidate latest in forward order.
    j, bad_grads = max(candidates, key=lambda c: c[0])
    call = calls[j]
    grads_in = [g for i, _, g in grad_flags if i == j]
    return NonfiniteOrigin(call.name, "backward", _kind(bad_grads), [tensor_stats(t) for t in call.inputs],
                           bool(_all_finite(call.inputs)), [tensor_stats(g) for g in grads_in])


def call_parameters(model: nn.Module, name: str) -> list[tuple[str, Tensor]]:
    """The parameters a module owns directly."""
    return list(model.get_submodule(name).named_parameters(recurse=False))

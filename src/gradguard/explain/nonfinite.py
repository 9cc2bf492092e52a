"""Where a NaN or Inf first appears: the module, the pass, the operation, and what went into it.

``torch.autograd.detect_anomaly`` checks the backward pass only, for NaN only, names an autograd function
rather than a module, and slows every op. :func:`locate_nonfinite` instead runs one forward and one backward
pass and names *the innermost module whose own computation first produced the non-finite value*: its own
computation is everything that runs between the start and the end of its call (its forward, its
functional ops such as ``torch.sqrt``, its forward hooks) except the calls of its submodules, which are
theirs.

* Forward: a pre-hook and a forward hook on every module delimit each call; the forward hook flags the
  call's outputs (one ``aminmax``, on the device). Calls complete child first, so the first flagged call
  is the innermost one that returned a non-finite value. If its inputs were already non-finite, the value
  was made before it by an op of a module it runs inside: the origin is the innermost enclosing call
  whose inputs were finite (``"(model)"`` for the root's own code).
* Backward: every node of the autograd graph gets a post-hook flagging the gradients it received and
  those it made. The first node, in the order backward runs them, to make a non-finite gradient from
  finite ones is where it started. Autograd numbers nodes in creation order (``sequence_nr``) and each
  call records the numbers handed out while it ran, so the node names the innermost call that created it
  (``"(loss_fn)"`` after the model's call). This is what a gradient hook on module outputs cannot do:
  when ``h = self.fc(x); y = h + torch.sqrt(h * 0)`` makes ``dL/dh`` NaN, the op that made it ran in the
  module around ``fc``, not in ``fc``.

All flags stay on the device until one host read after the forward pass and one after the backward pass:
the cost is one training step plus a reduction per module output and per gradient (measured in
``benchmarks/bench_nonfinite.py``). The backward pass runs only when the forward pass and the loss are
finite. A model built with ``torch.compile`` runs eagerly here (``trace.eager``): its module calls are then the
user's, and names drop wrapper prefixes (``names.user_name``), the real path kept in ``origin.path``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from gradguard.explain.preserve import preserved
from gradguard.names import user_name
from gradguard.stats import grad_stats
from gradguard.trace import eager, flat_tensors

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
    if x.is_complex():
        x = torch.view_as_real(x)
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
        module: the module's name (wrapper prefixes removed); ``"(inputs)"`` when the batch inputs already
            hold one; ``"(loss_fn)"`` when the loss function produced it (forward) or its gradient
            (backward); ``"(model)"`` for an operation in the root module's own ``forward``.
        phase: ``"forward"`` (in the module's output) or ``"backward"`` (in a gradient its backward made).
        kind: ``"nan"`` or ``"inf"`` (NaN wins when both are present).
        inputs: statistics of the module's input tensors (forward values).
        inputs_finite: whether those inputs were all finite.
        grad_outputs: backward phase only: statistics of ``dL/dy`` arriving at the module's outputs.
        op: backward phase only: the autograd node that made the first non-finite gradient
            (``"SqrtBackward0"``).
        path: the module's path in the model as given (``"_orig_mod.blocks.1"``); empty for the
            parenthesised names.
    """

    module: str
    phase: str
    kind: str
    inputs: list[TensorStats] = field(default_factory=list)
    inputs_finite: bool = True
    grad_outputs: list[TensorStats] = field(default_factory=list)
    op: str | None = None
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "phase": self.phase,
            "kind": self.kind,
            "inputs": [s.to_dict() for s in self.inputs],
            "inputs_finite": self.inputs_finite,
            "grad_outputs": [s.to_dict() for s in self.grad_outputs],
            "op": self.op,
            "path": self.path,
        }

    def __str__(self) -> str:
        where = {"forward": "output", "backward": "gradient"}[self.phase]
        lines = [f"first {self.kind.upper()}: {where} of {self.module!r} in the {self.phase} pass"
                 + (f" (made by {self.op})" if self.op else "")]
        if self.path and self.path != self.module:
            lines.append(f"  module path in the wrapped model: {self.path!r}")
        if not self.inputs_finite:
            lines.append("  its inputs were already non-finite (an op outside any module, or the data)")
        lines += [f"  input {i}: {s}" for i, s in enumerate(self.inputs)]
        lines += [f"  dL/d output {i}: {s}" for i, s in enumerate(self.grad_outputs)]
        return "\n".join(lines)


def _flat(t: Tensor) -> Tensor:
    """A dense real view of ``t`` for the min/max reduction (sparse gradients, complex values)."""
    if t.is_sparse:
        t = t.coalesce().values()
    return torch.view_as_real(t) if t.is_complex() else t


def _finite(t: Tensor) -> Tensor:
    """0-d bool tensor: every element of ``t`` is finite.

    One min/max reduction instead of ``isfinite(t).all()``: min and max propagate NaN and reach +-Inf, so
    they are finite exactly when every element is, and the reduction writes no boolean tensor of ``t``'s
    size (on CPU, ``isfinite`` costs several times a reduction).
    """
    t = _flat(t.detach())
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


def _nan(t: Tensor) -> Tensor:
    """0-d bool tensor: ``t`` holds a NaN (min and max propagate it)."""
    t = _flat(t.detach())
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isnan(low) | torch.isnan(high)


def _inexact(tensors: list[Tensor]) -> list[Tensor]:
    return [t for t in tensors if t.is_floating_point() or t.is_complex()]


def _all_finite(tensors: list[Tensor], device: torch.device | None = None) -> Tensor:
    flags = [_finite(t).to(device) if device is not None else _finite(t) for t in _inexact(tensors)]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _kind(tensors: list[Tensor]) -> str:
    return "nan" if any(bool(_nan(t)) for t in _inexact(tensors)) else "inf"


def _next_node_number() -> int:
    """The ``sequence_nr`` autograd will give the next node created in this thread."""
    return int(torch._C._autograd._get_sequence_nr())


@dataclass
class _Call:
    """One module call: its place in the call tree, the autograd node numbers handed out while it ran."""

    path: str
    parent: int | None
    inputs: list[Tensor]
    first_node: int
    end_node: int = -1
    outputs: list[Tensor] = field(default_factory=list)
    finite: Tensor | None = None
    grads: list[Tensor] = field(default_factory=list)  # dL/dy received at its outputs


class _Watch:
    """Hooks on every module, the root included: the calls of a forward pass and the gradients at their outputs.

    The pre-hook is put first and the forward hook last, so a call's region includes the user's own
    pre-hooks and forward hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[_Call] = []  # in the order the calls started
        self.completed: list[int] = []  # indices into ``calls`` in the order they returned (child first)
        self._stack: list[int] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Watch:
        for path, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(path), with_kwargs=True, prepend=True))
            self._handles.append(module.register_forward_hook(self._exit, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            parent = self._stack[-1] if self._stack else None
            self._stack.append(len(self.calls))
            self.calls.append(_Call(path, parent, flat_tensors((args, kwargs)), _next_node_number()))

        return hook

    def _exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        index = self._stack.pop()
        self.completed.append(index)
        call = self.calls[index]
        call.end_node = _next_node_number()
        call.outputs = flat_tensors(output)
        call.finite = _all_finite(call.outputs)
        for out in call.outputs:
            if out.requires_grad:
                out.register_hook(lambda g, c=call: None if g is None else c.grads.append(g))

    def innermost(self, node_number: int) -> int | None:
        """Index of the innermost call during which the node numbered ``node_number`` was created."""
        # The calls around a node form a chain, and the innermost started last.
        return max((i for i, c in enumerate(self.calls) if c.first_node <= node_number < c.end_node), default=None)


def _graph_nodes(root: Any) -> list[Any]:
    """Every node of the autograd graph that ends in ``root`` (gradient accumulators left out)."""
    nodes, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if not hasattr(node, "variable"):  # AccumulateGrad makes no gradient of its own
            nodes.append(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return nodes


class _NodeFlags:
    """A post-hook on each node flags each gradient it makes (finite, holds NaN), in backward order.

    Whether a node *received* a non-finite gradient is not measured again: it did when a node that ran
    before it made one for it (its consumers all run before it). So each gradient is reduced once.
    """

    def __init__(self, nodes: list[Any]) -> None:
        self.order: list[tuple[Any, list[int]]] = []  # (node, slots of next_functions holding a gradient)
        self.flags: list[Tensor] = []  # per node: [[finite, nan], ...] for the gradients it made
        self._handles = [node.register_hook(self._hook(node)) for node in nodes]

    def _hook(self, node: Any) -> Callable:
        def hook(made: tuple, received: tuple) -> None:
            slots = [i for i, g in enumerate(made) if g is not None and (g.is_floating_point() or g.is_complex())]
            if slots:
                self.order.append((node, slots))
                self.flags.append(torch.stack([torch.stack([_finite(made[i]), _nan(made[i])]) for i in slots]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def first_maker(self) -> tuple[Any, str] | None:
        """The first node that made a non-finite gradient from finite ones, and the kind it made."""
        if not self.flags:
            return None
        device = self.flags[0].device
        rows = torch.cat([f.to(device) for f in self.flags]).tolist()
        poisoned: set[Any] = set()  # nodes that received a non-finite gradient
        position = 0
        for node, slots in self.order:
            made = rows[position: position + len(slots)]
            position += len(slots)
            bad = [(slot, nan) for slot, (finite, nan) in zip(slots, made) if not finite]
            if bad and node not in poisoned:
                return node, "nan" if any(nan for _, nan in bad) else "inf"
            for slot, _ in bad:
                poisoned.add(node.next_functions[slot][0])
        return None


def locate_nonfinite(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> NonfiniteOrigin | None:
    """The innermost module whose own computation first made a NaN or Inf, in the forward or backward pass.

    Args:
        model: called as ``model(inputs)``, or ``model(**batch)`` for a dict batch.
        batch: ``(inputs, targets)``, or a dict of keyword inputs (the convention of ``gradguard.batch``).
        loss_fn: ``loss_fn(output, targets)`` returns a scalar; None for a dict batch reads the loss from
            the output (``output.loss``, as a Hugging Face model computes it from ``labels``).

    Returns:
        None when the forward values, the loss and every gradient are finite, else a
        :class:`NonfiniteOrigin`. The model's parameters and ``.grad`` are left as they were.
    """
    check_model_and_loss_fn(model, loss_fn, "locate_nonfinite")
    split, _ = leaf_inputs(as_batch(batch, "locate_nonfinite"))
    input_tensors = _inexact(flat_tensors(split.inputs))
    if input_tensors and not bool(_all_finite(input_tensors)):
        return NonfiniteOrigin(INPUTS, "forward", _kind(input_tensors), [tensor_stats(t) for t in input_tensors])
    with preserved(model), eager(), _Watch(model) as watch:
        return _run(model, split, loss_fn, watch)


def _origin_at(watch: _Watch, index: int, phase: str, kind: str, op: str | None = None) -> NonfiniteOrigin:
    call = watch.calls[index]
    name = user_name(call.path)  # "" for the root, also when it is torch.compile's "_orig_mod"
    return NonfiniteOrigin(name or ROOT, phase, kind, [tensor_stats(t) for t in call.inputs],
                           bool(_all_finite(call.inputs)), [tensor_stats(g) for g in call.grads], op, call.path)


def _run(model: nn.Module, batch: Batch, loss_fn: LossFn | None, watch: _Watch) -> NonfiniteOrigin | None:
    """The checked forward pass, the loss, and the checked backward pass (hooks already in place)."""
    output, loss = forward_loss(model, batch, loss_fn)
    loss = scalar_loss(loss, "locate_nonfinite")
    calls = watch.calls
    if watch.completed:
        finished = [calls[i].finite for i in watch.completed]
        device = finished[0].device  # type: ignore[union-attr]
        flags = torch.stack([f.to(device) for f in finished]).tolist()  # type: ignore[union-attr]
        bad = next((i for i, finite in zip(watch.completed, flags) if not finite), None)
        if bad is not None:
            kind = _kind(calls[bad].outputs)
            index: int = bad
            while calls[index].parent is not None and not bool(_all_finite(calls[index].inputs)):
                index = calls[index].parent  # type: ignore[assignment]
            return _origin_at(watch, index, "forward", kind)
    output_tensors = _inexact(flat_tensors(output))
    if not bool(_all_finite([loss])):
        return NonfiniteOrigin(LOSS, "forward", _kind([loss]), [tensor_stats(t) for t in output_tensors])
    if not loss.requires_grad:
        return None
    node_flags = _NodeFlags(_graph_nodes(loss.grad_fn))
    try:
        loss.backward()
    finally:
        node_flags.remove()
    first = node_flags.first_maker()
    if first is not None:
        node, kind = first
        op = node.name().split("::")[-1]
        index_or_none = watch.innermost(node._sequence_nr())
        if index_or_none is not None:
            return _origin_at(watch, index_or_none, "backward", kind, op)
        root_end = calls[0].end_node if calls else 0
        where = LOSS if node._sequence_nr() >= root_end else INPUTS
        stats = [tensor_stats(t) for t in output_tensors] if where == LOSS else []
        return NonfiniteOrigin(where, "backward", kind, stats, True, [], op)
    return _parameter_origin(model, watch)


def _parameter_origin(model: nn.Module, watch: _Watch) -> NonfiniteOrigin | None:
    """A parameter gradient made non-finite outside any autograd node (a hook on the parameter)."""
    stats = grad_stats(model)
    if bool(stats.finite):
        return None
    bad = [name for name, finite in zip(stats.names, stats.norms.isfinite().tolist()) if not finite]
    for index, call in enumerate(watch.calls):
        if user_name(call.path) in bad:
            own = [p.grad for p in model.get_submodule(call.path).parameters(recurse=False) if p.grad is not None]
            return _origin_at(watch, index, "backward", _kind(own))
    return NonfiniteOrigin(bad[0], "backward", "nan", [], True, [])

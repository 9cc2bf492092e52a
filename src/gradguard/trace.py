"""Forward trace: every module call of one forward pass, in execution order.

Forward hooks record each call (module name, inputs, outputs) in the order the calls *complete*, so a child
comes before the container that called it. After ``backward`` each recorded output also holds the norm of
the gradient of the loss with respect to it, ``||dL/dy||``: the error signal the doctor follows through
depth and time. The norms are device tensors; nothing is read to the host while tracing.

Recurrent cells written by hand are found from the trace, not from their class: a module called more than
once in a forward pass, where an output tensor of each call is an input of the next call (``h_t =
cell(x_t, h_{t-1})``; a tuple state such as ``(h, c)`` works the same way). The state may not pass
through anything else between calls (a dropout on ``h`` hides the cell).

Module calls are seen one by one only when the model runs eagerly: ``torch.compile`` fuses a model into
graphs whose intermediate outputs are not the tensors the hooks would watch (their gradients arrive as
None or not at all). Tracing therefore runs inside :func:`eager`, where compiled modules run their
original Python code. Names are the user's (``names.user_name``: ``_orig_mod.``, ``module.``, FSDP's
prefixes removed); the real path stays in ``ModuleCall.path``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from gradguard.names import user_name
from gradguard.stats import per_tensor_norms

__all__ = ["ModuleCall", "ForwardTrace", "RecurrentCell", "eager", "find_recurrent_cells", "leaf_calls"]

# A forward hook may rewrite a module's output (the doctor steps nn.RNN by hand this way).
OutputRewriter = Callable[[str, nn.Module, tuple, dict, Any], Any]


@dataclass
class ModuleCall:
    """One call of one module.

    Attributes:
        name: the module's name for the user (``"layers.3"``): its path without wrapper prefixes.
        module: the module itself.
        args, kwargs: what it was called with (references, not copies).
        inputs: the tensors among ``args``/``kwargs``, flattened in pytree order.
        outputs: the tensors of its output, flattened in pytree order.
        output_grad_norms: for each output, ``||dL/dy||`` once backward has run (a 0-d float32 device
            tensor), None while unknown or when the output takes no gradient.
        path: the module's path in the model as ``named_modules`` gives it (``"_orig_mod.layers.3"``).
    """

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    inputs: list[Tensor]
    outputs: list[Tensor]
    output_grad_norms: list[Tensor | None] = field(default_factory=list)
    path: str = ""

    @property
    def is_leaf(self) -> bool:
        return next(self.module.children(), None) is None


def norm32(t: Tensor) -> Tensor:
    """``||t||_2`` as a float32 0-d tensor for any floating dtype (``grad_stats``' per-tensor norm)."""
    return per_tensor_norms([t], 2.0)[0]


def flat_tensors(tree: Any) -> list[Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled models and modules (``torch.compile``) as plain Python inside: ``set_stance("force_eager")``."""
    with torch.compiler.set_stance("force_eager"):
        yield


class ForwardTrace:
    """Context manager that records the module calls of the forward passes run inside it.

    Args:
        model: the model; every submodule is hooked (the root too, named ``""``).
        grad_norms: also record ``||dL/dy||`` of every output that requires grad.
        rewrite_output: optional ``fn(name, module, args, kwargs, output) -> output or None``; a non-None
            result replaces the module's output.

    Hooks are removed on exit, also when the forward pass raises.
    """

    def __init__(
        self, model: nn.Module, *, grad_norms: bool = True, rewrite_output: OutputRewriter | None = None
    ) -> None:
        self.model = model
        self.grad_norms = grad_norms
        self.rewrite_output = rewrite_output
        self.calls: list[ModuleCall] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardTrace:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.rewrite_output is not None:
                rewritten = self.rewrite_output(user_name(name), module, args, kwargs, output)
                if rewritten is not None:
                    output = rewritten
            outputs = flat_tensors(output)
            call = ModuleCall(user_name(name), module, args, kwargs, flat_tensors((args, kwargs)), outputs,
                              path=name)
            call.output_grad_norms = [None] * len(outputs)
            if self.grad_norms:
                for i, out in enumerate(outputs):
                    if out.requires_grad:
                        out.register_hook(self._grad_norm_hook(call, i))
            self.calls.append(call)
            return output

        return hook

    @staticmethod
    def _grad_norm_hook(call: ModuleCall, index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor | None) -> None:
            # None: an output of a multi-output op that nothing used (``a, b = x.chunk(2)``, ``b`` unused).
            if grad is not None:
                call.output_grad_norms[index] = norm32(grad.detach())

        return hook


def leaf_calls(calls: list[ModuleCall]) -> list[ModuleCall]:
    """The calls of modules without children, in execution order."""
    return [c for c in calls if c.is_leaf]


@dataclass
class RecurrentCell:
    """A module stepped through time: call ``t`` (0-based) maps state ``h_t`` to ``h_{t+1}``.

    Attributes:
        name: the cell's module path.
        calls: its calls, one per time step, in order.
        state_inputs: positions, in each call's flat inputs, of the state it receives.
        state_outputs: positions, in each call's flat outputs, of the state it returns (same order).
    """

    name: str
    calls: list[ModuleCall]
    state_inputs: list[int]
    state_outputs: list[int]

    @property
    def steps(self) -> int:
        return len(self.calls)


def _state_links(previous: ModuleCall, current: ModuleCall) -> tuple[list[int], list[int]]:
    """Positions (in ``current.inputs``, in ``previous.outputs``) of tensors passed from one call to the next."""
    ins: list[int] = []
    outs: list[int] = []
    for j, out in enumerate(previous.outputs):
        for i, inp in enumerate(current.inputs):
            if inp is out and i not in ins:
                ins.append(i)
                outs.append(j)
                break
    return ins, outs


def find_recurrent_cells(calls: list[ModuleCall]) -> list[RecurrentCell]:
    """Hand-written recurrent cells in a trace: modules whose every call feeds its output to the next call.

    ``nn.RNN``/``nn.GRU``/``nn.LSTM`` are not cells here (they are called once); ``nn.RNNCell`` and friends
    stepped in a loop are. Modules inside a cell (its ``nn.Linear`` s) are not reported.
    """
    by_module: dict[int, list[ModuleCall]] = {}
    for call in calls:
        by_module.setdefault(id(call.module), []).append(call)
    cells: list[RecurrentCell] = []
    for module_calls in by_module.values():
        if len(module_calls) < 2:
            continue
        ins, outs = _state_links(module_calls[0], module_calls[1])
        if not ins:
            continue
        if all(_state_links(a, b) == (ins, outs) for a, b in zip(module_calls[1:], module_calls[2:])):
            cells.append(RecurrentCell(module_calls[0].name, module_calls, ins, outs))
    # Drop cells nested in another cell (a cell built from a cell).
    names = [c.name for c in cells]
    return [c for c in cells if not any(c.name.startswith(n + ".") for n in names if n != c.name)]

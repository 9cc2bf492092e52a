"""The model's blocks, and the largest singular value of each one's Jacobian (and of the whole model's).

A *block* is what a model repeats: the layers of a transformer (``transformer.h.0``, ``transformer.h.1``,
...), the stages of a ResNet (``layer1`` ... ``layer4``), the blocks of a hand-written stack. They are
found by structure: in every module, the children of one class that have children of their own and hold
parameters; the largest such group in the model is the blocks (the first one found on a tie, in
``named_modules`` order, so the outer one). A model that repeats nothing (an MLP in one ``nn.Sequential``)
is cut at the first module, from the root down, with more than one child: its children with parameters.

Each block's Jacobian is taken with respect to its first floating-point positional input, the other
arguments as the traced call had them (attention masks, position ids), by power iteration
(``jacobian.py``), in eval mode: every step must see the same function, so dropout is off and batch norm
uses its running statistics (``torch.func`` refuses their in-place update). Each module's mode is restored
afterwards. Attention runs its plain math kernel (``SDPBackend.MATH``): the fused ones have no
forward-mode derivative. When a block cannot be measured, one note says why for all blocks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradguard.explain.jacobian import spectral_norm
from gradguard.names import user_name
from gradguard.trace import ModuleCall, flat_tensors

__all__ = ["Blocks", "find_blocks", "measure_jacobians", "short_error"]


@dataclass
class Blocks:
    """The blocks of a model.

    Attributes:
        blocks: ``(name, module)`` in registration order; names without wrapper prefixes.
        description: what they are, for the report's notes (``"the 4 GPT2Block of transformer.h"``).
        repeated: True when found as repeated blocks, False for the fallback cut.
    """

    blocks: list[tuple[str, nn.Module]]
    description: str
    repeated: bool


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_blocks(model: nn.Module) -> Blocks:
    """The repeated blocks of ``model`` (see the module docstring), or the fallback cut."""
    best: tuple[str, list[tuple[str, nn.Module]]] | None = None
    for path, module in model.named_modules():
        groups: dict[type, list[tuple[str, nn.Module]]] = {}
        for name, child in module.named_children():
            if next(child.children(), None) is not None and _has_parameters(child):
                groups.setdefault(type(child), []).append((_join(path, name), child))
        for members in groups.values():
            if len(members) >= 2 and (best is None or len(members) > len(best[1])):
                best = (path, members)
    if best is not None:
        path, members = best
        where = repr(user_name(path)) if user_name(path) else "the model"
        named = [(user_name(name), block) for name, block in members]
        return Blocks(named, f"the {len(members)} repeated {type(members[0][1]).__name__} of {where}", True)
    prefix, module = "", model
    while True:
        children = list(module.named_children())
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = _join(prefix, name)
    cut = [(user_name(_join(prefix, name)), child) for name, child in children if _has_parameters(child)]
    return Blocks(cut, "the children of " + (repr(user_name(prefix)) if user_name(prefix) else "the model")
                  + " (no repeated blocks found)", False)


def short_error(error: Exception) -> str:
    """``"TypeName: first sentence"`` of an exception, for a note."""
    text = str(error).split(". ")[0]
    return f"{type(error).__name__}: {text[:160]}"


def _first_floating(call: ModuleCall) -> int | None:
    return next((i for i, x in enumerate(call.args) if isinstance(x, Tensor) and x.is_floating_point()), None)


def measure_jacobians(model: nn.Module, run: Any, inputs: Any, calls: list[ModuleCall], blocks: Blocks,
                      iterations: int, notes: list[str]) -> dict[str, Any]:
    """``{"input_output": sigma_max or None, "blocks": {name: sigma_max or None}, "blocks_covered": what the
    blocks are}``, in eval mode.

    Args:
        run: ``run(inputs)`` calls the model (``model(inputs)`` or ``model(**inputs)``).
        inputs: the model's inputs; the input-output Jacobian is measured when they are one
            floating-point tensor.
        calls: the traced calls, for each block's arguments.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return _measure(run, inputs, calls, blocks, iterations, notes)
    finally:
        for module, training in modes:
            module.training = training


def _measure(run: Any, inputs: Any, calls: list[ModuleCall], blocks: Blocks, iterations: int,
             notes: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"input_output": None, "blocks": {}, "blocks_covered": blocks.description}
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        try:
            result["input_output"] = spectral_norm(lambda x: tuple(flat_tensors(run(x))), (inputs,),
                                                   iterations).value
        except Exception as error:  # an op without forward-mode AD, a data-dependent branch...
            notes.append(f"input-output Jacobian not measured: {short_error(error)}")
    else:
        notes.append("input-output Jacobian not measured: the model input is not one floating-point tensor")
    failures: dict[str, list[str]] = {}  # error -> blocks
    first_call: dict[int, ModuleCall] = {}
    for call in calls:
        first_call.setdefault(id(call.module), call)
    for name, block in blocks.blocks:
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
            failures.setdefault(short_error(error), []).append(name)
    for reason, names in failures.items():
        which = names[0] if len(names) == 1 else f"{len(names)} blocks ({names[0]} ... {names[-1]})"
        notes.append(f"Jacobian of {which} not measured: {reason}")
    return result

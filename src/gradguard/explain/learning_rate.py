"""Relative update size per layer for a given optimizer: how far one step moves each layer's weights.

Two numbers per layer:

* ``lr * ||g|| / ||w||``, the relative update of plain SGD, with the optimizer's learning rate;
* the update the optimizer really makes, ``||w_after - w_before|| / ||w_before||``, measured by taking one
  step on the doctor's gradients and then restoring both the weights and the optimizer state (Adam's first
  step is ``lr * sign(g)``-like, far from ``lr * g``).

A rule of thumb (Karpathy, CS231n notes, "ratio of weights:updates") puts a healthy ratio near 1e-3. Above
1e-2 a layer changes by more than 1% per step: flagged as a warning; above 1 the step is larger than the
weights themselves: an error. Exploding gradients show up here first as updates far above the weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.names import user_name
from gradguard.stats import layer_name, per_tensor_norms

__all__ = ["UPDATE_ERROR", "UPDATE_WARNING", "UpdateSize", "relative_updates"]

UPDATE_WARNING = 1e-2
UPDATE_ERROR = 1.0


@dataclass
class UpdateSize:
    """One layer's update for one optimizer step (see the module docstring)."""

    layer: str
    lr: float
    sgd_ratio: float
    update_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else (math.inf if numerator > 0 else 0.0)


@torch.no_grad()
def relative_updates(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[UpdateSize]:
    """Per-layer relative update of one ``optimizer.step()`` on the gradients now in ``.grad``.

    The step is undone: weights and optimizer state are restored exactly afterwards.
    """
    lr_of: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = float(group.get("lr", 0.0))
    named = [(user_name(n), p) for n, p in model.named_parameters() if id(p) in lr_of and p.grad is not None]
    if not named:
        return []
    before = [p.detach().clone() for _, p in named]
    saved_state = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.step()
        deltas = [p.detach() - b for (_, p), b in zip(named, before)]
    finally:
        for (_, p), b in zip(named, before):
            p.copy_(b)
        optimizer.load_state_dict(saved_state)

    def layer_norms(tensors: list[Tensor]) -> dict[str, float]:
        squares: dict[str, float] = {}
        for (name, _), norm in zip(named, torch.stack(per_tensor_norms(tensors, 2.0)).tolist()):
            squares[layer_name(name)] = squares.get(layer_name(name), 0.0) + norm**2
        return {k: math.sqrt(v) for k, v in squares.items()}

    weight = layer_norms(before)
    grad = layer_norms([p.grad for _, p in named])  # type: ignore[misc]
    delta = layer_norms(deltas)
    lr = {layer_name(n): lr_of[id(p)] for n, p in named}
    return [
        UpdateSize(layer, lr[layer], _ratio(lr[layer] * grad[layer], weight[layer]),
                   _ratio(delta[layer], weight[layer]))
        for layer in weight
    ]

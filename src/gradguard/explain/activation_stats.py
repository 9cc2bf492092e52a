"""Activation statistics per layer: output mean and std, fraction saturated, fraction dead.

* Saturated (tanh, sigmoid and their hard variants): units whose derivative, read from the output, is
  below 5% of its maximum — ``1 - y^2 < 0.05`` for tanh, ``4 y (1 - y) < 0.05`` for sigmoid. There the
  error signal is cut by 20x or more (Glorot & Bengio 2010, section 3.1, on saturated top layers).
* Dead (ReLU, ReLU6): units at 0 for *every* sample of the batch: they pass no gradient at all.
  A unit is one element of a sample's output (a feature, or a feature at one position).

The std of each weight layer's output is also kept: it halving layer after layer is the forward face of a
vanishing flow (He et al. 2015, section 2.2, with Xavier init in a ReLU network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gradguard.activations import activation_kind
from gradguard.trace import ModuleCall

__all__ = ["SATURATION_LEVEL", "ActivationStats", "activation_stats"]

SATURATION_LEVEL = 0.05  # derivative below this fraction of its maximum counts as saturated

_DEAD_KINDS = {"relu"}
_SATURATING_KINDS = {"tanh", "sigmoid"}


@dataclass
class ActivationStats:
    """Statistics of one module's output over the batch.

    Attributes:
        name: module path.
        kind: activation kind (``"relu"``, ``"tanh"``, ...) or the module class for other layers.
        mean, std: over every element of the output.
        saturated: fraction of saturated units (tanh/sigmoid), else None.
        dead: fraction of units at 0 for the whole batch (ReLU), else None.
    """

    name: str
    kind: str
    mean: float
    std: float
    saturated: float | None
    dead: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _relative_derivative(kind: str, y: Tensor) -> Tensor:
    if kind == "tanh":
        return 1 - y.square()
    return 4 * y * (1 - y)  # sigmoid: y (1 - y) over its maximum 1/4


def _device_stats(kind: str | None, y: Tensor) -> list[Tensor]:
    y = y.detach().float()
    nan = torch.full((), float("nan"), device=y.device)
    saturated = dead = nan
    if kind in _SATURATING_KINDS:
        saturated = (_relative_derivative(kind, y) < SATURATION_LEVEL).float().mean()
    if kind in _DEAD_KINDS:
        per_sample = y.reshape(y.shape[0], -1) if y.dim() > 1 else y.reshape(1, -1)
        dead = (per_sample <= 0).all(dim=0).float().mean()
    std = y.std() if y.numel() > 1 else torch.zeros((), device=y.device)
    return [y.mean(), std, saturated, dead]


def activation_stats(calls: list[ModuleCall], weight_layers: set[int]) -> list[ActivationStats]:
    """Statistics of the first call of every activation module and of every layer in ``weight_layers``
    (``id()`` of modules), in forward order, read to the host in one transfer."""
    chosen: list[tuple[str, str, str | None, Tensor]] = []
    seen: set[int] = set()
    for call in calls:
        key = id(call.module)
        if key in seen or not call.is_leaf or not call.outputs or not call.outputs[0].is_floating_point():
            continue
        kind = activation_kind(call.module)
        if kind is None and key not in weight_layers:
            continue
        seen.add(key)
        chosen.append((call.name, kind or type(call.module).__name__, kind, call.outputs[0]))
    if not chosen:
        return []
    rows = torch.stack([torch.stack(_device_stats(kind, y)) for _, _, kind, y in chosen]).tolist()
    result = []
    for (name, label, _, _), (mean, std, saturated, dead) in zip(chosen, rows):
        result.append(ActivationStats(
            name, label, mean, std,
            None if saturated != saturated else saturated,  # NaN marks "not applicable"
            None if dead != dead else dead,
        ))
    return result

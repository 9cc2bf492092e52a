"""Where a bad gradient starts: the first layer, in backward order, whose norm left its own history.

Backward computes the gradients from the loss towards the inputs, so a gradient that blows up (or turns
NaN) in one layer reaches every layer that backward visits after it: the origin is the *first* layer, in
the order backward produced the gradients, that is out of line. A layer is out of line when its gradient
norm is not finite, or when the log of its norm is more than ``z_thresh`` standard deviations above its
own recent history (the norms of the last few steps, ``Forensics(keep=...)``)::

    z_l = (log n_l - mean_k log h_{k,l}) / max(std_k log h_{k,l}, SIGMA_FLOOR)

The backward order is the order in which the recomputed step accumulated each layer's first gradient
(``reproduce.py``); without it, the reverse of the parameters' registration order stands in for it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradguard.forensics.samples import SIGMA_FLOOR

__all__ = ["layer_z", "origin_layer"]


def layer_z(norms: Tensor, history: Tensor | None) -> Tensor:
    """Per-layer z-scores of ``log norms`` against ``history`` ``(K, L)`` (finite entries only): +inf for a
    non-finite norm, NaN where a layer has no finite history."""
    x = torch.log(norms.double().clamp(min=1e-30))
    finite = torch.isfinite(norms)
    if history is None or history.numel() == 0:
        z = torch.full_like(x, math.nan)
    else:
        h = history.double()
        h = torch.where(torch.isfinite(h), torch.log(h.clamp(min=1e-30)), math.nan)
        mean = h.nanmean(dim=0)
        std = ((h - mean).pow(2).nanmean(dim=0)).sqrt().clamp(min=SIGMA_FLOOR)
        z = (x - mean) / std
    return torch.where(finite, z, math.inf)


def origin_layer(names: list[str], norms: Tensor, history: Tensor | None, order: list[int] | None,
                 z_thresh: float, fallback: bool) -> tuple[str | None, float | None]:
    """``(name, z)`` of the first layer in backward ``order`` (indices into ``names``) that is out of line.

    When none is and ``fallback`` is set (a gradient event: something in the gradients did move), the
    layer that moved most; else ``(None, None)``.
    """
    z = layer_z(norms.detach().float().cpu(), history)
    if order is None:
        order = list(range(len(names)))[::-1]
    order = order + [i for i in range(len(names))[::-1] if i not in set(order)]  # layers backward skipped
    for i in order:
        if z[i] > z_thresh:
            return names[i], float(z[i])
    scored = torch.nan_to_num(z, nan=-math.inf)
    if fallback and len(names) and bool(torch.isfinite(scored).any()):
        i = int(scored.argmax())
        return names[i], float(z[i])
    return None, None

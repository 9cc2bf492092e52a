"""Does the bad step happen again? Recompute it from the same weights, batch and random-number state.

Megatron-LM's rerun state machine re-runs a step to tell a transient fault (a bit flip, a flaky kernel,
nondeterminism) from one the data or the model state will produce every time; this does the same for one
step, on the spot, before the optimizer moves the weights: forward and backward again on the batch (every
micro-batch of an accumulation window, each from the random-number state its own forward started from),
gradients and buffers put back afterwards. The step *reproduces* when every event it raised comes back:

* ``nonfinite_grad`` / ``nonfinite_loss``: the recomputed gradient norm / loss is not finite either;
* ``grad_spike`` / ``growth`` / ``loss_spike``: the recomputed total norm / loss is within a factor of
  ``TOLERANCE`` of the live one (tolerant of reduction-order and dropout noise, not of a spike).

With accumulation the recomputed loss is the mean over the micro-batches (the usual ``loss / N``
convention); a loop that sums the micro-batch losses instead is recognised from the live loss being ``N``
times the recomputed one. Autocast is not replayed: a step whose spike came from low precision alone is
recomputed in the model's own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.batch import Batch, LossFn, forward_loss
from gradguard.forensics import rng
from gradguard.stats import GradStats, grad_stats

__all__ = ["TOLERANCE", "Recomputed", "recompute", "reproduces"]

#: Factor within which a recomputed norm or loss counts as the same as the live one.
TOLERANCE = 1.5


@dataclass
class Recomputed:
    """The recomputed step.

    Attributes:
        loss: the loss (mean over micro-batches), a float (NaN/inf when not finite).
        total_norm: the gradient norm, a float.
        layer_norms: ``(L,)`` float32 CPU, the per-layer norms in the live statistics' ``names`` order.
        order: layer indices in the order backward first produced a gradient for them.
    """

    loss: float
    total_norm: float
    layer_norms: Tensor
    order: list[int]


def backward_window(model: nn.Module, window: list[tuple[Batch, rng.RngState | None]],
                    loss_fn: LossFn | None) -> list[Tensor]:
    """Forward and backward of each micro-batch of the window, under its recorded generator state, the loss
    divided by the window's length (as the training loop accumulated it); the detached losses."""
    losses = []
    for batch, state in window:
        if state is not None:
            rng.restore(state)
        loss = forward_loss(model, batch, loss_fn)[1].reshape(()) / len(window)
        loss.backward()
        losses.append(loss.detach().float())
    return losses


def recompute(model: nn.Module, live: GradStats, window: list[tuple[Batch, rng.RngState | None]],
              loss_fn: LossFn | None) -> Recomputed:
    """Forward and backward of the window's micro-batches; the caller restores ``.grad`` and buffers
    (``doctor.preserve.preserved``) and the generators (``rng.replaying``)."""
    group_of = {id(p): g for p, g in zip(live.params, live.group_index)}
    order: list[int] = []
    seen: set[int] = set()

    def note(param: Tensor) -> None:
        group = group_of.get(id(param))
        if group is not None and group not in seen:
            seen.add(group)
            order.append(group)

    handles = [p.register_post_accumulate_grad_hook(note) for p in live.params if p.requires_grad]
    try:
        losses = backward_window(model, window, loss_fn)
    finally:
        for handle in handles:
            handle.remove()
    named = [(str(i), p) for i, p in enumerate(live.params)]
    stats = grad_stats(named, norm_type=live.norm_type, groups="param")
    # per-parameter norms back to the live statistics' layers
    layer = torch.zeros(len(live.names), dtype=torch.float64)
    p = live.norm_type
    per_param = stats.param_norms.double().cpu()
    index = torch.tensor([live.group_index[int(n)] for n in stats.param_names], dtype=torch.long)
    if math.isinf(p):
        layer = layer.index_reduce_(0, index, per_param, "amax", include_self=True)
    else:
        layer = layer.index_add_(0, index, per_param.pow(p)).pow(1.0 / p)
    values = torch.stack([torch.stack(losses).sum().cpu(), stats.total_norm.float().cpu()]).tolist()
    return Recomputed(values[0], values[1], layer.float(), order)


def _same(recomputed: float, live: float) -> bool:
    if not (math.isfinite(recomputed) and math.isfinite(live)):
        return False
    if recomputed == live:
        return True
    if recomputed <= 0 or live <= 0:
        return abs(recomputed - live) <= (TOLERANCE - 1.0) * max(abs(recomputed), abs(live))
    return max(recomputed, live) / min(recomputed, live) <= TOLERANCE


def reproduces(kinds: list[str], live_loss: float, live_norm: float, recomputed: Recomputed,
               micro_batches: int = 1) -> bool:
    """True when every event of ``kinds`` comes back in the recomputed step (see the module docstring)."""
    loss, norm = recomputed.loss, recomputed.total_norm
    if micro_batches > 1 and math.isfinite(live_loss) and _same(loss * micro_batches, live_loss) \
            and not _same(loss, live_loss):
        loss, norm = loss * micro_batches, norm * micro_batches  # the loop sums its micro-batch losses
    checks = []
    if "nonfinite_grad" in kinds:
        checks.append(not math.isfinite(norm))
    if "nonfinite_loss" in kinds:
        checks.append(not math.isfinite(loss))
    if "grad_spike" in kinds or "growth" in kinds:
        checks.append(_same(norm, live_norm))
    if "loss_spike" in kinds:
        checks.append(_same(loss, live_loss))
    return all(checks)

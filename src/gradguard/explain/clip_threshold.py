"""A clipping threshold from the data: the average gradient norm (Pascanu et al. 2013, section 3.2).

Pascanu, Mikolov & Bengio 2013 clip ``g <- threshold * g / ||g||`` when ``||g|| > threshold``, and propose
choosing the threshold by "looking at statistics on the average norm over a sufficiently large number of
updates". :func:`suggest_clip_threshold` computes that average over a few batches at the current weights
(it takes no optimizer step), skipping non-finite norms.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.batch import LossFn, as_batch, check_model_and_loss_fn, forward_loss, scalar_loss
from gradguard.explain.preserve import preserved
from gradguard.stats import grad_stats

__all__ = ["suggest_clip_threshold"]


def _is_single_batch(data: Any) -> bool:
    """One batch (a dict of keyword inputs, or ``(inputs, targets[, ids])`` with a tensor first), not many."""
    return isinstance(data, Mapping) or (
        isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], Tensor))


def suggest_clip_threshold(
    model: nn.Module,
    data: Iterable[Any] | tuple[Any, Any] | Mapping[str, Any],
    loss_fn: LossFn | None = None,
    steps: int = 20,
) -> float:
    """Average global gradient norm over ``steps`` batches: the clipping threshold of Pascanu et al. 2013.

    Args:
        model: called as ``model(inputs)``, or ``model(**batch)`` for dict batches.
        data: an iterable of batches (a DataLoader; cycled when shorter than ``steps``), or a single batch:
            ``(inputs, targets)`` or a dict of keyword inputs (``gradguard.batch``).
        loss_fn: ``loss_fn(output, targets)`` returns a scalar; None for dict batches reads ``output.loss``.
        steps: number of batches to average over.

    The model's weights, ``.grad`` and buffers are left as they were. Raises ``ValueError`` when no batch gives a
    finite gradient norm.
    """
    check_model_and_loss_fn(model, loss_fn, "suggest_clip_threshold")
    if steps < 1:
        raise ValueError(f"suggest_clip_threshold: steps must be >= 1, got {steps}")
    batches = [data] * steps if _is_single_batch(data) else list(itertools.islice(itertools.cycle(data), steps))
    if not batches:
        raise ValueError("suggest_clip_threshold: data yielded no batch")
    norms: list[Tensor] = []
    with preserved(model):
        for i, batch in enumerate(batches):
            split = as_batch(batch, f"suggest_clip_threshold: batch {i}")
            model.zero_grad(set_to_none=True)
            scalar_loss(forward_loss(model, split, loss_fn)[1], "suggest_clip_threshold").backward()
            norms.append(grad_stats(model).total_norm)
    finite = [n for n in torch.stack(norms).tolist() if math.isfinite(n)]
    if not finite:
        raise ValueError("suggest_clip_threshold: every gradient norm was NaN or Inf; see gg.locate_nonfinite")
    return sum(finite) / len(finite)

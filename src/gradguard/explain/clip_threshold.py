"""A clipping threshold from the data: the average gradient norm (Pascanu et al. 2013, section 3.2).

Pascanu, Mikolov & Bengio 2013 clip ``g <- threshold * g / ||g||`` when ``||g|| > threshold``, and propose
choosing the threshold by "looking at statistics on the average norm over a sufficiently large number of
updates". :func:`suggest_clip_threshold` computes that average over a few batches at the current weights
(it takes no optimizer step), skipping non-finite norms.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.explain.preserve import preserved
from gradguard.stats import grad_stats

__all__ = ["suggest_clip_threshold"]


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def suggest_clip_threshold(
    model: nn.Module,
    data: Iterable[Any] | tuple[Any, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    steps: int = 20,
) -> float:
    """Average global gradient norm over ``steps`` batches: the clipping threshold of Pascanu et al. 2013.

    Args:
        model: called as ``model(inputs)``.
        data: an iterable of ``(inputs, targets)`` batches (a DataLoader; cycled when shorter than
            ``steps``), or a single ``(inputs, targets)`` batch.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar.
        steps: number of batches to average over.

    The model's weights, ``.grad`` and buffers are left as they were. Raises ``ValueError`` when no batch gives a
    finite gradient norm.
    """
    if steps < 1:
        raise ValueError(f"suggest_clip_threshold: steps must be >= 1, got {steps}")
    batches = [data] * steps if _is_single_batch(data) else list(itertools.islice(itertools.cycle(data), steps))
    if not batches:
        raise ValueError("suggest_clip_threshold: data yielded no batch")
    norms: list[Tensor] = []
    with preserved(model):
        for i, batch in enumerate(batches):
            if not _is_single_batch(batch):
                raise ValueError(f"suggest_clip_threshold: batch {i} must be an (inputs, targets) pair")
            model.zero_grad(set_to_none=True)
            inputs, targets = batch
            loss_fn(model(inputs), targets).backward()
            norms.append(grad_stats(model).total_norm)
    finite = [n for n in torch.stack(norms).tolist() if math.isfinite(n)]
    if not finite:
        raise ValueError("suggest_clip_threshold: every gradient norm was NaN or Inf; see gg.locate_nonfinite")
    return sum(finite) / len(finite)

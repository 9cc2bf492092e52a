"""Leave the model as the doctor found it: ``.grad`` and buffers restored after its passes.

The doctor's forward/backward passes would otherwise leave gradients in ``.grad`` (or overwrite the
user's) and, in training mode, move batch norm's running statistics and its batch counter. Parameters are
never written by a pass; the one optimizer step the doctor takes (``learning_rate.py``) restores them
itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved"]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Inside: every ``.grad`` is None. On exit: the original ``.grad`` tensors and buffer values are back."""
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    for p, _ in grads:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in grads:
            p.grad = grad
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)

"""Count host syncs: the reads that make the CPU wait for the device.

Every ``.item()``, ``bool(t)``, ``float(t)``, ``t.tolist()`` or Python ``if`` on a tensor ends in the ATen op
``aten._local_scalar_dense``. On a GPU each one blocks the Python thread until the queued kernels have run,
so a training step that makes one cannot run ahead of the device. Counting that op under a
``TorchDispatchMode`` finds them on any device, the CPU included::

    with gg.count_host_syncs() as syncs:
        guard.step(loss)
    assert syncs.count <= 1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "count_host_syncs"]


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts ``aten._local_scalar_dense`` calls in ``count``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Count the host syncs made inside the ``with`` block (``counter.count``)."""
    with HostSyncCounter() as counter:
        yield counter

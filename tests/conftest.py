"""Shared test fixtures: deterministic seeds and a host-sync counter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls: every ``.item()``, ``bool(t)``, ``float(t)`` or Python
    ``if`` on a tensor goes through it, and on a GPU each one waits for the device (a host sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    with HostSyncCounter() as counter:
        yield counter


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

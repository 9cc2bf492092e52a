"""Shared test fixtures: deterministic seeds; the host-sync counter comes from the library."""

from __future__ import annotations

import pytest
import torch

from gradguard.syncs import HostSyncCounter, count_host_syncs

__all__ = ["HostSyncCounter", "count_host_syncs"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the tests' models are tiny, and on a shared 2-core CPU two threads wait for each
    other at every small op (a 100x slowdown was measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

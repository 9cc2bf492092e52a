"""Shared test fixtures: deterministic seeds; the host-sync counter comes from the library."""

from __future__ import annotations

import pytest
import torch

from gradguard.syncs import HostSyncCounter, count_host_syncs

__all__ = ["HostSyncCounter", "count_host_syncs"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

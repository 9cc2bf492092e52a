"""Shared test fixtures and helpers: deterministic seeds, the host-sync counter (from the library), ``twin``,
``soak`` (``benchmarks/soak.py`` as a module)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.syncs import HostSyncCounter, count_host_syncs

__all__ = ["HostSyncCounter", "count_host_syncs", "load_benchmark", "twin"]


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


def twin(model: nn.Module) -> nn.Module:
    """A copy of the model with copies of its gradients (deepcopy leaves .grad behind)."""
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters()):
        q.grad = p.grad.clone()
    return other


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as the module ``name``, for a module-scoped fixture to yield (its dataclasses
    resolve their module by name, so it is registered in ``sys.modules`` meanwhile)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def soak():
    """``benchmarks/soak.py`` as a module."""
    yield from load_benchmark("soak")

"""The random-number generator states a step depends on: torch's CPU generator and, for a model on a GPU,
that device's generator (dropout masks and other random ops of the forward pass draw from them).

A state is captured once per ``guard.step`` call (a host-side copy of a few kilobytes: no device data is
read), so that a bad step can be recomputed with the random numbers its forward pass drew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["RngState", "capture", "check", "replaying", "restore"]

RngState = dict[str, Any]


def capture(device: torch.device | None = None) -> RngState:
    """``{"cpu": ByteTensor, "cuda": (index, ByteTensor) | None}``: the generators as they are now."""
    cuda = None
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = (index, torch.cuda.get_rng_state(index))
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def check(state: object, where: str) -> None:
    """``ValueError`` naming ``where`` when ``state`` is not a state :func:`capture` writes (checked before
    any generator is touched: ``torch.set_rng_state`` would fail half-way, or take any bytes for the CUDA
    generator)."""
    if state is None:
        return
    if not isinstance(state, dict) or set(state) != {"cpu", "cuda"}:
        raise ValueError(f"{where}: bad RNG state: expected {{'cpu', 'cuda'}}, got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    cpu, size = state["cpu"], torch.get_rng_state().numel()
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == (size,)):
        found = f"{cpu.dtype} {list(cpu.shape)}" if isinstance(cpu, torch.Tensor) else type(cpu).__name__
        raise ValueError(f"{where}: bad RNG state: the CPU generator's state must be {size} bytes (uint8), got {found}")
    cuda = state["cuda"]
    if cuda is not None and not (isinstance(cuda, (tuple, list)) and len(cuda) == 2 and isinstance(cuda[0], int)
                                 and isinstance(cuda[1], torch.Tensor) and cuda[1].dtype == torch.uint8):
        raise ValueError(f"{where}: bad RNG state: the CUDA generator's state must be (device index, uint8 tensor)")


def restore(state: RngState) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():  # a GPU state replayed on a CPU: skipped
        index, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, index)


@contextlib.contextmanager
def replaying(state: RngState | None, device: torch.device | None = None) -> Iterator[None]:
    """Inside: the generators at ``state`` (when given). On exit: the generators as they were on entry, so
    the training run draws the same random numbers as if nothing had run."""
    if state is not None and state.get("cuda") is not None and torch.cuda.is_available():
        device = torch.device("cuda", state["cuda"][0])
    current = capture(device)
    if state is not None:
        restore(state)
    try:
        yield
    finally:
        restore(current)

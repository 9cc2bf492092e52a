"""Recovery: what the Guard does on the host when skipping a step is not enough.

Escalation, one rung at a time:

1. **LR back-off**: ``backoff_after`` skipped steps within ``backoff_window`` steps multiply every
   parameter group's learning rate by ``lr_backoff`` (and an attached scheduler's ``base_lrs``, so that
   schedulers that recompute the rate from them keep the cut).
2. **Rollback**: a response ``"rollback"``, non-finite weights, or ``max_consecutive_skips`` skipped steps
   in a row restore the last good :class:`Snapshot` (model, optimizer, scaler, scheduler, the Guard's
   detector and clipper) and cut the learning rate by ``rollback_lr_factor`` (compounding when the same
   snapshot is restored again).
3. **TrainingDiverged**: a rollback needed when ``max_rollbacks`` were spent (or none is possible)
   raises, with an account of what happened. Training never goes on silently with NaN weights.

Snapshots are taken only when the weights were just checked finite, every ``snapshot_every`` steps; in
memory (a clone of every tensor, on its device) or, with ``snapshot_dir``, in one file on disk written
atomically (large models).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class TrainingDiverged(RuntimeError):
    """Raised when training cannot be kept finite: the rollback budget is spent, or rollback is impossible.

    Attributes:
        step: the optimizer step at which the Guard gave up.
        events: the last events recorded (dicts in the history format).
        summary: the Guard's counters (``guard.summary()``) at that point.
    """

    def __init__(self, message: str, step: int, events: list[dict[str, Any]], summary: dict[str, int]):
        super().__init__(message)
        self.step = step
        self.events = events
        self.summary = summary


def clone_tree(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples where every tensor is detached and cloned."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v) for v in obj)
    return obj


class Snapshot:
    """The last good training state, in memory or in one file of ``directory``.

    ``save`` clones (memory) or writes (disk); ``load`` returns a fresh copy each time, because
    ``optimizer.load_state_dict`` keeps the tensors it is given and would otherwise mutate the snapshot.
    """

    FILENAME = "gradguard_snapshot.pt"

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = None if directory is None else os.fspath(directory)
        self.step: int | None = None
        self._state: dict[str, Any] | None = None

    @property
    def path(self) -> str | None:
        return None if self.directory is None else os.path.join(self.directory, self.FILENAME)

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.directory is None:
            self._state = clone_tree(state)
        else:
            os.makedirs(self.directory, exist_ok=True)
            assert self.path is not None
            partial = self.path + ".partial"
            torch.save(state, partial)
            os.replace(partial, self.path)  # atomic: a crash never leaves half a snapshot
        self.step = step

    def load(self) -> dict[str, Any]:
        if self.step is None:
            raise RuntimeError("Snapshot: nothing saved yet")
        if self.directory is None:
            assert self._state is not None
            return clone_tree(self._state)
        assert self.path is not None
        return torch.load(self.path, weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        # a memory snapshot travels with the checkpoint; a disk snapshot stays in its file
        return {"step": self.step, "state": self._state if self.directory is None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        if self.directory is None:
            self._state = None if state["state"] is None else clone_tree(state["state"])


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each parameter group, as floats (tensor learning rates are read)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def scale_lr_(optimizer: torch.optim.Optimizer, factor: float, scheduler: Any = None) -> None:
    """Multiply every group's learning rate by ``factor``, and the scheduler's ``base_lrs`` with it."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].mul_(factor)
        else:
            group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


@dataclass
class RecoveryPolicy:
    """Host-side escalation counters: which rung to climb after each step. See the module docstring."""

    lr_backoff: float = 0.5
    backoff_after: int = 3
    backoff_window: int = 50
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    max_consecutive_skips: int = 20
    skips: deque[int] = field(default_factory=deque)  # steps of the recent skips
    consecutive_skips: int = 0
    rollbacks: int = 0
    lr_backoffs: int = 0
    lr_factor_since_snapshot: float = 1.0

    def observe(self, step: int, skipped: bool) -> str | None:
        """Count one step; returns ``"rollback"``, ``"lr_backoff"`` or None."""
        if not skipped:
            self.consecutive_skips = 0
            return None
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            return "rollback"
        self.skips.append(step)
        while self.skips and self.skips[0] <= step - self.backoff_window:
            self.skips.popleft()
        if len(self.skips) >= self.backoff_after:
            self.skips.clear()
            return "lr_backoff"
        return None

    def after_rollback(self) -> None:
        self.skips.clear()
        self.consecutive_skips = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "skips": list(self.skips),
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": self.rollbacks,
            "lr_backoffs": self.lr_backoffs,
            "lr_factor_since_snapshot": self.lr_factor_since_snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skips = deque(int(s) for s in state["skips"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_backoffs = int(state["lr_backoffs"])
        self.lr_factor_since_snapshot = float(state["lr_factor_since_snapshot"])


@dataclass
class TrainingState:
    """The objects a snapshot covers, and how to read and restore the Guard's own part."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    scheduler: Any
    guard_state: Callable[[], dict[str, Any]]
    load_guard_state: Callable[[dict[str, Any]], None]

    def capture(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guard": self.guard_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_guard_state(state["guard"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

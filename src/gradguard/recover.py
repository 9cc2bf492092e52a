"""Recovery: what the Guard does on the host when skipping a step is not enough.

Escalation, one rung at a time (and back down once training is healthy again):

1. **LR back-off**: ``backoff_after`` skipped steps within ``skip_window`` steps multiply every
   parameter group's learning rate by ``lr_backoff`` (and an attached scheduler's ``base_lrs``, so that
   schedulers that recompute the rate from them keep the cut).
2. **Rollback**: a response ``"rollback"``, non-finite weights, or ``rollback_after`` skipped steps
   within ``skip_window`` steps restore the last good :class:`Snapshot` (model, optimizer state,
   scheduler, the Guard's detector and clipper) and cut the learning rate by ``rollback_lr_factor``. A
   GradScaler keeps its current scale: it describes the gradients' range, not the weights (and saving
   its state would cost a host read). The learning rate
   itself is not taken from the snapshot: it stays what it was (the user's schedule, earlier cuts), times
   the cut.
3. **TrainingDiverged**: a rollback needed when ``max_rollbacks`` were spent (or none is possible)
   raises, with an account of what happened. Training never goes on silently with NaN weights.

Cuts are not for good: ``lr_recover_after`` real steps after a cut, the last outstanding cut is undone
(as ``GradScaler`` grows its scale back), so that a transient fault costs a transient slow-down.

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
    """Host-side escalation counters: which rung to climb (or step down) after each step.

    All counts are over the skipped steps of the last ``skip_window`` steps:

    * ``"lr_backoff"``: ``backoff_after`` skips, at most once per ``skip_window`` steps (while most steps
      are skipped the learning rate changes little, so cutting it again and again would only compound).
    * ``"rollback"``: ``rollback_after`` skips: the weights themselves are probably bad.
    * ``"lr_recover"``: ``lr_recover_after`` real steps since the last cut (or the last recovery) undo the
      last outstanding cut, as ``torch.amp.GradScaler`` grows its scale back after ``growth_interval``
      steps: a transient fault does not leave the run at a fraction of its learning rate for good.
    """

    lr_backoff: float = 0.5
    backoff_after: int = 5
    rollback_after: int = 10
    skip_window: int = 50
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    lr_recover_after: int | None = 50
    skips: deque[int] = field(default_factory=deque)  # steps of the skips within the window
    last_backoff: int | None = None
    clean_steps: int = 0  # real steps since the last LR change
    cuts: list[float] = field(default_factory=list)  # outstanding LR factors, oldest first
    rollbacks: int = 0
    lr_backoffs: int = 0

    def observe(self, step: int, skipped: bool) -> str | None:
        """Count one step; returns ``"rollback"``, ``"lr_backoff"``, ``"lr_recover"`` or None."""
        while self.skips and self.skips[0] <= step - self.skip_window:
            self.skips.popleft()
        if not skipped:
            self.clean_steps += 1
            if self.cuts and self.lr_recover_after is not None and self.clean_steps >= self.lr_recover_after:
                self.clean_steps = 0
                return "lr_recover"
            return None
        self.skips.append(step)
        if len(self.skips) >= self.rollback_after:
            return "rollback"
        cooling = self.last_backoff is not None and step - self.last_backoff < self.skip_window
        if len(self.skips) >= self.backoff_after and not cooling:
            self.last_backoff = step
            self.clean_steps = 0
            return "lr_backoff"
        return None

    def after_rollback(self) -> None:
        self.skips.clear()
        self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "skips": list(self.skips),
            "last_backoff": self.last_backoff,
            "clean_steps": self.clean_steps,
            "cuts": list(self.cuts),
            "rollbacks": self.rollbacks,
            "lr_backoffs": self.lr_backoffs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skips = deque(int(s) for s in state["skips"])
        self.last_backoff = None if state["last_backoff"] is None else int(state["last_backoff"])
        self.clean_steps = int(state["clean_steps"])
        self.cuts = [float(c) for c in state["cuts"]]
        self.rollbacks = int(state["rollbacks"])
        self.lr_backoffs = int(state["lr_backoffs"])


@dataclass
class TrainingState:
    """The objects a snapshot covers, and how to read and restore the Guard's own part."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard_state: Callable[[], dict[str, Any]]
    load_guard_state: Callable[[dict[str, Any]], None]

    def capture(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "guard": self.guard_state(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_guard_state(state["guard"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

"""Early warning: the gradient norm climbing off its floor, measured on the device, before a run diverges.

At a learning rate beyond the stable range a transformer does not blow up at once: its gradient norm first
leaves the level it had settled to and climbs, steps before the loss explodes (the lab's ``transformers``
scenario measures how many). :class:`Precursor` watches for that climb, with device tensors only (a few
scalar kernels per step, no host read):

    e_t = alpha * e_{t-1} + (1 - alpha) * log ||g_t||         smoothed log-norm (finite norms only)
    f_t = min(e_t, f_{t-1} + rate)                           its floor, which may rise by ``rate`` per step
    warn_t = e_t - f_t > log(ratio)                          (after ``warmup_steps`` steps)

The floor starts at the first smoothed value after the warm-up. Because it can rise by ``rate`` per step
(``log 2 / 200`` by default: a doubling per 200 steps), a slow drift of the norm over a long run is
absorbed, while a climb by ``ratio`` within a few tens of steps is not. A step whose norm is NaN/Inf is not
learned (the Guard's ``nonfinite_grad`` event covers it).

:meth:`Precursor.update` returns a 0-d bool tensor that is True at the first step of each climb past the
threshold (one warning per climb; :attr:`Precursor.above` holds whether the signal is above it now);
:attr:`Precursor.first` holds the first step above it (-1: none), also on the device. Read them when the
history is flushed. The Guard runs one in its detector: event kind ``precursor``, response ``"log"`` by
default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Precursor"]


class Precursor:
    """On-device early-warning signal: the smoothed log gradient norm more than ``ratio`` above its floor.

    The defaults were chosen on the lab's transformer sweep (126 runs) as the most sensitive setting with at
    most 5% false alarms there; at that rate the warning comes a median of about 35 steps before a
    divergence, and 50 steps ahead for only about a fifth of them (the lab's report gives the figures, for
    these and other settings).

    Args:
        ratio: how far above its floor (a factor on the norm) the smoothed norm must climb (> 1).
        alpha: smoothing of the log-norm, in [0, 1) (0.9: about 10 steps).
        warmup_steps: steps before the floor is set and warnings can be raised (the first steps of training
            move the norm by orders of magnitude on their own).
        rate: how fast the floor may rise, in log-norm per step (>= 0).

    Example::

        precursor = gg.precursor.Precursor()
        for step, batch in enumerate(data):
            loss = loss_fn(model(batch.x), batch.y); loss.backward()
            raised = precursor.update(gg.grad_stats(model).total_norm)   # 0-d bool, on the device
            optimizer.step(); optimizer.zero_grad()
        precursor.first_warning()    # the first step flagged, or None (one host read)
    """

    def __init__(self, ratio: float = 4.0, alpha: float = 0.9, warmup_steps: int = 20,
                 rate: float = math.log(2.0) / 200):
        if not ratio > 1.0:
            raise ValueError(f"Precursor: ratio must be > 1, got {ratio}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"Precursor: alpha must be in [0, 1), got {alpha}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"Precursor: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if not rate >= 0.0:
            raise ValueError(f"Precursor: rate must be >= 0, got {rate}")
        self.ratio = float(ratio)
        self.alpha = float(alpha)
        self.warmup_steps = warmup_steps
        self.rate = float(rate)
        self.steps = 0  # host counter of updates: deciding on it costs no sync
        self.smoothed: Tensor | None = None
        self.floor: Tensor | None = None
        self.first: Tensor | None = None
        self.above: Tensor | None = None

    def update(self, total_norm: Tensor) -> Tensor:
        """Learn one step's total gradient norm (a 0-d tensor); return True (0-d bool) when the signal has just
        climbed past the threshold: the first step of a climb."""
        log_norm = total_norm.detach().float().reshape(()).clamp_min(torch.finfo(torch.float32).tiny).log()
        return self.update_log(log_norm, torch.isfinite(log_norm))

    def update_log(self, log_norm: Tensor, finite: Tensor) -> Tensor:
        """:meth:`update` from the log of the norm and whether it is finite (0-d tensors), for a caller that has
        them already (the Guard's detector)."""
        log_norm = log_norm.float().reshape(())
        device = log_norm.device
        if self.smoothed is None:
            self.smoothed = torch.where(finite, log_norm, 0.0)
            self.floor = torch.full_like(log_norm, math.inf)
            self.first = torch.full((), -1, dtype=torch.int64, device=device)
            self.above = torch.zeros((), dtype=torch.bool, device=device)
        else:
            self.smoothed = torch.where(finite, torch.lerp(self.smoothed, log_norm, 1.0 - self.alpha), self.smoothed)
        assert self.floor is not None and self.first is not None and self.above is not None
        if self.steps < self.warmup_steps:
            raised = torch.zeros((), dtype=torch.bool, device=device)
        else:
            self.floor = torch.minimum(self.smoothed, self.floor + self.rate)
            above = self.smoothed - self.floor > math.log(self.ratio)
            raised = above & ~self.above
            self.above = above
            self.first = torch.where(above & (self.first < 0), self.steps, self.first)
        self.steps += 1
        return raised

    def signal(self) -> Tensor | None:
        """``e_t - f_t``, the log of how many times the smoothed norm is above its floor (0-d, device)."""
        if self.smoothed is None or self.floor is None or self.steps <= self.warmup_steps:
            return None
        return self.smoothed - self.floor

    def first_warning(self) -> int | None:
        """The first step flagged, counted from 0 (one host read); None when none was."""
        if self.first is None:
            return None
        first = int(self.first)
        return None if first < 0 else first

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "smoothed": self.smoothed, "floor": self.floor, "first": self.first,
                "above": self.above}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"steps", "smoothed", "floor", "first", "above"} - set(state)
        if missing:
            raise ValueError(f"Precursor.load_state_dict: missing {sorted(missing)}")
        self.steps = int(state["steps"])
        self.smoothed, self.floor = state["smoothed"], state["floor"]
        self.first, self.above = state["first"], state["above"]

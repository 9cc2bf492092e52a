"""Detection: turn one step's gradient statistics and loss into on-device event flags.

Every detection is a 0-d bool tensor; nothing here reads a tensor on the host, so the Guard can decide
(skip, clip) with ``torch.where`` and read the flags once, or never (fused optimizers, see ``guard.py``).

Kinds of event (``EVENT_KINDS``):

* ``nonfinite_grad``: a gradient holds NaN or Inf (``stats.finite`` is False).
* ``nonfinite_loss``: the loss is NaN or Inf.
* ``grad_spike``: the log of the total gradient norm is more than ``z_thresh`` standard deviations above
  its exponential moving average; during the warm-up (the first ``warmup_steps`` steps), above the
  median of the last norms, in robust standard deviations (:func:`warmup_reference`), from the fourth step on:
  no step is blind. Scores are taken on the log of the norm because gradient norms vary multiplicatively: a 10x
  jump is the same surprise at norm 0.1 and at norm 100.
* ``loss_spike``: the same z-score on the log of the loss (positive losses only).
* ``growth``: the norm rose at every step of the last ``growth_window`` steps, by at least
  ``growth_factor`` per step on average: a run exploding before it turns into NaN.
* ``precursor``: the weight norm grew ``weight_ratio`` times between two samples ``weight_every`` steps apart
  (when the caller passes it, as the Guard does), or its growth per sample sped up by ``acceleration`` over its
  slowest, or the smoothed log of the total norm climbed ``ratio``
  times above its slowly rising floor (:class:`gradguard.precursor.Precursor`): an early warning, tens of
  steps before a run at a too-high learning rate diverges. Raised once per climb.
* ``update_jump`` and ``update_size`` (``UPDATE_KINDS``): the optimizer's step relative to the weights,
  ``||dW|| / ||W||`` (:mod:`gradguard.update_size`): a step about to be taken ``jump`` times its usual size (an LR
  burst, caught at its first step), and a layer's measured update size climbing (an early warning). The Guard
  judges them in its step, after the detector (they need the learning rate and the weights); the state is kept
  by the detector (``Detector.update_size``).
* ``nonfinite_param``: a parameter holds NaN or Inf after a step. It needs a pass over the weights, so the
  Guard checks it when it flushes its history (:func:`nonfinite_layer`), not every step, and on the plain
  path also at a step whose loss is NaN/Inf (weights that hold NaN spoil every loss after them).

Each step's :class:`Verdict` also names a layer: the first layer whose gradient norm is not finite, or
else the layer whose log norm is furthest above its own moving average (the one that moved most).

The moving statistics follow the exponentially weighted mean and variance of Finch (2009), "Incremental
calculation of weighted mean and variance"::

    d = x - mu ;  mu <- mu + (1 - alpha) * d ;  var <- alpha * (var + (1 - alpha) * d^2)

with ``alpha`` for the gradient norms and ``loss_alpha`` for the loss (both 0.98; a faster loss level follows a fast
early fall, see ``Detector``: an EMA lags a trend by ``alpha / (1 - alpha)`` steps, and the lag swells its variance).

During the warm-up, values are scored against a robust reference (:func:`warmup_reference`; Hampel 1974's
median-based outlier rule, with the spread taken from successive differences, von Neumann 1941)::

    z = (x_t - median(x_{t-8} .. x_{t-1})) / max(1.4826 * median_i |x_i - x_{i-1}| / sqrt(2), warmup floor)

robust to the spike it is looking for, and to early training's trend (the median of *every* value so far, and
the MAD about it, lag and widen with a loss that halves in a few dozen steps: a batch with one x100-loss row,
its loss x7, went unflagged in the warm-up). The warm-up floor is ``warmup_sigma_floor`` (0.5) for the gradient
norms and ``warmup_loss_sigma_floor`` (0.25) for the loss. The moving statistics then start from that reference:
the mean at the median, the variance at the smaller of the floored spread squared and the warm-up's plain variance
(ZClip starts from the plain mean and variance of its warm-up; where early training's trend swelled them, as it
does the loss's, the EMA stayed blind to a x7 loss for some hundred steps).

**One step, one pure function.** :func:`detector_step` is the whole device arithmetic of a step (scores, flags,
the named layer, the moving statistics, the growth ring, the precursor), a pure function of the packed values
(:func:`pack`), the state (:class:`DetectorTensors`) and a host-fixed configuration (:class:`DetectorStep`).
:meth:`Detector.update` is ``begin`` (the state and configuration, host bookkeeping), ``detector_step``, then
``commit`` (keep the new state; during the warm-up, collect the values); the Guard runs ``detector_step``
inside its own step function (``gradguard.device_step``), which ``Guard(compile=True)`` compiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard.precursor import Precursor, PrecursorStep, PrecursorTensors, precursor_step
from gradguard.stats import GradStats, is_finite, per_tensor_norms
from gradguard.update_size import UpdateSize

#: Events the detector raises from a step's gradients and loss, in the order of :attr:`Verdict.flags`.
DETECTOR_KINDS = ("nonfinite_grad", "nonfinite_loss", "grad_spike", "loss_spike", "growth", "precursor")
#: Events of the update size (``gradguard.update_size``), judged in the same step, after the detector's.
UPDATE_KINDS = ("update_jump", "update_size")
#: Events one guarded step can raise, in the order of the step's flags.
STEP_KINDS = (*DETECTOR_KINDS, *UPDATE_KINDS)
#: All kinds of event, the parameter check (at flush time) included.
EVENT_KINDS = (*STEP_KINDS, "nonfinite_param")
#: Finite values a warm-up score needs (a spike at the fourth step of a run is scored).
MIN_WARMUP_VALUES = 3
#: Slots of the packed vector ``[||g||, loss, ||g_layer|| ...]`` (:func:`pack`): the total gradient norm, the
#: loss, the layers' norms; ``SCORED`` are the slots with spikes of their own (the total norm and the loss).
TOTAL, LOSS = 0, 1
SCORED = slice(TOTAL, LOSS + 1)
LAYERS = slice(LOSS + 1, None)
MAD_TO_STD = 1.4826  # the MAD of a normal sample times this is its standard deviation
#: The warm-up's defaults (:func:`warmup_reference`): its center is the median of the last ``WARMUP_WINDOW`` values;
#: its standard deviation (of the logs) is floored at ``WARMUP_SIGMA_FLOOR`` for the gradient norms and at
#: ``WARMUP_LOSS_SIGMA_FLOOR`` for the loss (``Detector``'s docstring says why they differ).
WARMUP_WINDOW, WARMUP_SIGMA_FLOOR, WARMUP_LOSS_SIGMA_FLOOR = 8, 0.5, 0.25


def kinds_of(bits: int) -> list[str]:
    """The kinds whose bit is set in ``bits`` (bit ``i``: ``STEP_KINDS[i]``), in ``STEP_KINDS`` order."""
    return [kind for i, kind in enumerate(STEP_KINDS) if bits >> i & 1]


class Verdict(NamedTuple):
    """What the detector saw at one step; all device tensors.

    Attributes:
        flags: bool tensor, one entry per kind of ``DETECTOR_KINDS`` (the Guard's step appends those of
            ``UPDATE_KINDS``: one per kind of ``STEP_KINDS``).
        grad_z: 0-d, z-score of the log total norm (robust during warm-up; NaN before the
            fourth finite norm, or while no finite norm was seen).
        loss_z: 0-d, z-score of the log loss (the same; 0 when no loss is given).
        spike_threshold: 0-d, the total norm above which a step is a spike (NaN while there is none yet).
        norm_level: 0-d, the moving average of the total norm (``exp`` of the EMA of its log).
        growth_rate: 0-d, the average factor per step by which the norm rose over the growth window.
        layer: 0-d int64, the index (in ``stats.names``) of the layer the step's events point at.
        precursor_signal: 0-d int64, the early-warning signal above its threshold
            (``gradguard.precursor.WEIGHT_GROWTH``, ``WEIGHT_ACCELERATION`` or ``GRAD_CLIMB``; 0: none).
        precursor_factor: 0-d, how far: the weights' growth factor, their growth per sample over its slowest, or
            the gradient norm's factor over its floor.
    """

    flags: Tensor
    grad_z: Tensor
    loss_z: Tensor
    spike_threshold: Tensor
    norm_level: Tensor
    growth_rate: Tensor
    layer: Tensor
    precursor_signal: Tensor
    precursor_factor: Tensor

    def flag(self, kind: str) -> Tensor:
        return self.flags[STEP_KINDS.index(kind)]


def ema_update(mean: Tensor, var: Tensor, x: Tensor, learn: Tensor, alpha: float | Tensor,
               sigma_floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the exponentially weighted mean and variance (Finch 2009, the module docstring), where
    ``learn``; returns ``(mean, var, std)``, ``std = max(sqrt(var), sigma_floor)``. ``alpha``: one decay, or
    one per element. A mean still NaN (nothing finite learned yet) starts from ``x``. Pure: new tensors, no
    read."""
    # nothing finite in warm-up (mean NaN, the only value not equal to itself): start from this value
    start = torch.where(mean == mean, mean, x)
    d = x - start
    if isinstance(alpha, Tensor):
        new_mean = torch.addcmul(start, d, 1.0 - alpha)
        new_var = torch.addcmul(var, d * d, 1.0 - alpha).mul_(alpha)
    else:
        new_mean = torch.add(start, d, alpha=1.0 - alpha)
        new_var = torch.addcmul(var, d, d, value=1.0 - alpha).mul_(alpha)
    mean = torch.where(learn, new_mean, mean)
    var = torch.where(learn, new_var, var)
    return mean, var, var.sqrt().clamp_(min=sigma_floor)


def growth_step(ring: Tensor, log_norm: Tensor, window: int, log_factor: float,
                full: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Push this step's log norm (NaN when not finite) into the ring of the last ``window + 1``; returns
    ``(ring, growth flag, average factor per step over the window)``; the flag is False until the ring is
    ``full``. Pure."""
    ring = torch.cat([ring[1:], log_norm.reshape(1).to(ring.dtype)])
    rise = ring[-1] - ring[0]
    growth = (ring.diff() > 0).all() & (rise > window * log_factor)
    if not full:
        growth = torch.zeros_like(growth)  # not a full window yet
    return ring, growth, torch.exp(rise / window)


def warmup_reference(seen: Tensor, window: int, sigma_floor: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(center, std)`` of each slot of ``seen`` (rows: the warm-up's values so far, oldest first; NaN where
    nothing was learned), robust to the outliers the warm-up is looking for and to early training's trend::

        center = median(x_{t-w+1}, ..., x_t)                   the last w = window finite values
        d_i    = x_i - x_{i'}                                  each finite value minus the finite one before it
        std    = max(1.4826 * median_i |d_i| / sqrt(2), sigma_floor)

    The center is the median of the recent values, not of all of them: early training moves fast (the loss halves
    in a few dozen steps), and the median of every value so far lags that trend. The spread comes from
    successive differences (von Neumann 1941's mean square successive difference, made robust as Donoho &
    Johnstone 1994 do with the finest Haar coefficients, ``MAD(d) / 0.6745``; ``d`` of two independent values has
    variance ``2 sigma^2``, hence ``sqrt(2)``): a trend moves every value away from the median, widening the MAD
    about it with the very drift the center follows, while it adds only its per-step slope to a difference. An
    outlier spoils the two differences it is in, so fewer than a quarter of outliers leave the median of
    ``|d|`` where it was. ``sigma_floor``: a number, or one per slot. The center is NaN where fewer than
    :data:`MIN_WARMUP_VALUES` finite values were seen (a NaN compares False with any threshold: nothing is
    flagged). Pure: no host read."""
    finite = seen == seen
    steps = torch.arange(seen.shape[0], device=seen.device).reshape(-1, *([1] * (seen.dim() - 1)))
    # the index of the last finite value at or before each row (-1: none yet), so a NaN row in between (a
    # non-finite step, a loss spike that was not learned) does not break a difference
    last = torch.where(finite, steps, -1).cummax(dim=0).values
    before = torch.cat([torch.full_like(last[:1], -1), last[:-1]])
    d = torch.where(finite & (before >= 0), seen - seen.gather(0, before.clamp(min=0)), math.nan)
    spread = d.abs().nanmedian(dim=0).values * (MAD_TO_STD / math.sqrt(2.0))
    # the last `window` finite values, counted from the newest (a run of NaN rows does not empty the window)
    recent = finite & (finite.flip(0).cumsum(dim=0).flip(0) <= window)
    center = torch.where(recent, seen, math.nan).nanmedian(dim=0).values
    enough = finite.sum(dim=0) >= MIN_WARMUP_VALUES
    floor = sigma_floor.to(spread.dtype) if isinstance(sigma_floor, Tensor) else sigma_floor
    return torch.where(enough, center, math.nan), torch.clamp(spread.nan_to_num(nan=0.0), min=floor)


class MovingZScore:
    """z-scores of a value (or a vector of values) against their exponentially weighted mean and variance.

    **Warm-up.** The first ``warmup_steps`` calls collect the values; meanwhile a value is scored robustly
    against those seen so far (:func:`warmup_reference`): the median of the last ``warmup_window`` of them, and
    the standard deviation of their successive differences (a median, times 1.4826 / sqrt(2)), floored at
    ``warmup_sigma_floor`` (early training moves fast), once at least :data:`MIN_WARMUP_VALUES` finite values
    were seen. So a spike at the fourth step is flagged: there is no blind window. Then the EMA starts where
    the warm-up's reference ends: its mean at that median, its variance at the smaller of the square of that
    floored standard deviation and the warm-up's plain variance (the plain variance alone holds early training's
    whole trend: the EMA took some hundred steps to forget it, blind meanwhile to a x7 loss; the floor alone
    blunted the first steps after a steady warm-up, a x6 gradient spike went unflagged), and ``ready`` (a host
    bool, from the call count) is True.

    ``sigma_floor`` bounds the standard deviation from below, so that a very steady series does not turn
    a small wobble into a large z-score. Non-finite values are never learned.
    """

    def __init__(self, alpha: float, warmup_steps: int, sigma_floor: float, warmup_sigma_floor: float = WARMUP_SIGMA_FLOOR,
                 warmup_window: int = WARMUP_WINDOW):
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.sigma_floor = sigma_floor
        self.warmup_sigma_floor = max(warmup_sigma_floor, sigma_floor)
        self.warmup_window = warmup_window
        self.calls = 0
        self._seen: Tensor | None = None  # warm-up: (warmup_steps, *shape) values, NaN where not learned
        self.mean: Tensor | None = None  # NaN where nothing finite was learned yet
        self.var: Tensor | None = None
        self._std: Tensor | None = None  # max(sqrt(var), sigma_floor), kept with var

    @property
    def ready(self) -> bool:
        return self.calls >= self.warmup_steps

    def std(self) -> Tensor:
        assert self._std is not None
        return self._std

    def reference(self, like: Tensor, warmup_floor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(center, std)`` a value is scored against now: the EMA's mean and floored std, or in warm-up
        :func:`warmup_reference` of the values so far, its std floored at ``warmup_floor`` (one per slot; None:
        ``warmup_sigma_floor``). The center is NaN while too little was learned (a NaN compares False with any
        threshold, so it flags nothing)."""
        if self.ready:
            assert self.mean is not None
            return self.mean, self.std()
        if self._seen is None or self.calls < MIN_WARMUP_VALUES:  # a host count: no read
            nan = torch.full_like(like, math.nan)
            return nan, nan
        return warmup_reference(self._seen[: self.calls], self.warmup_window, self._warmup_floor(warmup_floor))

    def _warmup_floor(self, warmup_floor: Tensor | None) -> float | Tensor:
        return self.warmup_sigma_floor if warmup_floor is None else warmup_floor.clamp(min=self.sigma_floor)

    def score(self, x: Tensor, std: Tensor | None = None) -> Tensor:
        """``(x - center) / std`` (see :meth:`reference`): NaN while too little was learned."""
        center, floored = self.reference(x)
        return (x - center) / (floored if std is None else std)

    def update(self, x: Tensor, learn: Tensor, warmup_floor: Tensor | None = None) -> None:
        """Learn ``x`` where ``learn`` (bool, same shape or 0-d) is True; ``learn`` must imply a finite ``x``.
        ``warmup_floor``: as in :meth:`reference` (the warm-up's last step hands its reference to the EMA)."""
        if not self.ready:
            if self._seen is None or self._seen.shape[1:] != x.shape:
                self._seen = torch.full((self.warmup_steps, *x.shape), math.nan, dtype=x.dtype, device=x.device)
            self._seen[self.calls] = torch.where(learn, x, math.nan)
            self.calls += 1
            if self.ready:  # warm-up over: the EMA starts from the warm-up's reference (the class docstring)
                center, std = warmup_reference(self._seen, self.warmup_window, self._warmup_floor(warmup_floor))
                plain = self._seen.nanmean(dim=0)
                plain_var = (self._seen - plain).square().nanmean(dim=0).nan_to_num(nan=0.0)
                # the smaller variance: the plain one of a steady warm-up (the floor would blunt the first steps
                # after it), the reference's where a trend swelled the plain one; a slot with fewer finite values
                # than a reference needs: its plain moments (NaN: none)
                enough = center == center
                self.mean = torch.where(enough, center, plain)
                self.var = torch.where(enough, torch.minimum(std.square(), plain_var), plain_var)
                self._std = self.var.sqrt().clamp(min=self.sigma_floor)
                self._seen = None
            return
        assert self.mean is not None and self.var is not None
        self.keep(*ema_update(self.mean, self.var, x, learn, self.alpha, self.sigma_floor))

    def keep(self, mean: Tensor, var: Tensor, std: Tensor) -> None:
        """Keep the moments :func:`ema_update` returned (past the warm-up): one more step."""
        self.mean, self.var, self._std = mean, var, std
        self.calls += 1

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {"calls": self.calls, "seen": copy(self._seen), "mean": copy(self.mean), "var": copy(self.var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        self.calls = int(state["calls"])
        self._seen, self.mean, var = copy(state["seen"]), copy(state["mean"]), state["var"]
        self.var = None if var is None else var.nan_to_num(nan=0.0)
        self._std = None if self.var is None else self.var.sqrt().clamp(min=self.sigma_floor)


class GrowthWindow:
    """Sustained growth: ``log g_t`` rose at each of the last ``window`` steps, by ``log(factor)`` per step
    on average. Keeps the last ``window + 1`` log norms on the device, oldest first."""

    def __init__(self, window: int, factor: float):
        self.window = window
        self.log_factor = math.log(factor)
        self.calls = 0
        self._ring: Tensor | None = None

    def keep(self, ring: Tensor) -> None:
        """Keep the ring :func:`growth_step` returned: one more push."""
        self._ring = ring
        self.calls += 1

    def ring(self, device: torch.device) -> Tensor:
        """The ring on ``device`` (NaN-filled at first)."""
        if self._ring is None or self._ring.device != device:
            self._ring = torch.full((self.window + 1,), math.nan, dtype=torch.float32, device=device)
        return self._ring

    def full_next(self) -> bool:
        """Whether the ring is full after the next push (a host count)."""
        return self.calls + 1 > self.window

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "ring": None if self._ring is None else self._ring.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self._ring = None if state["ring"] is None else state["ring"].clone()


def _check_detector_args(alpha: float, z_thresh: float, warmup_steps: int, growth_window: int,
                         growth_factor: float, sigma_floor: float) -> None:
    # a threshold that is not a finite real number turns detection off (sigma_floor=inf: no z-score ever
    # exceeds z_thresh) or fails only at the first step (a string): refused here, the argument named
    for name, value in (("alpha", alpha), ("z_thresh", z_thresh), ("growth_factor", growth_factor),
                        ("sigma_floor", sigma_floor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Detector: {name} must be a finite number, got {value!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"Detector: alpha must be in (0, 1), got {alpha}")
    if not (z_thresh > 0 and math.isfinite(z_thresh)):
        raise ValueError(f"Detector: z_thresh must be a finite number > 0, got {z_thresh}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 2:
        raise ValueError(f"Detector: warmup_steps must be an int >= 2, got {warmup_steps!r}")
    if not isinstance(growth_window, int) or isinstance(growth_window, bool) or growth_window < 2:
        raise ValueError(f"Detector: growth_window must be an int >= 2, got {growth_window!r}")
    if not (growth_factor > 1.0 and math.isfinite(growth_factor)):
        raise ValueError(f"Detector: growth_factor must be a finite number > 1, got {growth_factor}")
    if not sigma_floor >= 0.0:
        raise ValueError(f"Detector: sigma_floor must be >= 0, got {sigma_floor}")


class DetectorConstants(NamedTuple):
    """Per-slot constants of the packed vector ``[log ||g||, log loss, log ||g_layer|| ...]``, on its device."""

    floor: Tensor  # lower clamp before the log: 1e-30 for norms (a zero norm is scored), -inf for the loss
    z_thresh: Tensor  # z_thresh for the total norm and the loss, inf for layers (no spike of their own)
    loss_slot: Tensor  # True at the loss: its spikes are not learned
    warmup_floor: Tensor  # the warm-up's floor on the std: warmup_sigma_floor, warmup_loss_sigma_floor at the loss
    scored: Tensor  # True at the total norm and the loss (SCORED): a zero there is not learned
    no_loss: Tensor  # NaN, shape (1,): the loss slot when no loss is given, the growth ring's non-finite norm
    without_loss: Tensor  # the flags that stay when no loss is given
    zeros: Tensor
    inf: Tensor
    alpha: Tensor  # the EMA decay of each slot: alpha, loss_alpha at the loss


class DetectorTensors(NamedTuple):
    """What one step of the detector reads from its state, on the device.

    ``center`` and ``std`` are what the step's values are scored against: the moving mean and floored std,
    or during the warm-up the median and floored MAD of the values so far (NaN: too few); ``var`` is the
    moving variance (a placeholder during the warm-up)."""

    center: Tensor
    std: Tensor
    var: Tensor
    ring: Tensor
    precursor: PrecursorTensors


@dataclass(frozen=True)
class DetectorStep:
    """What one step of the detector does, fixed on the host (one object per kind of step)."""

    z_thresh: float
    sigma_floor: float
    growth_window: int
    log_growth_factor: float
    ema: bool  # past the warm-up: learn by the EMA in the step (else the host collects the warm-up values)
    rank_layers_by_z: bool  # name the layer by z-score (from the warm-up's last step on), else by log norm
    growth_full: bool
    has_loss: bool
    has_layers: bool
    precursor: PrecursorStep


class DetectorOutput(NamedTuple):
    """One step of the detector: its verdict, the new state, what to learn (the warm-up collects it)."""

    verdict: Verdict
    state: DetectorTensors
    learn_x: Tensor  # the values to learn: the logs, kept within z_thresh sigmas of the level
    learn: Tensor  # bool per slot: learn it (finite, not a loss spike, not a zero total norm)


def pack(total_norm: Tensor, loss: Tensor | None, norms: Tensor, c: DetectorConstants) -> Tensor:
    """``[||g||, loss, ||g_layer|| ...]`` in one vector: float32, or float64 for float64 norms (a float64
    gradient of 1e100 has a finite norm, see stats.py); the loss slot is NaN when no loss is given."""
    loss_slot = c.no_loss if loss is None else loss.detach().reshape(1).to(norms.device)
    return torch.cat([total_norm.reshape(1), loss_slot.float(), norms])


def detector_step(u: Tensor, s: DetectorTensors, weight_norm: Tensor | None, c: DetectorConstants,
                  config: DetectorStep) -> DetectorOutput:
    """Score one step's packed values ``u`` (:func:`pack`) and learn them: a pure function of device tensors
    (the math of :class:`Detector`, see the module docstring), run eagerly or inside the Guard's compiled
    step (``gradguard.device_step``)."""
    x = torch.clamp(u, min=c.floor).log()  # a loss <= 0 has no log: NaN or -inf, never scored
    nonfinite = ~is_finite(u[SCORED])  # [gradient, loss] hold NaN or inf
    ok = is_finite(x)  # finite logs: the values that are scored and learned
    z = (x - s.center) / s.std
    log_threshold = torch.addcmul(s.center, s.std, c.z_thresh)
    spike = (z > c.z_thresh) & ok
    # learn where finite, a loss spike excepted (spike implies ok, so the xor drops just that one), and a
    # total norm of exactly 0 (a fully masked batch, zero_grad(set_to_none=False)) measures no scale: not learned
    learn = (ok ^ (spike & c.loss_slot)) & ~((u == 0) & c.scored)
    # bounded influence: a value teaches at most z_thresh sigmas on either side of the level (a spike its
    # threshold, as in ZClip; a collapse its floor), so no one step moves the mean by more than
    # (1 - alpha) * z_thresh * sigma, nor sigma by more than sqrt(alpha * (1 + (1 - alpha) * z_thresh^2)) (x1.14
    # at the defaults); a 1e-30 norm once moved the level 70 log-units and set the threshold at 1e16.
    # fmin/fmax: a NaN bound (nothing learned yet) bounds nothing; the layers' bounds are infinite.
    log_floor = torch.addcmul(s.center, s.std, c.z_thresh, value=-1.0)
    learn_x = torch.fmax(torch.fmin(x, log_threshold), log_floor)
    center, var, std = s.center, s.var, s.std
    if config.ema:
        center, var, std = ema_update(center, var, learn_x, learn, c.alpha, config.sigma_floor)
    # the ring gets NaN for a non-finite norm, which ends any run of growth
    ring, growth, growth_rate = growth_step(s.ring, torch.where(ok[TOTAL], x[TOTAL], c.no_loss), config.growth_window,
                                            config.log_growth_factor, config.growth_full)
    precursor_state, precursor = precursor_step(s.precursor, x[TOTAL], ok[TOTAL], weight_norm, config.precursor)
    flags = torch.cat([nonfinite, spike[SCORED], growth.reshape(1), precursor.raised.reshape(1)])
    if not config.has_loss:
        flags = flags & c.without_loss
    if config.has_layers:  # the first non-finite layer (inf wins), else the one furthest above its own average
        moved = z[LAYERS] if config.rank_layers_by_z else x[LAYERS]
        layer = torch.where(ok[LAYERS], moved, c.inf[LAYERS]).argmax()
    else:
        layer = torch.zeros((), dtype=torch.int64, device=u.device)
    verdict = Verdict(
        flags=flags,
        grad_z=z[TOTAL],
        loss_z=z[LOSS] if config.has_loss else c.zeros[LOSS],
        spike_threshold=torch.exp(log_threshold[TOTAL]),
        norm_level=torch.exp(center[TOTAL]) if config.ema else c.inf[TOTAL],  # no level before the warm-up ends
        growth_rate=growth_rate,
        layer=layer,
        precursor_signal=precursor.signal,
        precursor_factor=precursor.factor,
    )
    state = DetectorTensors(center=center, std=std, var=var, ring=ring, precursor=precursor_state)
    return DetectorOutput(verdict=verdict, state=state, learn_x=learn_x, learn=learn)


class Detector:
    """Scores each step's total gradient norm, per-layer norms and loss; returns a :class:`Verdict`.

    Args:
        z_thresh: a step whose log norm (or log loss) is more than this many standard deviations above its
            moving average is a spike.
        alpha: EMA decay of the moving statistics of the gradient norms (0.98: about the last 50 steps).
        loss_alpha: the same for the loss (0.98 by default, as the norms). An EMA lags a trend by
            ``alpha / (1 - alpha)`` steps of it, and the lag swells its variance: at 0.98, a loss that fell as
            Adam's does early (log -0.03 per step for 80 steps) left the level ~1.4 (log) above the loss and its
            sigma swollen, decaying for a hundred steps after the fall, so a x7 loss (one x100-loss row in 16)
            is no spike there (the soak's ``warmup_outlier`` family under AdamW flags 11 of 51 such batches at
            steps 150-249, seeds 30000-30019; 51 of 51 at 0.95). 0.95 is not the default yet: it also flags
            a healthy run's natural x10 batch (the suite's MLP under AdamW and warm-up + cosine, step 219) and
            changes which flushes keep a snapshot; on ``benchmarks/early_warning.py``'s six healthy families,
            seeds 0-7, it raised no loss spike (0.9: 2 runs of 18 skipped steps).
        warmup_steps: steps collected before spikes are scored.
        growth_window: steps over which sustained growth is measured.
        growth_factor: average per-step factor of the norm over the window that counts as growth.
        sigma_floor: lower bound on the standard deviation of the logs (0.1: a 10% wobble is one sigma).
        warmup_sigma_floor: lower bound on the robust standard deviation of the log gradient norms during the
            warm-up (0.5: with ``z_thresh=4`` a gradient spike is a norm more than e^2 = 7.4 times the median of the
            last ones; early gradient norms move fast: on healthy runs a norm reached 3.7x that median, log 1.30,
            CNN on digits, SGD; ``benchmarks/warmup_outliers.py``).
        warmup_loss_sigma_floor: the same for the log of the loss (0.25: a loss e^1 = 2.7 times the median of
            the last ones, so a batch of 16 with one x100-loss row, its loss x7.2, is a spike; on healthy runs
            the loss reached at most 1.9x that median, log 0.63, the soak's regression under SGD). The loss is an
            average over the batch: it moves less than the norms, and its spikes are what bad data looks like.
        warmup_window: how many of the last values the warm-up's center is the median of (8: a lag of 4 steps
            behind early training's trend; an outlier or two among them barely move it).
        precursor: the early-warning signal (default ``Precursor()``, see ``gradguard.precursor``).
        update_size: the optimizer's step relative to the weights (default ``UpdateSize()``, see
            ``gradguard.update_size``; None: off). The Guard runs it in its step, after the detector: it needs
            the learning rate and the weights, which the detector does not see; its state is kept here.

    A gradient-norm spike teaches the moving average only its threshold value (the clipped value, as in
    ZClip), so one spike barely moves the baseline while a lasting change of scale is learned within some
    steps. A loss spike teaches nothing: a loss that stays far above its history means the weights went
    bad (the Guard skips, then rolls back), not a new normal. A layer learns its own finite values.

    The total norm, the loss and the layer norms are scored together: their logs are one vector, with one
    moving mean and variance (``self.scores``) updated by one set of element-wise kernels per step.
    """

    def __init__(
        self,
        z_thresh: float = 4.0,
        alpha: float = 0.98,
        loss_alpha: float = 0.98,
        warmup_steps: int = 25,
        growth_window: int = 6,
        growth_factor: float = 1.5,
        sigma_floor: float = 0.1,
        warmup_sigma_floor: float = WARMUP_SIGMA_FLOOR,
        warmup_loss_sigma_floor: float = WARMUP_LOSS_SIGMA_FLOOR,
        warmup_window: int = WARMUP_WINDOW,
        precursor: Precursor | None = None,
        update_size: UpdateSize | None | str = "default",
    ):
        _check_detector_args(alpha, z_thresh, warmup_steps, growth_window, growth_factor, sigma_floor)
        if isinstance(loss_alpha, bool) or not isinstance(loss_alpha, (int, float)) or not 0.0 < loss_alpha < 1.0:
            raise ValueError(f"Detector: loss_alpha must be a number in (0, 1), got {loss_alpha!r}")
        for name, floor in (("warmup_sigma_floor", warmup_sigma_floor), ("warmup_loss_sigma_floor", warmup_loss_sigma_floor)):
            if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (floor >= 0.0 and math.isfinite(floor)):
                raise ValueError(f"Detector: {name} must be a finite number >= 0, got {floor!r}")
        if not isinstance(warmup_window, int) or isinstance(warmup_window, bool) or warmup_window < MIN_WARMUP_VALUES:
            raise ValueError(f"Detector: warmup_window must be an int >= {MIN_WARMUP_VALUES}, got {warmup_window!r}")
        self.z_thresh = float(z_thresh)
        self.alpha = float(alpha)
        self.loss_alpha = float(loss_alpha)
        self.warmup_steps = warmup_steps
        self.growth_window = growth_window
        self.growth_factor = float(growth_factor)
        self.sigma_floor = float(sigma_floor)
        self.warmup_sigma_floor = float(warmup_sigma_floor)
        self.warmup_loss_sigma_floor = float(warmup_loss_sigma_floor)
        self.warmup_window = warmup_window
        #: the moving statistics of ``[log ||g||, log loss, log ||g_layer|| for each layer]``
        self.scores = MovingZScore(alpha, warmup_steps, sigma_floor, warmup_sigma_floor, warmup_window)
        self.growth = GrowthWindow(growth_window, growth_factor)
        self.precursor = precursor if precursor is not None else Precursor()
        if isinstance(update_size, str) and update_size == "default":
            update_size = UpdateSize()
        if update_size is not None and not isinstance(update_size, UpdateSize):
            raise ValueError(f"Detector: update_size must be a gradguard.update_size.UpdateSize or None, "
                             f"got {update_size!r}")
        self.update_size: UpdateSize | None = update_size
        self._layer_names: list[str] | None = None
        self._constants: dict[tuple[torch.device, int], DetectorConstants] = {}
        self._configs: dict[tuple[Any, ...], DetectorStep] = {}

    def _constants_for(self, device: torch.device, layers: int) -> DetectorConstants:
        key = (device, layers)
        if key not in self._constants:
            def vector(total: float, loss: float, layer: float, dtype: torch.dtype = torch.float32) -> Tensor:
                return torch.tensor([total, loss] + [layer] * layers, dtype=dtype, device=device)

            self._constants[key] = DetectorConstants(
                floor=vector(1e-30, -math.inf, 1e-30),
                z_thresh=vector(self.z_thresh, self.z_thresh, math.inf),
                loss_slot=vector(False, True, False, dtype=torch.bool),
                warmup_floor=vector(self.warmup_sigma_floor, self.warmup_loss_sigma_floor, self.warmup_sigma_floor),
                scored=vector(True, True, False, dtype=torch.bool),
                no_loss=torch.full((1,), math.nan, device=device),
                without_loss=torch.tensor([k not in ("nonfinite_loss", "loss_spike") for k in DETECTOR_KINDS],
                                          device=device),
                zeros=torch.zeros(2 + layers, device=device),
                inf=torch.full((2 + layers,), math.inf, device=device),
                alpha=vector(self.alpha, self.loss_alpha, self.alpha),
            )
        return self._constants[key]

    def update(self, stats: GradStats, loss: Tensor | None = None, weight_norm: Tensor | None = None) -> Verdict:
        """Score this step; advances the moving statistics (from finite values only). ``weight_norm``: the
        weights' norm on the steps ``self.precursor.wants_weights()`` names (``gradguard.precursor``)."""
        state, c, config = self.begin(stats, loss is not None, weight_norm is not None)
        out = detector_step(pack(stats.total_norm, loss, stats.norms, c), state, weight_norm, c, config)
        self.commit(out, config)
        return out.verdict

    def begin(self, stats: GradStats, has_loss: bool,
              sampled: bool) -> tuple[DetectorTensors, DetectorConstants, DetectorStep]:
        """The host half of a step, before :func:`detector_step`: the state it reads, the constants and the
        configuration of this kind of step. Then :meth:`commit` its output."""
        device = stats.total_norm.device
        layers = stats.norms.numel()
        c = self._constants_for(device, layers)
        if self._layer_names != stats.names:
            self._new_layers(stats.names)
        scores = self.scores
        if scores.ready:
            assert scores.mean is not None and scores.var is not None
            center, std, var = scores.mean, scores.std(), scores.var
        else:  # the median and MAD so far (NaN: too few); the variance is not used
            center, std = scores.reference(c.zeros, c.warmup_floor)
            var = std
        precursor, precursor_config = self.precursor.begin(device, sampled)
        state = DetectorTensors(center=center, std=std, var=var, ring=self.growth.ring(device), precursor=precursor)
        key = (scores.ready, scores.calls + 1 >= scores.warmup_steps, self.growth.full_next(), has_loss,
               layers > 0, precursor_config)
        if key not in self._configs:  # one object per kind of step: a compiled caller sees the same one
            self._configs[key] = DetectorStep(
                z_thresh=self.z_thresh, sigma_floor=self.sigma_floor,
                growth_window=self.growth_window, log_growth_factor=self.growth.log_factor, ema=key[0],
                rank_layers_by_z=key[1], growth_full=key[2], has_loss=has_loss, has_layers=layers > 0,
                precursor=precursor_config)
        return state, c, self._configs[key]

    def commit(self, out: DetectorOutput, config: DetectorStep) -> None:
        """Keep a step's new state (and, during the warm-up, collect its values)."""
        if config.ema:
            self.scores.keep(out.state.center, out.state.var, out.state.std)
        else:
            c = self._constants_for(out.learn_x.device, out.learn_x.numel() - 2)  # the one begin() used
            self.scores.update(out.learn_x, out.learn, c.warmup_floor)
        self.growth.keep(out.state.ring)
        self.precursor.keep(out.state.precursor)

    def set_loss_level(self, loss: float | None) -> None:
        """Put the loss's moving level at ``loss`` (its variance stays): the weights the level was learned on were
        replaced by a rollback to an earlier snapshot, whose loss may be well above the level training had
        reached, and ``loss`` is the loss those weights had. Without this, every step after a rollback to an
        older snapshot scored as a loss spike (skipped, then rolled back again) until the budget was spent.
        ``None`` (not known yet: the snapshot's step was not flushed) or a loss that is not finite and positive
        leaves the level as it is: forgetting it would let the next bad losses set it. The gradient norms'
        statistics stay."""
        if loss is None or not (math.isfinite(loss) and loss > 0):
            return
        scores = self.scores
        level = math.log(loss)
        if scores.mean is not None:
            scores.mean = scores.mean.clone()
            scores.mean[LOSS] = level
        if scores._seen is not None:  # in warm-up: the loss values collected so far become that one level
            scores._seen = scores._seen.clone()
            scores._seen[: scores.calls, LOSS] = level

    def _new_layers(self, names: list[str]) -> None:
        """A different set of layers: their statistics start over, those of the norm and the loss stay."""
        previous, self._layer_names = self._layer_names, list(names)
        s = self.scores
        if previous is None or (s.mean is None and s._seen is None):
            return
        if not s.ready:  # the rest of the warm-up collects the new layers
            if s._seen is not None:
                s._seen = torch.cat([s._seen[:, SCORED], s._seen.new_full((s._seen.shape[0], len(names)), math.nan)], 1)
            return
        assert s.mean is not None and s.var is not None
        s.mean = torch.cat([s.mean[SCORED], s.mean.new_full((len(names),), math.nan)])  # from their first value
        s.var = torch.cat([s.var[SCORED], s.var.new_zeros(len(names))])
        s._std = s.var.sqrt().clamp(min=s.sigma_floor)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores.state_dict(),
            "layer_names": None if self._layer_names is None else list(self._layer_names),
            "growth": self.growth.state_dict(),
            "precursor": self.precursor.state_dict(),
            "update_size": None if self.update_size is None else self.update_size.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
        self._layer_names = None if state["layer_names"] is None else list(state["layer_names"])
        self.growth.load_state_dict(state["growth"])
        if "precursor" in state:  # a state saved before the precursor existed starts it afresh
            self.precursor.load_state_dict(state["precursor"])
        if self.update_size is not None and state.get("update_size") is not None:
            self.update_size.load_state_dict(state["update_size"])


def nonfinite_layer(named_params: list[tuple[str, Tensor]]) -> Tensor:
    """Index of the first parameter holding NaN or Inf, or -1: one pass over the weights, on the device.

    Used for the ``nonfinite_param`` check; the caller reads the result with its next host read.
    """
    if not named_params:
        return torch.full((), -1, dtype=torch.int64)
    params = [p.detach() for _, p in named_params]
    device = params[0].device
    # max |w| is finite iff every element is (the inf-norm cannot overflow); one fused read per group.
    norms = torch.stack([n.to(device) for n in per_tensor_norms(params, math.inf)])
    bad = ~torch.isfinite(norms)
    first = torch.argmax(bad.to(torch.uint8))
    return torch.where(bad.any(), first, torch.full_like(first, -1))

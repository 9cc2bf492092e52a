"""Early warning, measured on the device before a run diverges: the weights growing too fast, their growth
speeding up, or the gradient norm climbing off its floor.

At a learning rate beyond the stable range a model does not blow up at once. Three signals come first, all
computed with device tensors only (no host read):

* **weight growth** (every ``weight_every`` steps, one fused norm over the weights): the global weight norm
  ``||W||`` grew more than ``weight_ratio`` times since the previous sample. Wortsman et al. 2023
  ("Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322) trace the
  divergence of small transformers at high learning rates to the growth of the attention logits, whose
  scale is ``~ ||W_q|| ||W_k||``: weights that grow several-fold within a few steps are its visible cause.
  On the lab's transformer sweep the weights of every diverging run (all at its highest learning rate,
  1.0) grew ~3x over the first 10 steps (``log`` growth >= 1.03), those of every run at a lower learning
  rate at most 1.9x (``log`` growth <= 0.63, and never more later): the warning comes at step 10, 80-120
  steps before the divergence. It says that the learning rate is too large for the weights' scale, early
  in training; it is not a late symptom of the divergence.

      r_k = log ||W_{kK}|| - log ||W_{(k-1)K}||               K = ``weight_every``
      warn while r_k > log(weight_ratio)                       (until the next sample)

* **weight acceleration** (on the same samples, at no extra cost): the weights' growth per sample ``r_k``
  climbed more than ``acceleration`` (in log per sample) above its slowest since the warm-up,

      m_k = min(r_k, m_{k-1} + acceleration / 10)              the slowest growth, which may rise slowly
      warn while r_k - m_k > acceleration                      (after ``acceleration_after`` samples)

  A healthy run's weights grow fastest early and slow down; under a learning rate that keeps rising past the
  stable range (an LR raised slowly, a warm-up that goes too far) or a recurrent layer that starts to blow up,
  their growth speeds up for tens of steps before the loss turns: on ``benchmarks/early_warning.py``'s
  families, at the defaults, the warning comes 29-98 steps before an MLP whose LR is raised x1.02 a step
  (SGD) or an LSTM whose LR is raised x1.015 a step (Adam) diverges (seeds 0-4, 10 of 10 runs). The growth
  of an LR warm-up speeds up as well: ``acceleration_after`` samples must cover it (50 steps by default:
  ``benchmarks/early_warning.py``'s warm-ups are 30-50 steps; set it past yours). After a rollback the
  Guard calls :meth:`Precursor.weights_replaced`: the restored weights' norm is not compared with the last
  sample's (a rollback is no growth).

* **gradient-norm climb** (every step, a few scalar kernels on the norm the step has already):

      e_t = alpha * e_{t-1} + (1 - alpha) * log ||g_t||         smoothed log-norm (finite norms only)
      f_t = min(e_t, f_{t-1} + rate)                           its floor, which may rise by ``rate`` per step
      warn_t = e_t - f_t > log(ratio)                          (after ``warmup_steps`` steps)

  The floor starts at the first smoothed value after the warm-up. Because it can rise by ``rate`` per step
  (``log 2 / 200`` by default: a doubling per 200 steps), a slow drift of the norm over a long run is
  absorbed, while a climb by ``ratio`` within a few tens of steps is not. It comes later (a median of ~30
  steps before a divergence on the lab's sweep) and catches a run that turns unstable later in training.
  A step whose norm is NaN/Inf is not learned (the Guard's ``nonfinite_grad`` event covers it).

:meth:`Precursor.update` returns a 0-d bool tensor that is True at the first step of each climb past a
threshold, of any signal (one warning per climb; :attr:`Precursor.above` holds whether a signal is above
it now); :attr:`Precursor.first` holds the first step above it (-1: none), also on the device. Read them
when the history is flushed. The Guard runs one in its detector: event kind ``precursor``, response
``"log"`` by default; it passes the weight norm on the steps :meth:`Precursor.wants_weights` names. The event
says which signal fired (``signal``: ``"weight_growth"``, ``"weight_acceleration"`` or ``"grad_climb"``, from
:class:`PrecursorVerdict`), how far (``factor``), the layer whose gradient is furthest above its own average, and what to do (``advice``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard.stats import per_tensor_norms

__all__ = ["GRAD_CLIMB", "SIGNAL_NAMES", "WEIGHT_ACCELERATION", "WEIGHT_GROWTH", "Precursor", "PrecursorStep", "PrecursorTensors", "PrecursorVerdict",
           "precursor_step", "weight_norm"]

#: The signals, as the codes of :attr:`PrecursorVerdict.signal` (0: none is above its threshold).
GRAD_CLIMB, WEIGHT_GROWTH, WEIGHT_ACCELERATION = 1, 2, 3
SIGNAL_NAMES = {GRAD_CLIMB: "grad_climb", WEIGHT_GROWTH: "weight_growth", WEIGHT_ACCELERATION: "weight_acceleration"}


def weight_norm(params: Iterable[Tensor]) -> Tensor:
    """The global L2 norm of ``params`` (0-d float32 tensor, on the first one's device): one fused pass
    (``torch._foreach_norm`` per device and dtype, as ``grad_stats`` over the gradients), no host read."""
    tensors = [p.detach() for p in params]
    if not tensors:
        raise ValueError("weight_norm: params is empty")
    device = tensors[0].device
    norms = torch.stack([n.float().to(device) for n in per_tensor_norms(tensors, 2.0)])
    return torch.linalg.vector_norm(norms)


class PrecursorTensors(NamedTuple):
    """A :class:`Precursor`'s state on the device (0-d tensors)."""

    smoothed: Tensor  # e_t, float32
    floor: Tensor  # f_t, float32 (inf until the warm-up ends)
    above: Tensor  # bool: a signal is above its threshold now
    first: Tensor  # int64: the first step above a threshold (-1: none)
    step: Tensor  # int64: updates so far
    log_weight: Tensor  # float32: log ||W|| at the last sample (NaN: none yet)
    weight_above: Tensor  # bool: the last sample grew past weight_ratio
    samples: Tensor  # int64: weight-norm samples so far
    growth_floor: Tensor  # float32: m_k, the slowest growth per sample since the warm-up (inf until set)
    accelerating: Tensor  # bool: the last sample's growth was past its floor by more than acceleration

    @classmethod
    def start(cls, device: torch.device) -> PrecursorTensors:
        def full(value: float | bool | int, dtype: torch.dtype) -> Tensor:
            return torch.full((), value, dtype=dtype, device=device)

        return cls(smoothed=full(0.0, torch.float32), floor=full(math.inf, torch.float32),
                   above=full(False, torch.bool), first=full(-1, torch.int64), step=full(0, torch.int64),
                   log_weight=full(math.nan, torch.float32), weight_above=full(False, torch.bool),
                   samples=full(0, torch.int64), growth_floor=full(math.inf, torch.float32),
                   accelerating=full(False, torch.bool))


class PrecursorVerdict(NamedTuple):
    """What one update says (0-d device tensors): whether a signal has just climbed past its threshold, which one,
    and how far."""

    raised: Tensor  # bool: a signal has just climbed past its threshold (the first step of a climb)
    signal: Tensor  # int64: WEIGHT_GROWTH when the weight growth is above its threshold, else WEIGHT_ACCELERATION
    #                 when the acceleration is, else GRAD_CLIMB when the gradient-norm climb is, else 0 (the weight
    #                 signals first: they come earlier and are rarer)
    factor: Tensor  # float32: that signal's factor: the weights' growth since the previous sample, their growth per
    #                 sample over its slowest, or the smoothed gradient norm over its floor (1: none)


@dataclass(frozen=True)
class PrecursorStep:
    """What one update does, fixed on the host: the constants and the kind of step."""

    alpha: float
    rate: float
    log_ratio: float
    log_weight_ratio: float | None  # None: no weight-growth signal
    acceleration: float | None  # None: no weight-acceleration signal
    acceleration_after: int  # samples before the growth's floor is set
    first_update: bool  # the first update: e_0 is the first norm
    warm: bool  # past the warm-up: the gradient-norm floor is set and can warn
    sampled: bool  # the weight norm is given at this step


def precursor_step(s: PrecursorTensors, log_norm: Tensor, finite: Tensor, weight_norm: Tensor | None,
                   config: PrecursorStep) -> tuple[PrecursorTensors, PrecursorVerdict]:
    """One update of the signals (the module docstring's formulas), a pure function of device tensors: the
    new state, and the verdict (``raised``: a signal has just climbed past its threshold; which one, how far)."""
    log_norm = log_norm.float().reshape(())
    if config.first_update:
        smoothed = torch.where(finite, log_norm, 0.0)
    else:
        smoothed = torch.where(finite, torch.lerp(s.smoothed, log_norm, 1.0 - config.alpha), s.smoothed)
    floor, above, log_weight, weight_above = s.floor, None, s.log_weight, s.weight_above
    samples, growth_floor, accelerating = s.samples, s.growth_floor, s.accelerating
    zero = torch.zeros((), dtype=torch.float32, device=log_norm.device)
    climb, grad_above, growth, faster = zero, torch.zeros_like(s.above), zero, zero
    if config.warm:
        floor = torch.minimum(smoothed, s.floor + config.rate)
        climb = smoothed - floor
        grad_above = climb > config.log_ratio
        above = grad_above
    weighs = config.log_weight_ratio is not None or config.acceleration is not None
    if weighs and config.sampled and weight_norm is not None:
        log_weight = weight_norm.detach().float().reshape(()).to(log_norm.device).log()
        growth = log_weight - s.log_weight
        samples = s.samples + 1
        # NaN before the first sample, and a NaN/Inf norm, compare False: the nonfinite events cover it
        if config.log_weight_ratio is not None:
            weight_above = growth > config.log_weight_ratio
        if config.acceleration is not None:
            # the floor is set from the first sample past the warm-up (a device count: no config change, no
            # recompile); fmin: a NaN growth keeps the floor
            armed = samples > config.acceleration_after
            rising = torch.fmin(growth, s.growth_floor + config.acceleration / 10)
            growth_floor = torch.where(armed & torch.isfinite(growth), rising, s.growth_floor)
            faster = growth - growth_floor
            accelerating = armed & (faster > config.acceleration)
    if config.log_weight_ratio is not None:
        above = weight_above if above is None else above | weight_above
    if config.acceleration is not None:
        above = accelerating if above is None else above | accelerating
    if above is None:  # nothing can warn yet
        raised, above, first = torch.zeros_like(s.above), s.above, s.first
    else:
        raised = above & ~s.above
        first = torch.where(above & (s.first < 0), s.step, s.first)
    # which signal, for the event
    # (weight_above and accelerating only turn on at a sample, so growth and faster are that sample's)
    signal = torch.where(weight_above, WEIGHT_GROWTH,
                         torch.where(accelerating, WEIGHT_ACCELERATION, torch.where(grad_above, GRAD_CLIMB, 0)))
    factor = torch.where(weight_above, growth,
                         torch.where(accelerating, faster, torch.where(grad_above, climb, zero))).exp()
    state = PrecursorTensors(smoothed=smoothed, floor=floor, above=above, first=first, step=s.step + 1,
                             log_weight=log_weight, weight_above=weight_above, samples=samples,
                             growth_floor=growth_floor, accelerating=accelerating)
    return state, PrecursorVerdict(raised=raised, signal=signal, factor=factor)


class Precursor:
    """On-device early-warning signal: the weights grew more than ``weight_ratio`` times between two samples
    ``weight_every`` steps apart, or their growth per sample sped up by more than ``acceleration`` over its slowest,
    or the smoothed log gradient norm is more than ``ratio`` above its floor.

    The defaults were chosen on the lab's transformer sweep (126 runs; the thresholds on seeds 0-1, the
    figures checked on seed 2): every diverging run warned, by the weight growth, at step 10, a median of
    88 steps before it diverged, with 3 false alarms in 111 runs (the Guard's runs at the sweep's highest
    learning rate, which it kept from diverging); the gradient-norm climb alone warned 50 steps ahead for 2
    of 15 (the lab's report gives the figures, for these and other settings). The weight acceleration's defaults
    were chosen on ``benchmarks/early_warning.py``'s seeds 0-1 and checked on its seeds 2-4 (``docs/concepts/
    early-warning.md`` has the table).

    Args:
        ratio: how far above its floor (a factor on the norm) the smoothed gradient norm must climb (> 1).
        alpha: smoothing of the log-norm, in [0, 1) (0.9: about 10 steps).
        warmup_steps: steps before the gradient-norm floor is set and it can warn (the first steps of
            training move the norm by orders of magnitude on their own).
        rate: how fast the floor may rise, in log-norm per step (>= 0).
        weight_ratio: growth factor of the weight norm between two samples that warns (> 1); ``None``
            turns the weight signal off.
        weight_every: steps between two samples of the weight norm (>= 1; the first at step 0).
        acceleration: how much faster (in log of the weight norm per sample, > 0: 0.03 is 3% more growth per
            sample) the weights must grow than at their slowest to warn; ``None`` turns the signal off.
        acceleration_after: weight samples before the slowest growth is set and it can warn (>= 1): past the
            LR warm-up, whose growth speeds up on its own.

    Example::

        precursor = gg.precursor.Precursor()
        for step, batch in enumerate(data):
            loss = loss_fn(model(batch.x), batch.y); loss.backward()
            weights = gg.precursor.weight_norm(model.parameters()) if precursor.wants_weights() else None
            raised = precursor.update(gg.grad_stats(model).total_norm, weights)   # 0-d bool, on the device
            optimizer.step(); optimizer.zero_grad()
        precursor.first_warning()    # the first step flagged, or None (one host read)
    """

    def __init__(self, ratio: float = 4.0, alpha: float = 0.9, warmup_steps: int = 20,
                 rate: float = math.log(2.0) / 200, weight_ratio: float | None = 2.5, weight_every: int = 10,
                 acceleration: float | None = 0.03, acceleration_after: int = 5):
        if not ratio > 1.0:
            raise ValueError(f"Precursor: ratio must be > 1, got {ratio}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"Precursor: alpha must be in [0, 1), got {alpha}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"Precursor: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if not rate >= 0.0:
            raise ValueError(f"Precursor: rate must be >= 0, got {rate}")
        if weight_ratio is not None and not weight_ratio > 1.0:
            raise ValueError(f"Precursor: weight_ratio must be > 1 or None, got {weight_ratio}")
        if not isinstance(weight_every, int) or isinstance(weight_every, bool) or weight_every < 1:
            raise ValueError(f"Precursor: weight_every must be an int >= 1, got {weight_every!r}")
        if acceleration is not None and not (acceleration > 0.0 and math.isfinite(acceleration)):
            raise ValueError(f"Precursor: acceleration must be a finite number > 0 or None, got {acceleration}")
        if not isinstance(acceleration_after, int) or isinstance(acceleration_after, bool) or acceleration_after < 1:
            raise ValueError(f"Precursor: acceleration_after must be an int >= 1, got {acceleration_after!r}")
        self.ratio = float(ratio)
        self.alpha = float(alpha)
        self.warmup_steps = warmup_steps
        self.rate = float(rate)
        self.weight_ratio = None if weight_ratio is None else float(weight_ratio)
        self.weight_every = weight_every
        self.acceleration = None if acceleration is None else float(acceleration)
        self.acceleration_after = acceleration_after
        self.steps = 0  # host counter of updates: deciding on it costs no sync
        self.state: PrecursorTensors | None = None  # on the device, from the first update
        self._configs: dict[tuple[bool, bool, bool], PrecursorStep] = {}

    # the state's fields, as attributes (read them when the history is flushed)
    @property
    def smoothed(self) -> Tensor | None:
        return None if self.state is None else self.state.smoothed

    @property
    def floor(self) -> Tensor | None:
        return None if self.state is None else self.state.floor

    @property
    def above(self) -> Tensor | None:
        return None if self.state is None else self.state.above

    @property
    def first(self) -> Tensor | None:
        return None if self.state is None else self.state.first

    def wants_weights(self) -> bool:
        """Whether the next :meth:`update` samples the weight norm (a host counter: no sync)."""
        return self._weighs() and self.steps % self.weight_every == 0

    def _weighs(self) -> bool:
        return self.weight_ratio is not None or self.acceleration is not None

    def update(self, total_norm: Tensor, weight_norm: Tensor | None = None) -> Tensor:
        """Learn one step's total gradient norm (a 0-d tensor) and, on the steps :meth:`wants_weights` names,
        the weight norm (:func:`weight_norm`); return True (0-d bool) when a signal has just climbed past its
        threshold: the first step of a climb."""
        log_norm = total_norm.detach().float().reshape(()).clamp_min(torch.finfo(torch.float32).tiny).log()
        return self.update_log(log_norm, torch.isfinite(log_norm), weight_norm)

    def update_log(self, log_norm: Tensor, finite: Tensor, weight_norm: Tensor | None = None) -> Tensor:
        """:meth:`update` from the log of the norm and whether it is finite (0-d tensors), for a caller that has
        them already."""
        state, config = self.begin(log_norm.device, weight_norm is not None)
        state, verdict = precursor_step(state, log_norm, finite, weight_norm, config)
        self.keep(state)
        return verdict.raised

    def keep(self, state: PrecursorTensors) -> None:
        """Keep the state :func:`precursor_step` returned: one more update."""
        self.state = state
        self.steps += 1

    def begin(self, device: torch.device, sampled: bool) -> tuple[PrecursorTensors, PrecursorStep]:
        """The state and the configuration of the next update (``sampled``: it is given the weight norm); the
        caller runs :func:`precursor_step`, then :meth:`keep` with its state."""
        if self.state is None:
            self.state = PrecursorTensors.start(device)
        key = (self.steps == 0, self.steps >= self.warmup_steps, sampled and self._weighs())
        if key not in self._configs:  # one object per kind of step: a compiled caller sees the same one
            self._configs[key] = PrecursorStep(
                alpha=self.alpha, rate=self.rate, log_ratio=math.log(self.ratio),
                log_weight_ratio=None if self.weight_ratio is None else math.log(self.weight_ratio),
                acceleration=self.acceleration, acceleration_after=self.acceleration_after, first_update=key[0], warm=key[1], sampled=key[2])
        return self.state, self._configs[key]

    def weights_replaced(self) -> None:
        """The weights were replaced (a rollback, a restored state): the next sample does not compare with the last
        one, whose weights are gone (a rollback is no growth; learned, its fall in the norm set the slowest growth
        so low that every later sample was past it, and the warning never came down nor rose again). No host
        read."""
        if self.state is not None:
            self.state = self.state._replace(log_weight=torch.full_like(self.state.log_weight, math.nan))

    def signal(self) -> Tensor | None:
        """``e_t - f_t``, the log of how many times the smoothed norm is above its floor (0-d, device)."""
        if self.state is None or self.steps <= self.warmup_steps:
            return None
        return self.state.smoothed - self.state.floor

    def first_warning(self) -> int | None:
        """The first step flagged, counted from 0 (one host read); None when none was."""
        if self.state is None:
            return None
        first = int(self.state.first)
        return None if first < 0 else first

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "state": None if self.state is None else self.state._asdict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"steps", "state"} - set(state)
        if missing:
            raise ValueError(f"Precursor.load_state_dict: missing {sorted(missing)}")
        fields = state["state"]
        # a state saved before the weight acceleration lacks its three fields: they start afresh
        older = set(PrecursorTensors._fields) - {"samples", "growth_floor", "accelerating"}
        if fields is not None and set(fields) not in (set(PrecursorTensors._fields), older):
            raise ValueError(f"Precursor.load_state_dict: state has {sorted(fields)}, "
                             f"expected {sorted(PrecursorTensors._fields)}")
        self.steps = int(state["steps"])
        if fields is not None and set(fields) == older:
            fresh = PrecursorTensors.start(fields["step"].device)
            fields = {**fields, "samples": fresh.samples, "growth_floor": fresh.growth_floor,
                      "accelerating": fresh.accelerating}
        self.state = None if fields is None else PrecursorTensors(**fields)

"""Update size: how far the optimizer moves the weights, relative to the weights, ``||dW|| / ||W||``, per layer.

With Adam the update is the learning rate times a normalised direction, so the damage of a learning rate that is
too large comes through the size of the step, not through the gradient: an LR multiplied by 100 moves the weights
100 times further at once while the gradient norm, which the detector watches, reacts only after the damage
(the Marin 32B retrospective: spikes of Adam's update size precede the loss and gradient spikes; Levanter clips
the update norm, ``clip_update_norm``). Two signals come from it, both device tensors only (no host read):

* **update jump** (every step, before the optimizer moves anything): the step about to be taken is predicted as
  the learning rate times the update per unit of learning rate measured at the last samples,

      m_k = beta * m_{k-1} + (1 - beta) * log(rho_k / lr_{s_k})      rho_k = ||W_{s+1} - W_s|| / max(||W_s||, eps)
      p_t = m + log lr_t                                              the predicted log update size of step t
      L_t = EMA (alpha) of log lr over steps not flagged              the usual learning rate
      P_t = max(P_{t-1} - forget, L_t)                                the highest usual LR, slowly forgotten
      jump_t = p_t - (m + P_{t-1}) > log(jump)                        against the update at that LR, today

  so the first step of an LR burst is flagged before its update, whatever the gradients do; a flagged step is
  not learned, so the whole burst is flagged, until ``patience`` steps in a row have been: then the new size is
  taken as the loop's will (a deliberate LR raise), learned, and no longer flagged. The reference is the update
  at the highest usual LR ``P``, not at the current one: a warm restart (``CosineAnnealingWarmRestarts``) goes
  back to an LR the run has used before and is not flagged (against ``L``, the end of a cosine cycle to its
  restart is a 4000x jump: 100 skipped steps at each restart), while a burst of the learning rate in force is.
  ``P`` falls by ``forget`` per step (10x in 10,000 steps), so that a restart is recognised after a cycle that
  long. ``P`` is an LR, taken at today's update per unit of LR ``m``: the highest usual *size* kept the early
  steps' larger update per unit LR (Adam's first update is ``lr * sign(g)``: 4-6x later ones on the soak's
  model) for thousands of steps, so a later x50 burst was within 10x of it and taken (the soak's AdamW seed
  30001: 1.13x the clean loss, 1.04x now). It is armed from the first
  prediction on (``warmup_steps=1``: the first sample is step 0, measured at step 1), so a burst at step 2 is
  flagged: the soak's bursts at steps 2-3 cost 2.0-2.6x the clean run's loss with AdamW when it waited 10.
  An LR the run has used before is not a jump, also after the Guard's own LR cuts: a loop's raise that only
  brings the LR back near its old value is taken (judged at the loop's LR, undoing ``Recovery.lr_scale``, the
  soak's random AdamW schedules ended worse: loss/clean p90 1.109 against 1.082, seeds 10000-10019).
* **update size** (on the samples, one step late: the update of step ``s`` is measured before step ``s + 1``'s):
  per layer, the smoothed log ratio ``r_l`` (EMA ``beta`` over samples) warns when it is above ``max_ratio``, or
  more than ``climb`` times above its floor ``f_l = min(r_l, f_l + rate)`` (the precursor's rising floor, see
  ``gradguard.precursor``): an early warning that the learning rate is too large for the weights' scale.

**The floor** ``eps`` is AGC's (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization"; optax's ``adaptive_grad_clip``): ``max(||W_l||, eps)`` lets zero-initialised weights (biases)
move without an infinite ratio.

**What it costs.** On a sampled step (one in ``every``) the weights are copied before the optimizer step (a
transient copy, freed at the next step: no permanent copy of the weights; peak memory + one copy of the
parameters for one step), and at the next step one fused subtraction and two fused norms give the ratios: three
passes over the weights every ``every`` steps. Every step: a few scalar kernels (the prediction), and one fill
of the learning rate into a 0-d device tensor (a kernel argument, not a host read).

:func:`update_size_step` is the pure step; :class:`UpdateSize` holds its state and the transient copy
(:meth:`UpdateSize.copy_before_step`, :meth:`UpdateSize.measure`). The Guard runs one in its detector: event kinds
``update_jump`` (response ``"skip"`` by default) and ``update_size`` (``"log"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard.stats import stacked_norms

__all__ = ["UpdateMeasurement", "UpdateSize", "UpdateSizeStep", "UpdateSizeTensors", "UpdateSizeVerdict",
           "log_lr", "update_size_step"]


class UpdateSizeTensors(NamedTuple):
    """An :class:`UpdateSize`'s state on the device."""

    per_lr: Tensor  # 0-d float32: m, the smoothed log of the total update size per unit LR (NaN: none yet)
    level: Tensor  # 0-d float32: L, the EMA of the log learning rate over steps not flagged (NaN: none)
    peak: Tensor  # 0-d float32: P, the highest L, falling by ``forget`` per step (NaN: none)
    learned: Tensor  # 0-d int64: predictions learned into the level
    streak: Tensor  # 0-d int64: steps in a row flagged as a jump
    layer_smoothed: Tensor  # float32 per layer: r_l (NaN: none yet)
    layer_floor: Tensor  # float32 per layer: f_l (inf until set)
    above: Tensor  # 0-d bool: the update-size warning is up (until the next sample)
    first: Tensor  # 0-d int64: the first step it warned (-1: none)
    step: Tensor  # 0-d int64: updates so far

    @classmethod
    def start(cls, layers: int, device: torch.device) -> UpdateSizeTensors:
        def full(value: float | bool | int, dtype: torch.dtype, shape: tuple[int, ...] = ()) -> Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(per_lr=full(math.nan, torch.float32), level=full(math.nan, torch.float32),
                   peak=full(math.nan, torch.float32),
                   learned=full(0, torch.int64), streak=full(0, torch.int64),
                   layer_smoothed=full(math.nan, torch.float32, (layers,)),
                   layer_floor=full(math.inf, torch.float32, (layers,)), above=full(False, torch.bool),
                   first=full(-1, torch.int64), step=full(0, torch.int64))


class UpdateMeasurement(NamedTuple):
    """The update of a sampled step, measured at the next step (device tensors)."""

    layer_ratio: Tensor  # float32 per layer: ||dW_l|| / max(||W_l||, eps)
    total_ratio: Tensor  # 0-d float32: ||dW|| / max(||W||, eps)
    log_lr: Tensor  # 0-d float32: log of the sampled step's learning rate
    stepped: Tensor  # 0-d bool: the sampled step was taken (a skipped step moved nothing: not learned)


class UpdateSizeVerdict(NamedTuple):
    """What one step of :func:`update_size_step` says (device tensors)."""

    jump: Tensor  # 0-d bool: the step about to be taken is ``jump`` times its usual size
    raised: Tensor  # 0-d bool: the update-size warning has just come up
    predicted: Tensor  # 0-d float32: the predicted update size of this step, ||dW|| / ||W|| (NaN: none yet)
    usual: Tensor  # 0-d float32: the size it is compared with, the update at the highest usual LR, exp(m + P)
    layer: Tensor  # 0-d int64: the layer whose measured update size is furthest past its thresholds
    layer_ratio: Tensor  # 0-d float32: that layer's smoothed update size, exp(r_l) (NaN: none yet)


@dataclass(frozen=True)
class UpdateSizeStep:
    """What one update does, fixed on the host: the constants and the kind of step."""

    alpha: float
    beta: float
    log_jump: float
    patience: int
    warmup_steps: int
    forget: float  # P's fall per step, in log
    log_climb: float
    log_max_ratio: float
    rate: float  # the floor's rise per sample (rate per step times ``every``)
    measured: bool  # a measurement is given at this step
    floor_set: bool  # past the warm-up samples: the floors are set and the size can warn


def log_lr(lr: float | Tensor, device: torch.device) -> Tensor:
    """``log lr`` as a 0-d float32 tensor on ``device``: a fill from the host float (no read), or the log of a
    tensor LR on the device; ``-inf`` for a zero LR (an update of size 0 predicts nothing)."""
    if isinstance(lr, Tensor):
        return lr.detach().float().reshape(()).to(device).log()
    return torch.full((), math.log(lr) if lr > 0 else -math.inf, dtype=torch.float32, device=device)


def _ema(old: Tensor, new: Tensor, keep: float, learn: Tensor) -> Tensor:
    """``keep * old + (1 - keep) * new`` where ``learn``, starting from ``new`` where ``old`` is NaN."""
    mixed = torch.where(old == old, torch.lerp(old, new, 1.0 - keep), new)
    return torch.where(learn, mixed, old)


def update_size_step(s: UpdateSizeTensors, log_lr_now: Tensor, measurement: UpdateMeasurement | None,
                     config: UpdateSizeStep) -> tuple[UpdateSizeTensors, UpdateSizeVerdict]:
    """One step of both signals (the module docstring's formulas), a pure function of device tensors: the new
    state and the verdict. ``log_lr_now``: :func:`log_lr` of the step about to be taken."""
    per_lr, smoothed, floor, above, first = s.per_lr, s.layer_smoothed, s.layer_floor, s.above, s.first
    raised = torch.zeros_like(s.above)
    if config.measured and measurement is not None:
        # 1. learn the sampled step's update (taken, finite, > 0: a zero LR or a skipped step teaches nothing)
        log_total = measurement.total_ratio.float().log()
        ok = measurement.stepped & torch.isfinite(log_total)
        per_lr = _ema(per_lr, log_total - measurement.log_lr, config.beta, ok)
        log_layer = measurement.layer_ratio.float().log()
        ok_layer = measurement.stepped & torch.isfinite(log_layer)
        smoothed = _ema(smoothed, log_layer, config.beta, ok_layer)
        if config.floor_set:  # fmin: a layer not measured yet (NaN) keeps its floor
            floor = torch.fmin(smoothed, floor + config.rate)
            # how far each layer is past its thresholds (> 0: past one); NaN (nothing learned) compares False
            past = torch.maximum(smoothed - floor - config.log_climb, smoothed - config.log_max_ratio)
            above = (past > 0).any()
            raised = above & ~s.above
            first = torch.where(above & (s.first < 0), s.step, s.first)
    # 2. the step about to be taken: its predicted size against the usual size at the highest usual LR
    lr_now = log_lr_now.float()
    predicted = per_lr + lr_now
    finite = torch.isfinite(predicted)
    armed = s.learned >= config.warmup_steps
    far = finite & armed & (lr_now - s.peak > config.log_jump)  # NaN (nothing learned) compares False
    jump = far & (s.streak < config.patience)
    accept = far & ~jump  # flagged `patience` steps in a row: the loop means it; the level starts from here
    level = _ema(s.level, lr_now, config.alpha, finite & ~far)
    level = torch.where(accept, lr_now, level)
    # fmax: the first level sets the peak; an accepted size becomes the peak at once (it is the level)
    peak = torch.fmax(s.peak - config.forget, level)
    learned = s.learned + (finite & ~jump).long()
    streak = torch.where(jump, s.streak + 1, torch.zeros_like(s.streak))
    past_any = torch.maximum(smoothed - floor - config.log_climb, smoothed - config.log_max_ratio)
    layer = torch.where(past_any == past_any, past_any, -math.inf).argmax()
    state = UpdateSizeTensors(per_lr=per_lr, level=level, peak=peak, learned=learned, streak=streak, layer_smoothed=smoothed,
                              layer_floor=floor, above=above, first=first, step=s.step + 1)
    verdict = UpdateSizeVerdict(jump=jump, raised=raised, predicted=predicted.exp(), usual=(per_lr + s.peak).exp(),
                                layer=layer, layer_ratio=smoothed.gather(0, layer.reshape(1)).exp().reshape(()))
    return state, verdict


def _ratios(diff_norms: Tensor, weight_norms: Tensor, index: Tensor, layers: int,
            eps: float) -> tuple[Tensor, Tensor]:
    """Per layer and in total: ``||dW|| / max(||W||, eps)``, from per-tensor norms grouped by ``index``."""
    zeros = diff_norms.new_zeros(layers)
    diff = zeros.index_add(0, index, diff_norms.square()).sqrt()
    weight = zeros.index_add(0, index, weight_norms.square()).sqrt()
    total = diff_norms.square().sum().sqrt() / weight_norms.square().sum().sqrt().clamp_min(eps)
    return diff / weight.clamp_min(eps), total


class _Copy(NamedTuple):
    params: list[Tensor]  # the parameters copied, in the order of ``before``
    before: list[Tensor]  # their values before the sampled step
    layer_of: Tensor  # the layer of each, on the device
    layers: int
    log_lr: Tensor  # the sampled step's log LR
    stepped: Tensor | None  # set after the step: whether it was taken


class UpdateSize:
    """The optimizer's step relative to the weights, ``||dW|| / ||W||``: an LR jump flagged at its first step, and an
    early warning when the update size climbs (the module docstring).

    Args:
        every: steps between two measurements of the real update (>= 1): the weights are copied before a sampled
            step and compared at the next one.
        jump: how many times its usual size the predicted step must be to be flagged (> 1).
        alpha: smoothing of the usual size over steps, in [0, 1).
        beta: smoothing of the measured sizes over samples, in [0, 1).
        patience: steps in a row flagged as a jump before the new size is learned (>= 1): longer than any burst to
            ride out (the soak's dense windows hold the LR x100 for 50-70 steps), shorter than a deliberate LR
            raise should wait; a warm restart to an LR the run has used is not flagged at all.
        warmup_steps: predictions learned before a jump can be flagged (>= 1; the first prediction is at step 1).
        forget: how fast the highest usual size is forgotten, in log per step (>= 0; ``log(10) / 10_000``).
        climb: how many times above its floor a layer's smoothed update size must climb to warn (> 1).
        max_ratio: a layer's smoothed update size that warns whatever its floor (> 0; ``inf``: none).
        rate: how fast the floor may rise, in log per step (>= 0).
        warmup_samples: samples before the floors are set and the size can warn (>= 1).
        eps: AGC's floor on ``||W||`` (> 0).

    Example::

        update_size = gg.update_size.UpdateSize()
        for step, batch in enumerate(data):
            loss = loss_fn(model(batch.x), batch.y); loss.backward()
            verdict = update_size.update(optimizer.param_groups[0]["lr"])   # before the step: 0-d device tensors
            update_size.copy_before_step(model.parameters())                # on sampled steps only
            optimizer.step(); optimizer.zero_grad()
            update_size.after_step()
    """

    def __init__(self, every: int = 10, jump: float = 10.0, alpha: float = 0.9, beta: float = 0.5,
                 patience: int = 100, warmup_steps: int = 1, forget: float = math.log(10.0) / 10_000,
                 climb: float = 8.0, max_ratio: float = math.inf, rate: float = math.log(2.0) / 200,
                 warmup_samples: int = 3, eps: float = 1e-3):
        for name, count in (("every", every), ("patience", patience), ("warmup_steps", warmup_steps),
                            ("warmup_samples", warmup_samples)):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"UpdateSize: {name} must be an int >= 1, got {count!r}")
        for name, factor in (("jump", jump), ("climb", climb)):
            if not factor > 1.0:
                raise ValueError(f"UpdateSize: {name} must be > 1, got {factor}")
        for name, smoothing in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= smoothing < 1.0:
                raise ValueError(f"UpdateSize: {name} must be in [0, 1), got {smoothing}")
        if not max_ratio > 0.0:
            raise ValueError(f"UpdateSize: max_ratio must be > 0 (inf: none), got {max_ratio}")
        for name, fall in (("forget", forget), ("rate", rate)):
            if not (fall >= 0.0 and math.isfinite(fall)):
                raise ValueError(f"UpdateSize: {name} must be a finite number >= 0, got {fall}")
        if not (eps > 0.0 and math.isfinite(eps)):
            raise ValueError(f"UpdateSize: eps must be a finite number > 0, got {eps}")
        self.every, self.jump, self.alpha, self.beta = every, float(jump), float(alpha), float(beta)
        self.patience, self.warmup_steps, self.forget, self.climb = patience, warmup_steps, float(forget), float(climb)
        self.max_ratio, self.rate, self.warmup_samples, self.eps = float(max_ratio), float(rate), warmup_samples, \
            float(eps)
        self.steps = 0  # host count of updates
        self.samples = 0  # host count of measurements
        self.state: UpdateSizeTensors | None = None
        self.samples_now = False  # the step begun last is sampled (set by begin)
        self._copy: _Copy | None = None
        self._configs: dict[tuple[bool, bool], UpdateSizeStep] = {}

    # ---------------------------------------------------------------- the transient copy

    def wants_copy(self) -> bool:
        """Whether the step about to be taken is sampled (a host counter: no sync)."""
        return self.steps % self.every == 0

    def copy_before_step(self, params: list[Tensor], index: Tensor, layers: int, log_lr_now: Tensor) -> None:
        """Copy ``params`` (the weights the next optimizer step moves) before it; ``index``: the layer of each (a
        device int64 tensor), of ``layers``. Freed at :meth:`measure` (a transient copy, one step long)."""
        weights = [p.detach() for p in params]
        self._copy = _Copy(params=weights, before=list(torch._foreach_mul(weights, 1.0)) if weights else [],
                           layer_of=index, layers=layers, log_lr=log_lr_now, stepped=None)

    def stepped(self, stepped: Tensor) -> None:
        """Whether the sampled step was taken (a device bool): a skipped step moved nothing."""
        if self._copy is not None:
            self._copy = self._copy._replace(stepped=stepped)

    def drop_copy(self) -> None:
        """Forget the copy (the weights were replaced: a rollback, a restored state)."""
        self._copy = None

    def measure(self) -> UpdateMeasurement | None:
        """The update of the sampled step, from the copy (then freed); None when there is none."""
        copy, self._copy = self._copy, None
        if copy is None or copy.stepped is None or not copy.params:
            return None
        # in place on the copy: dW = W_now - W_before, with no memory beyond the copy itself
        weight_norms = stacked_norms(copy.before, 2.0).float()
        diffs = torch._foreach_sub_(copy.before, copy.params) or copy.before
        diff_norms = stacked_norms(diffs, 2.0).float()
        layer_ratio, total_ratio = _ratios(diff_norms, weight_norms, copy.layer_of, copy.layers, self.eps)
        return UpdateMeasurement(layer_ratio=layer_ratio, total_ratio=total_ratio, log_lr=copy.log_lr,
                                 stepped=copy.stepped.reshape(()))

    # ---------------------------------------------------------------- the step

    def begin(self, layers: int, device: torch.device, measured: bool) -> tuple[UpdateSizeTensors, UpdateSizeStep]:
        """The state and the configuration of the next step (``measured``: a measurement is given); the caller
        runs :func:`update_size_step`, then :meth:`keep` with its state."""
        if self.state is None or self.state.layer_smoothed.shape != (layers,):
            fresh = UpdateSizeTensors.start(layers, device)
            if self.state is not None:  # another set of layers: their sizes start over, the jump's level stays
                fresh = fresh._replace(per_lr=self.state.per_lr, level=self.state.level, peak=self.state.peak,
                                       learned=self.state.learned, streak=self.state.streak, step=self.state.step)
            self.state = fresh
        self.samples_now = self.steps % self.every == 0  # the step begun now is sampled: copy before it
        key = (measured, self.samples >= self.warmup_samples)
        if key not in self._configs:  # one object per kind of step: a compiled caller sees the same one
            self._configs[key] = UpdateSizeStep(
                alpha=self.alpha, beta=self.beta, log_jump=math.log(self.jump), patience=self.patience,
                warmup_steps=self.warmup_steps, forget=self.forget, log_climb=math.log(self.climb),
                log_max_ratio=math.log(self.max_ratio) if math.isfinite(self.max_ratio) else math.inf,
                rate=self.rate * self.every, measured=key[0], floor_set=key[1])
        return self.state, self._configs[key]

    def keep(self, state: UpdateSizeTensors, config: UpdateSizeStep) -> None:
        """Keep the state :func:`update_size_step` returned: one more step."""
        self.state = state
        self.steps += 1
        self.samples += int(config.measured)

    def update(self, lr: float | Tensor, layers: int = 1, device: torch.device | None = None) -> UpdateSizeVerdict:
        """One step for a caller without a Guard: measure the last sample's update if there is one, then judge the
        step about to be taken at learning rate ``lr``. Call :meth:`copy_before_step` (on the steps
        :meth:`wants_copy` names) and :meth:`stepped` around the optimizer step."""
        measurement = self.measure()
        if device is None:
            device = measurement.total_ratio.device if measurement is not None else (
                self.state.level.device if self.state is not None else torch.device("cpu"))
        if measurement is not None:
            layers = measurement.layer_ratio.numel()
        state, config = self.begin(layers, device, measurement is not None)
        state, verdict = update_size_step(state, log_lr(lr, device), measurement, config)
        self.keep(state, config)
        return verdict

    def first_warning(self) -> int | None:
        """The first step the update size warned, counted from 0 (one host read); None when it did not."""
        if self.state is None:
            return None
        first = int(self.state.first)
        return None if first < 0 else first

    def state_dict(self) -> dict[str, Any]:
        """The state (the transient copy is not kept: the first step after a restore measures nothing)."""
        return {"steps": self.steps, "samples": self.samples, "reference": "log_lr",
                "state": None if self.state is None else self.state._asdict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"steps", "samples", "state"} - set(state)
        if missing:
            raise ValueError(f"UpdateSize.load_state_dict: missing {sorted(missing)}")
        fields = state["state"]
        if fields is not None and "peak" not in fields and "level" in fields:  # saved before the peak: from L
            fields = {**fields, "peak": fields["level"]}
        if fields is not None and set(fields) != set(UpdateSizeTensors._fields):
            raise ValueError(f"UpdateSize.load_state_dict: state has {sorted(fields)}, "
                             f"expected {sorted(UpdateSizeTensors._fields)}")
        if fields is not None and state.get("reference") != "log_lr":  # saved with L, P as log sizes: m + log lr
            per_lr = fields["per_lr"]
            fields = {**fields, **{key: torch.where(per_lr == per_lr, fields[key] - per_lr, fields[key])
                                   for key in ("level", "peak")}}
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        self.state = None if fields is None else UpdateSizeTensors(**{k: v.clone() for k, v in fields.items()})
        self._copy = None

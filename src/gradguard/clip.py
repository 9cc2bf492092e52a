"""Gradient clipping strategies: one small class per strategy, its paper and formula in the docstring.

Every clipper is called the same way, after ``loss.backward()``::

    result = clipper(model)               # or clipper(params), or clipper(model, stats=gg.grad_stats(model))
    result.total_norm, result.coef, result.clipped

It clips ``.grad`` in place and returns device tensors: no ``.item()``, no Python ``if`` on a tensor.
Decisions are made with ``torch.where`` and the gradients are multiplied unconditionally (by 1.0 when
nothing is clipped), the same trade torch's ``clip_grad_norm_`` makes to avoid a host sync.

Non-finite gradients: a clipper never spreads a NaN or Inf of one layer into the others (torch's
``clip_grad_norm_`` would multiply every gradient by NaN or 0). When the norm is not finite the coefficient
is 1.0, ``stats.finite`` says so, and the stateful strategies leave their history untouched; deciding
what to do with the step (skip it) is the Guard's job.

The strategies that scale all gradients by one number (:class:`GlobalNorm`, :class:`AutoClip`,
:class:`ZClip`) are :class:`ScaleClipper` s: their ``coefficient(stats)`` can be folded into a fused
optimizer's ``grad_scale`` so that clipping costs no pass over the gradients.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support

from gradguard.stats import (
    GradStats,
    ParamsLike,
    accumulate_dtype,
    check_norm_type,
    grad_stats,
    group_by_device_and_dtype,
    named_parameters_of,
    norm_dtype,
    per_tensor_norms,
)

__all__ = [
    "AGC",
    "ArmedAutoClip",
    "AutoClip",
    "ClipResult",
    "Clipper",
    "GlobalNorm",
    "LayerNorm",
    "ScaleClipper",
    "Value",
    "ZClip",
    "default_clip",
    "scale_grads_",
]

# The same guard against division by zero as torch.nn.utils.clip_grad_norm_.
_NORM_EPS = 1e-6


@dataclass
class ClipResult:
    """What a clipper did, as device tensors.

    Attributes:
        total_norm: 0-d, the gradients' total norm before clipping.
        coef: 0-d, the factor applied (1.0 = not clipped). Strategies that clip per layer, per unit or
            per element report the smallest factor they applied.
        clipped: 0-d bool, whether any gradient was changed.
    """

    total_norm: Tensor
    coef: Tensor
    clipped: Tensor


def _positive(value: float, name: str, owner: str) -> float:
    value = float(value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value}")
    return value


def _in_open_unit_interval(value: float, name: str, owner: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{owner}: {name} must be in (0, 1), got {value}")
    return value


def scale_grads_(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply every gradient by the 0-d tensor ``coef``, one foreach call per (device, dtype)."""
    dense = [g for g in grads if not g.is_sparse]
    for g in grads:
        if g.is_sparse:
            g.mul_(coef.to(g.device))
    for (device, _), (group, _) in group_by_device_and_dtype(dense).items():
        if _has_foreach_support(group, device):
            torch._foreach_mul_(group, coef.to(device))
        else:
            for g in group:
                g.mul_(coef.to(device))


def _norm_clip_coef(total_norm: Tensor, max_norm: Tensor | float) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))``, exactly as ``clip_grad_norm_`` computes it."""
    return torch.clamp(max_norm / (total_norm + _NORM_EPS), max=1.0)


class Clipper(abc.ABC):
    """Base class: measure the gradients (unless ``stats`` is given), decide, clip in place."""

    #: the ``p`` of the norms this strategy decides on; given ``stats`` must use the same.
    norm_type: float = 2.0

    def __call__(self, params: ParamsLike, stats: GradStats | None = None) -> ClipResult:
        if stats is None:
            stats = grad_stats(named_parameters_of(params), groups="module", norm_type=self.norm_type)
        elif stats.norm_type != self.norm_type:
            raise ValueError(
                f"{type(self).__name__}: stats were measured with norm_type={stats.norm_type}, "
                f"this clipper decides on norm_type={self.norm_type}"
            )
        return self.clip_(stats)

    @abc.abstractmethod
    def clip_(self, stats: GradStats) -> ClipResult:
        """Clip the gradients of ``stats.params`` in place, from the norms in ``stats``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ScaleClipper(Clipper):
    """A strategy whose decision is one coefficient for all gradients: ``g <- coef * g``."""

    @abc.abstractmethod
    def coefficient(self, stats: GradStats) -> Tensor:
        """The 0-d clip coefficient for this step (1.0 = none), in the dtype of ``stats.total_norm``
        (float32, or float64 for float64 gradients); advances the strategy's state.

        It is 1.0 when ``stats.finite`` is False, and the state does not learn from a non-finite norm.
        """

    def clip_(self, stats: GradStats) -> ClipResult:
        coef = self.coefficient(stats)
        scale_grads_(stats.grads, coef)
        return ClipResult(stats.total_norm, coef, coef < 1.0)

    def forget_last(self, skipped: Tensor) -> None:
        """Undo what the last :meth:`coefficient` call learned where ``skipped`` (0-d bool device tensor) is True:
        the Guard calls it after deciding, so that a step it skipped (a loss spike: the weights were bad; a
        non-finite gradient) does not teach the strategy the norms of bad weights. No host read. The default
        learns nothing to undo."""
        del skipped


class GlobalNorm(ScaleClipper):
    """Scale all gradients so that their total norm is at most ``max_norm`` (Pascanu et al. 2013).

    ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` -- the rule of ``torch.nn.utils.clip_grad_norm_``,
    bit for bit on finite float32, float64 and complex gradients (half precision: see ``per_tensor_norms``).
    Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", ICML 2013,
    Algorithm 1.
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        self.max_norm = _positive(max_norm, "max_norm", "GlobalNorm")
        self.norm_type = check_norm_type(norm_type, "GlobalNorm")

    def coefficient(self, stats: GradStats) -> Tensor:
        coef = _norm_clip_coef(stats.total_norm, self.max_norm)
        return torch.where(stats.finite, coef, torch.ones_like(coef))


class Value(Clipper):
    """Clamp every gradient element to ``[-clip_value, clip_value]``, as ``clip_grad_value_`` does.

    ``coef`` reports ``min(1, clip_value / max|g|)``: how much the largest element was shrunk. NaN stays
    NaN; an Inf element is clamped, but ``stats.finite`` (measured before clamping) still reports it.
    A complex gradient (which ``clip_grad_value_`` refuses) has its real and imaginary parts clamped, as
    the two real numbers torch's optimizers update (``torch.view_as_real``).
    """

    def __init__(self, clip_value: float = 0.5):
        self.clip_value = _positive(clip_value, "clip_value", "Value")

    def clip_(self, stats: GradStats) -> ClipResult:
        grads = [torch.view_as_real(g) if g.is_complex() else g for g in stats.grads]
        if not grads:
            one = torch.ones((), dtype=torch.float32)
            return ClipResult(stats.total_norm, one, one < 1.0)
        device = grads[0].device
        max_abs = torch.stack([n.to(device) for n in per_tensor_norms(grads, math.inf)]).max()
        for (device_, _), (group, _) in group_by_device_and_dtype(grads).items():
            if _has_foreach_support(group, device_):
                torch._foreach_clamp_min_(group, -self.clip_value)
                torch._foreach_clamp_max_(group, self.clip_value)
            else:
                for g in group:
                    g.clamp_(min=-self.clip_value, max=self.clip_value)
        coef = torch.clamp(self.clip_value / max_abs, max=1.0)
        coef = torch.where(torch.isnan(coef), torch.ones_like(coef), coef)
        return ClipResult(stats.total_norm, coef, max_abs > self.clip_value)


class LayerNorm(Clipper):
    """Cap each layer's gradient norm separately: ``g_l <- g_l * min(1, max_norm / (||g_l|| + 1e-6))``.

    A layer is a group of ``stats`` (by default, the module owning the parameters). Unlike a global
    norm, one exploding layer is scaled down without shrinking the updates of the healthy ones.
    A layer whose norm is not finite is left as it is (and ``stats.finite`` is False).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        self.max_norm = _positive(max_norm, "max_norm", "LayerNorm")
        self.norm_type = check_norm_type(norm_type, "LayerNorm")

    def clip_(self, stats: GradStats) -> ClipResult:
        if not stats.params:
            one = torch.ones((), dtype=torch.float32)
            return ClipResult(stats.total_norm, one, one < 1.0)
        layer_coef = _norm_clip_coef(stats.norms, self.max_norm)
        layer_coef = torch.where(torch.isfinite(stats.norms), layer_coef, torch.ones_like(layer_coef))
        for grad, group in zip(stats.grads, stats.group_index):
            grad.mul_(layer_coef[group].to(grad.device))
        coef = layer_coef.min()
        return ClipResult(stats.total_norm, coef, coef < 1.0)


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit: over all dims but the first; over everything for vectors and scalars.

    PyTorch lays weights out as (out, in, ...), so a unit is a row of a Linear or an output channel of a
    conv (Brock et al. 2021, section 4.1; timm's ``unitwise_norm``). Real-valued, in the precision of
    ``grad_stats`` (float32 accumulation for half precision, float64 for float64 and complex128).
    """
    dims = None if x.ndim <= 1 else tuple(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=x.ndim > 1, dtype=accumulate_dtype(x.dtype))
    return norm.to(norm_dtype(x.dtype))


class AGC(Clipper):
    """Adaptive Gradient Clipping, unit-wise (Brock, De, Smith & Simonyan 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization", eq. 3).

    For each unit ``i`` of a weight ``W`` with gradient ``G``::

        G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i    if ||G_i|| / max(||W_i||, eps) > lambda
               G_i                                            otherwise

    Args:
        clipping: ``lambda``, the largest gradient-to-weight norm ratio allowed per unit.
        eps: floor on the weight norm, so that zero-initialised units can still move.
        exclude: layers to leave unclipped, by module name or parameter name prefix. The paper does not
            clip the final classifier (e.g. ``exclude=("fc",)``).
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: tuple[str, ...] | list[str] = ()):
        self.clipping = _positive(clipping, "clipping", "AGC")
        self.eps = _positive(eps, "eps", "AGC")
        if isinstance(exclude, str):
            raise ValueError(f"AGC: exclude must be a tuple of names, got the string {exclude!r}")
        self.exclude = tuple(exclude)

    def _excluded(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.exclude)

    def clip_(self, stats: GradStats) -> ClipResult:
        coefs = []
        for name, param in zip(stats.param_names, stats.params):
            if self._excluded(name):
                continue
            grad = param.grad
            assert grad is not None
            max_norm = unitwise_norm(param.detach()).clamp(min=self.eps) * self.clipping
            grad_norm = unitwise_norm(grad)
            scale = max_norm / grad_norm.clamp(min=_NORM_EPS)
            keep = (grad_norm <= max_norm) | ~torch.isfinite(grad_norm)
            scale = torch.where(keep, torch.ones_like(scale), scale)
            grad.mul_(scale.to(grad.dtype))
            coefs.append(scale.min())
        if not coefs:
            one = torch.ones((), dtype=torch.float32)
            return ClipResult(stats.total_norm, one, one < 1.0)
        coef = torch.stack([c.to(coefs[0].device) for c in coefs]).min()
        return ClipResult(stats.total_norm, coef, coef < 1.0)


class AutoClip(ScaleClipper):
    """AutoClip: clip to a percentile of the gradient norms seen so far (Seetharaman, Wichern, Pardo &
    Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks").

    Each step appends the current total norm ``||g_t||`` to the history ``h``, then clips globally with
    ``threshold_t = percentile(h, p)`` (linear interpolation, as ``numpy.percentile``)::

        g <- g * min(1, threshold_t / (||g_t|| + 1e-6))

    The paper keeps every norm; here the history is a ring buffer of the last ``history`` norms, stored on
    the gradients' device (bounded memory, no host sync). Non-finite norms are not recorded.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000):
        percentile = float(percentile)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"{type(self).__name__}: percentile must be in [0, 100], got {percentile}")
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise ValueError(f"{type(self).__name__}: history must be an int >= 1, got {history!r}")
        self.percentile = percentile
        self.history = history
        self._norms: Tensor | None = None  # NaN marks an empty slot; nanquantile skips them
        self._count = 0
        self._last_slot: int | None = None  # forget_last's undo

    def forget_last(self, skipped: Tensor) -> None:
        """A skipped step's norm leaves the history (its slot NaN, as an empty one; no host read)."""
        if self._last_slot is None or self._norms is None:
            return
        i, self._last_slot = self._last_slot, None
        self._norms[i] = torch.where(skipped.to(self._norms.device), math.nan, self._norms[i])

    def coefficient(self, stats: GradStats) -> Tensor:
        norm = stats.total_norm
        if self._norms is None or self._norms.device != norm.device:
            self._norms = torch.full((self.history,), math.nan, dtype=norm.dtype, device=norm.device)
        elif self._norms.dtype != norm.dtype:  # float64 gradients appeared: keep their range
            self._norms = self._norms.to(torch.promote_types(self._norms.dtype, norm.dtype))
        self._norms[self._count % self.history] = torch.where(stats.finite, norm, math.nan)
        self._last_slot = self._count % self.history
        self._count += 1
        threshold = torch.nanquantile(self._norms, self.percentile / 100.0)
        coef = _norm_clip_coef(norm, threshold)
        usable = stats.finite & torch.isfinite(threshold)
        return torch.where(usable, coef, torch.ones_like(coef))

    def state_dict(self) -> dict[str, Any]:
        return {"norms": None if self._norms is None else self._norms.clone(), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = state["norms"]
        if norms is not None and norms.shape != (self.history,):
            raise ValueError(
                f"{type(self).__name__}: state holds a history of {tuple(norms.shape)}, "
                f"this clipper keeps ({self.history},)"
            )
        self._norms = None if norms is None else norms.clone()
        self._count = int(state["count"])


class ArmedAutoClip(AutoClip):
    """AutoClip armed by a rough gradient norm in a run's first steps: no clip while the total norm moves
    smoothly from step to step, :class:`AutoClip` from the first step at which it turns rough (within the first
    ``arm_steps``), and from then on.

    The roughness is the root mean square of the log-ratio of successive total norms, an EMA::

        r_t = log(||g_t|| / ||g_{t-1}||) ;  v_t = beta * v_{t-1} + (1 - beta) * r_t^2 ,  v_0 = prior^2
        armed_t = armed_{t-1} or (t < arm_steps and (sqrt(v_t) > roughness or r_t > log(jump)))
        g <- g * min(1, percentile(h, p) / (||g_t|| + 1e-6))   when armed_t, else g unchanged

    Why this separates the runs a clip must hold from those it only slows down: with a learning rate inside
    the loss's stability limit (about 2 / the sharpest curvature), successive minibatch gradients differ by
    sampling noise, and the norm changes by a modest fraction each step. With steps too large for the
    curvature -- the cliffs of an RNN whose gradients explode through time (Pascanu, Mikolov & Bengio
    2013), or a learning rate beyond the edge of stability (Cohen, Kaur, Li, Kolter & Talwalkar 2021) -- the
    iterate bounces across the sharp directions and the norm jumps by large factors from one step to the
    next, also while its level stays steady. That shows in the first steps of a run whose learning rate is too
    large (the exploding language models of :func:`default_clip` armed within their first 50). Later, the norm
    turns rough for another reason: once most samples are fit, a small batch's gradient comes from its few hard
    samples, and the norm moves several-fold between batches; and one jump is a cliff, which the Guard's
    detector clips as a spike. So the clip arms only within the first ``arm_steps``. Once armed, it stays
    armed: once the clip holds the run, its norms are smooth because of the clip, not because the steps
    became safe (under a 25th-percentile clip the tanh RNN's norms crossed 0.5 at steps 21-56, unclipped at
    steps 11-21). The
    AutoClip history records every step from the first, armed or not, so the percentile is that of the
    whole run. Non-finite or zero norms do not change ``v`` (a NaN step is the Guard's to skip); state stays
    on the gradients' device, so no decision needs a host read. The measurements behind the defaults are
    in :func:`default_clip`.

    Args:
        percentile: :class:`AutoClip`'s percentile, applied once armed.
        history: :class:`AutoClip`'s number of norms kept.
        roughness: the RMS log-ratio above which the clip arms (0.6: a typical step-to-step factor of 1.8;
            healthy language models measured at most 0.56 in their 300 steps).
        beta: the EMA's decay (0.95: about 20 steps of memory).
        prior: the RMS log-ratio the EMA starts from (a healthy run's is about 0.25).
        jump: one step whose norm is more than ``jump`` times the last one arms the clip at that step (the
            first step of a learning rate far too high; a healthy run's largest early jump measured was 5.2x).
        arm_steps: the steps, from the first, within which the clip can arm (50; :func:`default_clip` gives
            the runs behind it). 0: never.
    """

    def __init__(
        self,
        percentile: float = 5.0,
        history: int = 1000,
        roughness: float = 0.6,
        beta: float = 0.95,
        prior: float = 0.25,
        jump: float = 10.0,
        arm_steps: int = 50,
    ):
        super().__init__(percentile, history)
        self.roughness = _positive(roughness, "roughness", "ArmedAutoClip")
        self.beta = _in_open_unit_interval(beta, "beta", "ArmedAutoClip")
        self.prior = _positive(prior, "prior", "ArmedAutoClip")
        self.jump = _positive(jump, "jump", "ArmedAutoClip")
        if self.jump <= 1.0:
            raise ValueError(f"ArmedAutoClip: jump must be > 1, got {self.jump}")
        if not isinstance(arm_steps, int) or isinstance(arm_steps, bool) or arm_steps < 0:
            raise ValueError(f"ArmedAutoClip: arm_steps must be an int >= 0, got {arm_steps!r}")
        self.arm_steps = arm_steps
        self._previous: Tensor | None = None  # the last finite, positive total norm (NaN: none yet)
        self._mean_square: Tensor | None = None
        self._armed: Tensor | None = None

    @property
    def armed(self) -> Tensor | None:
        """0-d bool on the gradients' device: whether the clip has armed (None before the first step)."""
        return self._armed

    def coefficient(self, stats: GradStats) -> Tensor:
        norm = stats.total_norm
        if self._previous is None or self._previous.device != norm.device:
            self._previous = torch.full((), math.nan, dtype=norm.dtype, device=norm.device)
            self._mean_square = torch.full((), self.prior**2, dtype=norm.dtype, device=norm.device)
            self._armed = torch.zeros((), dtype=torch.bool, device=norm.device)
        assert self._mean_square is not None and self._armed is not None
        current = norm.to(self._previous.dtype)
        usable = stats.finite & (current > 0)
        ratio = torch.log(current / self._previous)
        learn = usable & torch.isfinite(ratio)  # no previous norm yet: nothing to compare with
        mean_square = self.beta * self._mean_square + (1 - self.beta) * ratio.square()
        self._mean_square = torch.where(learn, mean_square, self._mean_square)
        self._previous = torch.where(usable, current, self._previous)
        jumped = learn & (ratio > math.log(self.jump))
        if self._count < self.arm_steps:  # AutoClip's host count of the steps before this one: no read
            self._armed = self._armed | (self._mean_square.sqrt() > self.roughness) | jumped
        coef = super().coefficient(stats)  # records the norm in the history, armed or not
        return torch.where(self._armed, coef, torch.ones_like(coef))

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {**super().state_dict(), "previous": copy(self._previous), "mean_square": copy(self._mean_square),
                "armed": copy(self._armed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._previous = None if state["previous"] is None else state["previous"].clone()
        self._mean_square = None if state["mean_square"] is None else state["mean_square"].clone()
        self._armed = None if state["armed"] is None else state["armed"].clone()


class ZClip(ScaleClipper):
    """ZClip: z-score clipping against an EMA of the gradient norm (Kumar, Owen, Roy Chowdhury & Güra 2025,
    "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507); equal to the ``zclip`` package
    step by step when given the same arguments (its default ``max_grad_norm`` is 1.0, this one's None).

    For the first ``warmup_steps`` steps the norms are collected (and the gradients clipped to
    ``max_grad_norm`` when one is given); then ``mu`` and ``sigma^2`` start as their mean and variance. Each
    later step, with ``g_t`` the total norm and ``z_t = (g_t - mu) / (sigma + eps)``:

    * ``mode="zscore"``: a spike is ``z_t > z_thresh``; its threshold is ``mu`` (``clip_option="mean"``)
      or ``(mu + z_thresh * sigma / (z_t / z_thresh)) * clip_factor`` (``"adaptive_scaling"``);
    * ``mode="percentile"``: a spike is ``g_t > mu + z_thresh * sigma``, clipped to that threshold.

    ``c_t`` is the threshold on a spike and ``g_t`` otherwise; the gradients are clipped to ``c_t``, or to
    ``min(c_t, max_grad_norm)`` with a cap (which then clips every step whose norm is above it), and the EMA
    learns ``c_t`` (not on a spike with ``skip_update_on_spike``), the variance around the updated mean::

        mu_t = alpha * mu_{t-1} + (1 - alpha) * c_t ;  sigma_t^2 = alpha * sigma_{t-1}^2 + (1 - alpha) * (c_t - mu_t)^2

    No fixed cap by default, as in the paper, whose rule assumes nothing about the scale of the norms (the
    package added ``max_grad_norm`` with the default None, then made it 1.0). A cap below a run's healthy
    norm clips every step, a smaller learning rate for the whole run. Found on the soak (issue 17.10), whose
    model's healthy norm is above 1 for its first 30-60 steps: with the cap, Guard + ZClip clipped 32 (SGD) and
    71 (AdamW) of 300 steps per run (random family, seeds 10000-10019), and on 20 LR-burst schedules
    (``benchmarks/soak.py --family lr_burst --first-seed 10000 --schedules 20``) its loss ratio's p90 / max
    were 1.057 / 1.23 (SGD) and 1.103 / 2.27 (AdamW) against the Guard alone's 1.034 / 1.09 and 1.101 / 2.05;
    without it, 2-3 clipped steps per run and 1.031 / 1.09 and 1.101 / 2.05. The cap is an opt-in
    (``max_grad_norm=1.0``: the package's behaviour). It is what held a vanilla RNN: the lab's tanh RNN
    (temporal order, quick grid) was solved by 4 of 4 seeds with it and 2 of 4 without; ``gg.Guard``'s
    default clip for such a model is ``AutoClip(percentile=5.0)``.

    State is kept on the gradients' device in float64 (the package keeps Python floats); the step count
    is a Python int, so no decision needs a host read.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_grad_norm: float | None = None,
        eps: float = 1e-6,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ):
        self.alpha = _in_open_unit_interval(alpha, "alpha", "ZClip")
        self.z_thresh = _positive(z_thresh, "z_thresh", "ZClip")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"ZClip: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.max_grad_norm = (
            None if max_grad_norm is None else _positive(max_grad_norm, "max_grad_norm", "ZClip")
        )
        self.eps = _positive(eps, "eps", "ZClip")
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"ZClip: mode must be 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZClip: clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.clip_option = clip_option
        self.clip_factor = _positive(clip_factor, "clip_factor", "ZClip")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._step = 0
        self._warmup: Tensor | None = None
        self._mean: Tensor | None = None
        self._var: Tensor | None = None
        self._before: tuple[int, Tensor | None, Tensor | None] | None = None  # forget_last's undo

    @staticmethod
    def _state_dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    def _clip_to(self, norm: Tensor, limit: Tensor | float | None) -> Tensor:
        """The package's in-place rule: ``limit / (norm + 1e-6)`` when ``norm > limit``, else 1."""
        if limit is None:
            return torch.ones_like(norm)
        return torch.where(norm > limit, limit / (norm + _NORM_EPS), torch.ones_like(norm))

    def coefficient(self, stats: GradStats) -> Tensor:
        device = stats.total_norm.device
        dtype = self._state_dtype(device)
        norm = stats.total_norm.to(dtype)
        self._before = (self._step, self._mean, self._var)
        if self._step == self.warmup_steps:
            self._warmup = None  # kept one step longer: forget_last may clear the warm-up's last norm
        if self._step < self.warmup_steps:
            coef = self._warmup_step(norm, stats.finite)
        else:
            coef = self._adaptive_step(norm, stats.finite)
        self._step += 1
        # float32, or float64 for float64 norms: a coefficient of 1e-100 must not round to 0
        return torch.where(stats.finite, coef, torch.ones_like(coef)).to(stats.total_norm.dtype)

    def _warmup_step(self, norm: Tensor, finite: Tensor) -> Tensor:
        if self._warmup is None:
            self._warmup = torch.full((self.warmup_steps,), math.nan, dtype=norm.dtype, device=norm.device)
        self._warmup[self._step] = torch.where(finite, norm, math.nan)
        if self._step + 1 == self.warmup_steps:
            self._end_warmup()
        if self.max_grad_norm is None:
            return torch.ones_like(norm)
        return _norm_clip_coef(norm, self.max_grad_norm)  # the package calls clip_grad_norm_ here

    def _end_warmup(self) -> None:
        """The moments start as the mean and variance of the finite warm-up norms (NaN: none)."""
        assert self._warmup is not None
        self._mean = torch.nanmean(self._warmup)
        self._var = torch.nanmean((self._warmup - self._mean) ** 2)

    def forget_last(self, skipped: Tensor) -> None:
        """A skipped step's norm leaves no trace: its warm-up slot is cleared (NaN), or the moments go back to
        what they were before it (``torch.where``, no host read). Found on the soak: an LR burst's skipped
        steps at the end of the warm-up (norms 300x the run's) set ``mu`` to 13 and ``sigma`` to 57, and
        Guard + ZClip ended 1e4x above the clean loss where the Guard alone ended at 1.0x."""
        if self._before is None:
            return
        step, mean, var = self._before
        self._before = None
        if step < self.warmup_steps:
            assert self._warmup is not None or self._mean is not None
            warmup = self._warmup
            if warmup is not None:
                warmup[step] = torch.where(skipped.to(warmup.device), math.nan, warmup[step])
                if step + 1 == self.warmup_steps:
                    self._end_warmup()
            return
        assert mean is not None and var is not None and self._mean is not None and self._var is not None
        keep = skipped.to(mean.device)
        self._mean = torch.where(keep, mean, self._mean)
        self._var = torch.where(keep, var, self._var)

    def _adaptive_step(self, norm: Tensor, finite: Tensor) -> Tensor:
        mean, var = self._mean, self._var
        assert mean is not None and var is not None
        # A warm-up of only non-finite norms leaves no statistics: start them from the first finite norm.
        started = torch.isfinite(mean)
        mean = torch.where(started, mean, norm)
        var = torch.where(started, var, torch.zeros_like(var))
        std = var.sqrt()
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = norm > threshold
        else:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                threshold = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                threshold = mean
        clip_value = torch.where(spike, threshold, norm)
        limit = clip_value if self.max_grad_norm is None else torch.clamp(clip_value, max=self.max_grad_norm)
        coef = self._clip_to(norm, limit)

        learn = finite & ~spike if self.skip_update_on_spike else finite
        new_mean = self.alpha * mean + (1 - self.alpha) * clip_value
        new_var = self.alpha * var + (1 - self.alpha) * (clip_value - new_mean) ** 2
        assert self._mean is not None and self._var is not None
        self._mean = torch.where(learn, new_mean, self._mean)
        self._var = torch.where(learn, new_var, self._var)
        return coef

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "step": self._step,
            "warmup": copy(self._warmup),
            "mean": copy(self._mean),
            "var": copy(self._var),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self._warmup = None if state["warmup"] is None else state["warmup"].clone()
        self._mean = None if state["mean"] is None else state["mean"].clone()
        self._var = None if state["var"] is None else state["var"].clone()


#: Modules whose gradients flow through time (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells).
RECURRENT_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.RNNBase, torch.nn.RNNCellBase)
#: The vanilla (tanh or ReLU) recurrences, whose gradient through time is a product of ``W_hh`` Jacobians.
VANILLA_RECURRENT_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.RNN, torch.nn.RNNCell)


def default_clip(model: torch.nn.Module) -> Clipper | None:
    """The Guard's clip strategy when none is given: ``AutoClip(percentile=5.0)`` for a model with a vanilla
    recurrence (``nn.RNN``, ``nn.RNNCell``), :class:`ArmedAutoClip` (the same AutoClip from the first step at
    which the gradient norm turns rough) for one with gated recurrent layers only (``nn.LSTM``, ``nn.GRU``
    and their cells), None (the Guard's detector alone: spikes clipped to its threshold) otherwise.

    Why, measured (2-core CPU, shared). A vanilla RNN's gradient through time is a product of
    ``diag(tanh') W_hh`` (Pascanu, Mikolov & Bengio 2013): the lab's ``recurrence`` scenario (tanh RNN,
    spectral radius 1.5) solves the temporal order problem only when every update stays near its typical
    size from the first step -- a global clip at its early norm level solved the quick grid 4/4, at 3x that
    level 0/4; AutoClip at the 5th percentile of the norms seen so far solved 4/4 quick and 8/8 full (at the
    10th, the paper's default, 4/4 and 7/8; at the 25th 4/4 quick, at the median 2/4; a clip at 1 or 1.5
    times the median of the last 100 norms 1/4). Clipped only once its norms turned rough, the same RNN
    solved the quick grid 4/4 (armed at steps 11-21) but ``gradguard demo``'s not in its 300 steps (232 of
    its steps clipped: armed near step 68): a vanilla recurrence keeps the clip from the first step.

    Gated recurrences carry their gradient through time additively (the LSTM's cell, Hochreiter &
    Schmidhuber 1997; the GRU's update gate, Cho et al. 2014) and explode when the step is too large for the
    loss, not by construction. There the 5th-percentile clip is a smaller learning rate for the whole run:
    on healthy character-level language models of Python source (``benchmarks/recurrent_defaults.py``: 256
    units, 300 steps) it clipped 90-95% of the steps and cost +2-5% test loss with SGD lr 1 (issue 24). What
    separates the runs a clip must hold is how the norm moves from step to step, not its level. The RMS
    log-ratio of successive norms (the EMA of :class:`ArmedAutoClip`, unclipped runs) reached at most
    0.32-0.52 on the healthy LSTM and GRU runs with SGD lr 1 (18 runs: seeds 0-2, 10-12, 20-22) and
    0.40-0.56 with Adam 2e-3 (12 runs; their largest single jump 5.2x, in Adam's first 10 steps); SGD at lr
    30, which explodes, jumps 13.7-24x at its first step; the lab's LSTM on the temporal order problem (SGD
    lr 0.5, momentum 0.9) crosses 0.6 at steps 22-26, the tanh RNN above reaches 0.82-0.96. The threshold
    was 0.5 at first, read off seeds 0-2: it armed on one healthy GRU run of seeds 10-12 (its SGD norms
    oscillate 2-3x for a few steps early on; +4.0% test loss). At 0.75 it armed on no healthy run but armed
    the temporal-order LSTM only once that run had gone above chance (71% held-out accuracy after 400
    steps, against 100% armed at 0.5 or unguarded). At 0.6 the clip arms on none of the 30 healthy runs,
    at step 1 at lr 30 (the jump rule; test loss in ``benchmarks/recurrent_defaults.py``'s table), and at
    steps 22-26 on the temporal-order LSTM, which then learns (still slower than unguarded: the clip is a
    smaller step). Longer healthy runs then armed it late, and the clip held to their end: a GRU classifier of
    digit rows (SGD momentum 0.9, OneCycle to lr 0.1, batches of 32, 1500 steps) at steps 176-621, as its norm
    fell to the noise of a few hard samples; an LSTM language model at SGD lr 1 at step 181, one 10.9x jump;
    an LSTM classifier under AdamW. So the clip arms only within the first ``arm_steps`` (50) steps: on
    ``benchmarks/recurrent_long.py`` the exploding language models (lr 15, 20, 30) arm as before, to the same
    test loss, and the healthy runs are left alone (its table is in ``docs/benchmarks.md``). A
    healthy feed-forward net's gradient norm grows 20x as it leaves its initial plateau, and every clip
    that held the RNN slowed that phase down, so feed-forward models get none.
    """
    modules = list(model.modules())
    if any(isinstance(module, VANILLA_RECURRENT_MODULES) for module in modules):
        return AutoClip(percentile=5.0)
    if any(isinstance(module, RECURRENT_MODULES) for module in modules):
        return ArmedAutoClip()
    return None

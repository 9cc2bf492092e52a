"""Decide: what the Guard does with one step, from that step's measurements, as device tensors.

``decide`` is a pure function (no optimizer, no gradients, no host read)::

    decision = decide(total_norm, finite, verdict, clip_coef, responses, ceiling)
    decision.skip        # 0-d bool: leave the parameters and the optimizer state as they are
    decision.coef        # 0-d float32: the factor for the gradients on a real step (1.0 on a skipped step)
    decision.actions     # int64 per kind of STEP_KINDS: ACTIONS.index(action) + 1 where flagged, else 0

The rules, per kind of event flagged by the detector (``gradguard.detect``) and its configured response:

* ``"skip"``, ``"rollback"``, ``"raise"``: the step is skipped (a rollback or a raise follows on the host);
* ``"clip"``: the gradients are scaled so that the total norm is at most the detector's threshold for the
  kind (the spike threshold for ``grad_spike`` and ``loss_spike``, the norm's moving level for ``growth``);
* ``"log"``: nothing but the record.

The coefficient is the least of the clip strategy's (``clip_coef``) and those limits,
``min(1, limit / (||g|| + 1e-6))`` as ``clip_grad_norm_`` computes it. One action per step: a skip wins
over a clip, so a skipped step has ``coef == 1`` and each of its events the action ``"skip"`` where its
response was ``"clip"`` (what was done, not what would have been).

Every input is a device tensor that is equal on every rank in a distributed run (norms and loss are
all-reduced before the detector sees them), so the decision is too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradguard.detect import EVENT_KINDS, STEP_KINDS, Verdict

__all__ = ["ACTIONS", "ALLOWED_ACTIONS", "Decision", "Responses", "decide"]

#: What the Guard can do about an event.
ACTIONS = ("log", "clip", "skip", "rollback", "raise")
#: The actions that make sense for each kind of event.
ALLOWED_ACTIONS: dict[str, tuple[str, ...]] = {
    "nonfinite_grad": ("skip", "rollback", "raise"),
    "nonfinite_loss": ("log", "skip", "rollback", "raise"),
    "grad_spike": ("log", "clip", "skip", "rollback", "raise"),
    "loss_spike": ("log", "clip", "skip", "rollback", "raise"),
    "growth": ("log", "clip", "skip", "rollback", "raise"),
    "precursor": ("log", "skip", "rollback", "raise"),
    "update_jump": ("log", "skip", "rollback", "raise"),
    "update_size": ("log", "skip", "rollback", "raise"),
    "nonfinite_param": ("rollback", "raise"),
}
#: The response to each kind when none is given.
DEFAULT_RESPONSES: dict[str, str] = {
    "nonfinite_grad": "skip",
    "nonfinite_loss": "skip",
    "grad_spike": "clip",
    "loss_spike": "skip",
    "growth": "clip",
    "precursor": "log",
    "update_jump": "skip",
    "update_size": "log",
    "nonfinite_param": "rollback",
}
_NORM_EPS = 1e-6  # as clip_grad_norm_
_SKIPPING = ("skip", "rollback", "raise")


@dataclass(frozen=True)
class _ResponseTensors:
    skip_mask: Tensor  # bool per kind: the response skips the step
    clip_mask: Tensor  # bool per kind: the response clips
    growth_mask: Tensor  # bool per kind: the limit is the norm level (growth), else the spike threshold
    stepped: Tensor  # int64 per kind: the action code on a real step
    skipped: Tensor  # int64 per kind: the action code on a skipped step
    inf: Tensor  # float32 per kind: no limit
    ceiling: dict[tuple[float, torch.dtype], Tensor]  # 0-d constants (see Responses.constant)


@dataclass(frozen=True)
class Responses:
    """The action for each kind of event, validated, and the same as small device tensors.

    Build it with :meth:`resolve`; ``responses[kind]`` is the configured action.
    """

    by_kind: Mapping[str, str]
    _tensors: dict[torch.device, _ResponseTensors] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def resolve(
        cls,
        on_nonfinite: str = "skip",
        on_spike: str = "clip",
        on_loss_spike: str = "skip",
        responses: Mapping[str, str] | None = None,
        owner: str = "Guard",
    ) -> Responses:
        """The shorthand options first, then the per-kind overrides; raises ``ValueError`` naming the option."""
        chosen = dict(DEFAULT_RESPONSES)
        chosen.update(nonfinite_grad=on_nonfinite, nonfinite_loss=on_nonfinite, grad_spike=on_spike,
                      loss_spike=on_loss_spike)
        for option, kind in (("on_nonfinite", "nonfinite_grad"), ("on_spike", "grad_spike"),
                             ("on_loss_spike", "loss_spike")):
            if chosen[kind] not in ALLOWED_ACTIONS[kind]:
                raise ValueError(f"{owner}: {option} must be one of {ALLOWED_ACTIONS[kind]}, got {chosen[kind]!r}")
        if responses is not None and not isinstance(responses, Mapping):
            raise ValueError(f"{owner}: responses must be a dict {{kind: action}}, got {type(responses).__name__}")
        for kind, action in (responses or {}).items():
            if kind not in ALLOWED_ACTIONS:
                raise ValueError(f"{owner}: responses has an unknown event kind {kind!r}; kinds are {EVENT_KINDS}")
            if action not in ALLOWED_ACTIONS[kind]:
                raise ValueError(
                    f"{owner}: responses[{kind!r}] must be one of {ALLOWED_ACTIONS[kind]}, got {action!r}"
                )
            chosen[kind] = action
        return cls(chosen)

    def __getitem__(self, kind: str) -> str:
        return self.by_kind[kind]

    def taken(self, kind: str, skipped: bool) -> str:
        """What was done about an event of ``kind`` at a step that was (or was not) skipped."""
        action = self.by_kind[kind]
        return "skip" if skipped and action == "clip" else action

    def clips(self, kind: str) -> bool:
        return self.by_kind[kind] == "clip"

    def tensors(self, device: torch.device) -> _ResponseTensors:
        """The responses as device tensors (made once per device)."""
        if device not in self._tensors:
            actions = [self.by_kind[k] for k in STEP_KINDS]
            stepped = [ACTIONS.index(a) + 1 for a in actions]
            skipped = [ACTIONS.index(self.taken(k, skipped=True)) + 1 for k in STEP_KINDS]
            self._tensors[device] = _ResponseTensors(
                skip_mask=torch.tensor([a in _SKIPPING for a in actions], device=device),
                clip_mask=torch.tensor([a == "clip" for a in actions], device=device),
                growth_mask=torch.tensor([k == "growth" for k in STEP_KINDS], device=device),
                stepped=torch.tensor(stepped, dtype=torch.int64, device=device),
                skipped=torch.tensor(skipped, dtype=torch.int64, device=device),
                inf=torch.full((len(STEP_KINDS),), math.inf, device=device),
                ceiling={},
            )
        return self._tensors[device]

    def constant(self, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A 0-d tensor of ``value`` (1.0 or a ceiling), made once per device and dtype."""
        cache = self.tensors(device).ceiling
        if (value, dtype) not in cache:
            cache[(value, dtype)] = torch.full((), value, dtype=dtype, device=device)
        return cache[(value, dtype)]


@dataclass(frozen=True)
class Decision:
    """What the Guard does with one step; all device tensors.

    Attributes:
        skip: 0-d bool, True: the optimizer does not step (parameters and its state unchanged).
        coef: 0-d float32, the factor applied to the gradients on a real step (1.0: no clip; 1.0 when
            skipped). It does not include an in-place clip strategy's own factor (``Value``, ``LayerNorm``,
            ``AGC`` clip the gradients themselves).
        ceiling: 0-d float32, the total norm the step was allowed: the least of the clip strategy's static
            ``max_norm`` and the spike threshold when spikes are clipped (inf: none).
        flags: bool per kind of ``STEP_KINDS``: the verdict's flags.
        actions: int64 per kind of ``STEP_KINDS``: ``ACTIONS.index(action) + 1`` for each kind flagged at
            this step (the action taken, see :meth:`Responses.taken`), 0 for the others (computed when read:
            the Guard records the flags and the skip, from which the records are decoded).
    """

    skip: Tensor
    coef: Tensor
    ceiling: Tensor
    flags: Tensor
    responses: Responses = field(repr=False, compare=False)

    @property
    def actions(self) -> Tensor:
        r = self.responses.tensors(self.flags.device)
        return torch.where(self.skip, r.skipped, r.stepped) * self.flags

    def kinds(self) -> list[str]:
        """The kinds flagged at this step (a host read; for tests and debugging)."""
        return [k for k, a in zip(STEP_KINDS, self.actions.tolist()) if a]


def decide(
    total_norm: Tensor,
    finite: Tensor,
    verdict: Verdict,
    clip_coef: Tensor | None,
    responses: Responses,
    ceiling: float = math.inf,
) -> Decision:
    """One step's decision from its measurements (see the module docstring). Pure: no state, no read.

    Args:
        total_norm: 0-d, the gradients' total norm (all-reduced when distributed).
        finite: 0-d bool, whether every gradient is finite.
        verdict: the detector's verdict for this step.
        clip_coef: 0-d float32, the clip strategy's coefficient (``ScaleClipper.coefficient``), or None.
        responses: the action for each kind of event.
        ceiling: a static ceiling on the total norm: GlobalNorm's ``max_norm``, folded into the coefficient
            exactly as ``clip_grad_norm_`` computes it (so the Guard need not ask GlobalNorm for its
            coefficient), and recorded.
    """
    device = total_norm.device
    r = responses.tensors(device)
    flags = verdict.flags
    # a non-finite gradient is always skipped (the detector flags it: nonfinite_grad's responses all skip)
    skip = (flags & r.skip_mask).any() | ~finite
    # the clip limits of the flagged kinds whose response is "clip"; a NaN threshold (nothing learned yet)
    # sets no limit
    limit_of_kind = torch.where(r.growth_mask, verdict.norm_level, verdict.spike_threshold)
    limit = torch.where(flags & r.clip_mask, limit_of_kind, r.inf).nan_to_num(nan=math.inf).amin()
    # float64 norms (float64 gradients) stay float64: a norm of 1e100 has a coefficient of 1e-100
    total = total_norm if total_norm.dtype == torch.float64 else total_norm.float()
    if math.isfinite(ceiling):  # the static ceiling (GlobalNorm's max_norm) is one more limit
        limit = torch.fmin(limit.to(total.dtype), responses.constant(ceiling, total.dtype, device))
    # limit * (1 / (||g|| + 1e-6)): the very kernels of clip_grad_norm_'s max_norm / (total_norm + 1e-6)
    coef = torch.clamp(limit.to(total.dtype) * torch.reciprocal(total + _NORM_EPS), max=1.0)
    if clip_coef is not None:
        coef = torch.fmin(coef, clip_coef.to(total.dtype))
    # one action per step: a skipped step is not clipped (and a non-finite norm never "clipped" to NaN)
    coef = torch.where(skip, responses.constant(1.0, total.dtype, device), coef)
    ceiling_t = responses.constant(ceiling, torch.float32, device)
    if responses.clips("grad_spike"):
        ceiling_t = torch.fmin(verdict.spike_threshold.float(), ceiling_t)
    return Decision(skip=skip, coef=coef, ceiling=ceiling_t, flags=flags, responses=responses)

"""Guard: the object a training loop hands its optimizer step to.

::

    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip(), sinks=[gg.sinks.JSONL("run.jsonl")])
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)                       # measure, decide, clip, step the optimizer or skip
        optimizer.zero_grad(set_to_none=True)
    guard.close()                              # flush the last records, close the sinks

One guarded step (an accumulation boundary):

1. ``grad_stats``: per-layer and global gradient norms, one read of the gradients (all-reduced across
   ranks when distributed, see ``dist.py``);
2. ``Detector.update``: event flags on the device (``detect.py``);
3. the clip coefficient: the ``clip`` strategy's, lowered to the detector's threshold for events whose
   response is ``"clip"``;
4. the optimizer step, or a skip: parameters *and* optimizer state unchanged, scheduler not advanced;
5. one row of history on the device (``history.py``); every ``log_every`` steps the rows are copied to the
   host in one transfer, written to the sinks, and the host-side recovery runs (``recover.py``).

**Host reads.** A plain optimizer needs a Python ``if`` to skip, so the Guard reads one integer per step,
which carries the skip flag, whether to scale the gradients, and the event flags; steps without
clipping then cost no pass over the gradients beyond the norm. A fused optimizer (torch ``Adam``,
``AdamW``, ``SGD`` with ``fused=True``) takes the decision itself, as with ``torch.amp.GradScaler``: the
skip flag goes in as ``found_inf`` and the clip coefficient is folded into ``grad_scale``
(``grad_scale = 1 / coef``: fused kernels divide by it), so a guarded step reads nothing and clipping costs
no pass of its own: the kernel divides each gradient as it reads it (torch's kernels write the clipped
value back into ``.grad`` on a real step; a skipped step leaves ``.grad`` as it was). Decisions that need the host (LR back-off, rollback, ``"raise"``) are then taken
when the history is flushed, every ``log_every`` steps, from the flushed rows, with the same rules; the
weights are checked for NaN/Inf at the same moment on both paths. A ``scheduler`` given to a Guard with
a fused optimizer costs one read per step (it must know whether the step happened).

**Skipped steps** are returned by ``step()`` as a device bool (True: the optimizer stepped), available
on the host as ``guard.last_step_skipped`` (a read on the fused path), counted in ``summary()``, and
flagged in the history. Give the LR scheduler to the Guard (``scheduler=``) so that it only advances on
real steps.

**Mixed precision**: give the ``torch.amp.GradScaler`` as ``scaler=`` and call
``scaler.scale(loss).backward()``; the Guard unscales first, treats the scaler's inf as a non-finite
gradient (skip), and calls ``scaler.update()`` itself (do not call ``scaler.step``/``update``).

**Gradient accumulation**: with ``accumulation_steps=N`` call ``guard.step(loss)`` after every
micro-batch's backward; the Guard sums the losses and acts on every N-th call only.
``guard.sync_gradients`` is True after a call that ended an accumulation window: zero the gradients then.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import dist as gg_dist
from gradguard.clip import Clipper, GlobalNorm, ScaleClipper, scale_grads_
from gradguard.detect import EVENT_KINDS, STEP_KINDS, Detector, nonfinite_layer
from gradguard.history import FIELDS, History, to_record
from gradguard.recover import (
    RecoveryPolicy,
    Snapshot,
    TrainingDiverged,
    TrainingState,
    clone_tree,
    group_lrs,
    scale_lr_,
)
from gradguard.sinks import Sink
from gradguard.stats import grad_stats

__all__ = ["ACTIONS", "ALLOWED_ACTIONS", "Guard", "TrainingDiverged"]

#: What the Guard can do about an event.
ACTIONS = ("log", "clip", "skip", "rollback", "raise")
#: The actions that make sense for each kind of event.
ALLOWED_ACTIONS: dict[str, tuple[str, ...]] = {
    "nonfinite_grad": ("skip", "rollback", "raise"),
    "nonfinite_loss": ("log", "skip", "rollback", "raise"),
    "grad_spike": ("log", "clip", "skip", "rollback", "raise"),
    "loss_spike": ("log", "clip", "skip", "rollback", "raise"),
    "growth": ("log", "clip", "skip", "rollback", "raise"),
    "nonfinite_param": ("rollback", "raise"),
}
_NORM_EPS = 1e-6  # as clip_grad_norm_
_GRAD_SPIKE, _LOSS_SPIKE, _GROWTH = (STEP_KINDS.index(k) for k in ("grad_spike", "loss_spike", "growth"))


def _int_at_least(value: Any, low: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Guard: {name} must be an int >= {low}, got {value!r}")
    return value


def _factor(value: Any, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Guard: {name} must be in (0, 1], got {value}")
    return value


def _resolve_responses(
    on_nonfinite: str, on_spike: str, on_loss_spike: str, on_growth: str, responses: dict[str, str] | None
) -> dict[str, str]:
    chosen = {
        "nonfinite_grad": on_nonfinite,
        "nonfinite_loss": on_nonfinite,
        "grad_spike": on_spike,
        "loss_spike": on_loss_spike,
        "growth": on_growth,
        "nonfinite_param": "rollback",
    }
    for option, kind in (("on_nonfinite", "nonfinite_grad"), ("on_spike", "grad_spike"),
                         ("on_loss_spike", "loss_spike"), ("on_growth", "growth")):
        allowed = ALLOWED_ACTIONS[kind]
        if chosen[kind] not in allowed:
            raise ValueError(f"Guard: {option} must be one of {allowed}, got {chosen[kind]!r}")
    for kind, action in (responses or {}).items():
        if kind not in ALLOWED_ACTIONS:
            raise ValueError(f"Guard: responses has an unknown event kind {kind!r}; kinds are {EVENT_KINDS}")
        if action not in ALLOWED_ACTIONS[kind]:
            raise ValueError(
                f"Guard: responses[{kind!r}] must be one of {ALLOWED_ACTIONS[kind]}, got {action!r}"
            )
        chosen[kind] = action
    return chosen


def _fused_amp_capable(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that take ``grad_scale`` / ``found_inf`` attributes, as GradScaler uses them."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and (
        "grad_scaler" not in inspect.signature(optimizer.step).parameters
    )


class Guard:
    """Keeps a training run stable: detects exploding gradients and responds, step by step.

    Args:
        model: the model being trained (its ``named_parameters`` name the layers).
        optimizer: its optimizer; ``guard.step`` calls ``optimizer.step()``.
        clip: a ``gradguard.clip`` strategy applied at every step, or None. Scale strategies
            (GlobalNorm, AutoClip, ZClip) are folded into fused optimizers' ``grad_scale``.
        on_nonfinite: response to NaN/Inf gradients or loss: ``"skip"``, ``"rollback"`` or ``"raise"``.
        on_spike: response to a gradient-norm spike: ``"clip"`` (to the detector's threshold),
            ``"skip"``, ``"rollback"``, ``"raise"`` or ``"log"``.
        on_loss_spike: response to a loss spike (same choices). ``"skip"`` by default: a batch whose loss
            is far above the run's is an outlier not to learn from, and when the weights themselves went
            bad (a learning rate far too high) every following step is skipped until the skips call for a
            rollback.
        on_growth: response to sustained growth of the norm: ``"clip"`` (to its moving average),
            ``"skip"``, ``"rollback"``, ``"raise"`` or ``"log"``.
        responses: per-kind overrides, ``{kind: action}``; kinds are ``gradguard.detect.EVENT_KINDS``
            (``nonfinite_param`` accepts ``"rollback"`` or ``"raise"``).
        detector: a configured :class:`~gradguard.detect.Detector` (default ``Detector()``).
        scaler: a ``torch.amp.GradScaler``, when training with one.
        scheduler: an LR scheduler the Guard advances after each real (not skipped) step.
        accumulation_steps: micro-batches per optimizer step.
        log_every: steps between two flushes of the history to the host and the sinks.
        layer_every: steps between two records of per-layer norms (0: never).
        sinks: where flushed records go (``gradguard.sinks``).
        lr_backoff: factor on the learning rate after ``backoff_after`` skips within ``skip_window`` steps
            (at most one back-off per ``skip_window`` steps).
        backoff_after: skips within ``skip_window`` steps that call for an LR back-off.
        rollback_after: skips within ``skip_window`` steps that call for a rollback.
        skip_window: the window, in steps, over which skips are counted.
        rollback_lr_factor: factor on the learning rate after a rollback.
        max_rollbacks: rollbacks allowed before ``TrainingDiverged``.
        lr_recover_after: real steps after a cut (back-off or rollback) before it is undone, one at a time;
            None: cuts are kept for good.
        snapshot_every: steps between two snapshots (taken at a flush, after checking the weights are
            finite; the first at the first step); None: no snapshots (no memory for them), and a
            needed rollback raises ``TrainingDiverged``.
        snapshot_dir: keep the snapshot in this folder instead of memory.
        groups: how layers are formed for per-layer norms (``grad_stats``'s ``groups``).
        process_group: the torch.distributed group (default: the world, when initialised).
        max_history: flushed records kept in ``guard.history`` (the oldest are dropped).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: Clipper | None = None,
        *,
        on_nonfinite: str = "skip",
        on_spike: str = "clip",
        on_loss_spike: str = "skip",
        on_growth: str = "clip",
        responses: dict[str, str] | None = None,
        detector: Detector | None = None,
        scaler: Any = None,
        scheduler: Any = None,
        accumulation_steps: int = 1,
        log_every: int = 25,
        layer_every: int = 10,
        sinks: Sequence[Sink] | Iterable[Sink] = (),
        lr_backoff: float = 0.5,
        backoff_after: int = 5,
        rollback_after: int = 10,
        skip_window: int = 50,
        rollback_lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        lr_recover_after: int | None = 50,
        snapshot_every: int | None = 100,
        snapshot_dir: str | None = None,
        groups: str = "module",
        process_group: Any = None,
        max_history: int = 100_000,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Guard: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"Guard: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip is not None and not isinstance(clip, Clipper):
            raise ValueError(f"Guard: clip must be a gradguard.clip strategy or None, got {type(clip).__name__}")
        if detector is not None and not isinstance(detector, Detector):
            raise ValueError(f"Guard: detector must be a gradguard.detect.Detector, got {type(detector).__name__}")
        self.responses = _resolve_responses(on_nonfinite, on_spike, on_loss_spike, on_growth, responses)
        self.accumulation_steps = _int_at_least(accumulation_steps, 1, "accumulation_steps")
        self.log_every = _int_at_least(log_every, 1, "log_every")
        self.layer_every = _int_at_least(layer_every, 0, "layer_every")
        self.max_history = _int_at_least(max_history, 0, "max_history")
        if snapshot_every is not None:
            _int_at_least(snapshot_every, 1, "snapshot_every")
        self.snapshot_every = snapshot_every
        self.policy = RecoveryPolicy(
            lr_backoff=_factor(lr_backoff, "lr_backoff"),
            backoff_after=_int_at_least(backoff_after, 1, "backoff_after"),
            rollback_after=_int_at_least(rollback_after, 1, "rollback_after"),
            skip_window=_int_at_least(skip_window, 1, "skip_window"),
            rollback_lr_factor=_factor(rollback_lr_factor, "rollback_lr_factor"),
            max_rollbacks=_int_at_least(max_rollbacks, 0, "max_rollbacks"),
            lr_recover_after=None if lr_recover_after is None else _int_at_least(
                lr_recover_after, 1, "lr_recover_after"),
        )
        self.sinks: list[Sink] = list(sinks)
        for i, sink in enumerate(self.sinks):
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise ValueError(f"Guard: sinks[{i}] must have write(records) and close(), got {sink!r}")

        self.model = model
        self.optimizer = optimizer
        # The step method as it is now: integrations may route the framework's optimizer.step() call to
        # this Guard (see gradguard.integrations), and the Guard must still reach the real step.
        self._optimizer_step = optimizer.step
        self.clip = clip
        self.detector = detector if detector is not None else Detector()
        self.scaler = scaler
        self.scheduler = scheduler
        self.groups = groups
        self.norm_type = clip.norm_type if clip is not None else 2.0
        self.fused = _fused_amp_capable(optimizer)
        self.process_group = gg_dist.process_group_or_none(process_group)
        self._named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._has_dtensor = any(gg_dist._is_dtensor(p) for _, p in self._named)
        self._static_ceiling = clip.max_norm if isinstance(clip, GlobalNorm) else math.inf

        kinds = STEP_KINDS
        self._skip_kinds = [i for i, k in enumerate(kinds) if self.responses[k] in ("skip", "rollback", "raise")]
        self._clip_kinds = [i for i, k in enumerate(kinds) if self.responses[k] == "clip"]
        self._masks: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._bit_weights: dict[torch.device, Tensor] = {}

        self.history_buffer = History(capacity=self.log_every, layer_every=self.layer_every)
        self._history: deque[dict[str, Any]] = deque(maxlen=self.max_history)
        self._recent_events: deque[dict[str, Any]] = deque(maxlen=20)
        self._actions: dict[int, list[dict[str, Any]]] = {}  # host actions by step, attached at flush
        self.snapshot = Snapshot(snapshot_dir)
        self._training_state = TrainingState(
            model, optimizer, scheduler, self._recoverable_state, self._load_recoverable_state
        )

        self.step_count = 0  # optimizer steps (accumulation boundaries) guarded so far
        self.sync_gradients = True
        self._micro = 0
        self._loss_sum: Tensor | None = None
        self._counts: Tensor | None = None  # device: [skipped, clipped]
        self._last_stepped: Tensor | None = None
        self._last_skipped_host: bool | None = None
        self._in_flush = False
        self._closed = False
        self._initial_lrs = group_lrs(optimizer)

    # ------------------------------------------------------------------ the step

    def step(self, loss: Tensor | None = None) -> Tensor:
        """Guard one optimizer step: measure, decide, clip, then ``optimizer.step()`` or skip.

        Args:
            loss: this micro-batch's loss (unscaled; detached here), or None to skip the loss checks.

        Returns:
            0-d bool device tensor, True when the optimizer stepped. Between accumulation boundaries
            nothing happens and it is False.
        """
        if self._closed:
            raise RuntimeError("Guard: step() after close()")
        if loss is not None:
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1
        if self._micro < self.accumulation_steps:
            self.sync_gradients = False
            return torch.zeros((), dtype=torch.bool)
        self._micro = 0
        self.sync_gradients = True
        loss, self._loss_sum = self._loss_sum, None
        stepped = self._guarded_step(loss)
        self.step_count += 1
        if self.step_count % self.log_every == 0:
            self.flush()
        return stepped

    def _guarded_step(self, loss: Tensor | None) -> Tensor:
        if self.snapshot_every is not None and self.snapshot.step is None:
            # the first snapshot: the weights as training starts (taken here, not in __init__, so that
            # weights loaded after the Guard was made, e.g. a pretrained checkpoint, are the ones kept)
            self.snapshot.save(self.step_count, self._training_state.capture())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        named, sharded = self._named, None
        if self._has_dtensor:
            named, sharded = gg_dist.local_named_parameters(named)
        stats = grad_stats(named, groups=self.groups, norm_type=self.norm_type)
        if self.process_group is not None:
            stats, loss = gg_dist.all_reduce_stats(stats, loss, self.process_group, sharded)
        device = stats.total_norm.device
        verdict = self.detector.update(stats, loss)

        # the clip coefficient: the strategy's, lowered to the detector's threshold where asked
        in_place_coef = None
        if isinstance(self.clip, ScaleClipper):
            fold_coef = self.clip.coefficient(stats)
        else:
            fold_coef = torch.ones((), dtype=torch.float32, device=device)
            if self.clip is not None:
                in_place_coef = self.clip.clip_(stats).coef.to(device)
        skip_mask, clip_mask = self._device_masks(device)
        total = stats.total_norm.float()
        ceiling = torch.full((), self._static_ceiling, dtype=torch.float32, device=device)
        if self._clip_kinds:
            wants = verdict.flags & clip_mask
            spike_limit = torch.where(wants[_GRAD_SPIKE] | wants[_LOSS_SPIKE], verdict.spike_threshold, math.inf)
            growth_limit = torch.where(wants[_GROWTH], verdict.norm_level, math.inf)
            # fmin, not minimum: a NaN threshold (no statistics yet) sets no limit instead of a NaN one
            limit = torch.fmin(spike_limit, growth_limit)
            limit_coef = torch.clamp(limit / (total + _NORM_EPS), max=1.0)
            fold_coef = torch.where(stats.finite, torch.fmin(fold_coef, limit_coef), fold_coef)
            if self.responses["grad_spike"] == "clip":
                ceiling = torch.fmin(ceiling, verdict.spike_threshold)
        skip = (verdict.flags & skip_mask).any()
        if self.process_group is not None:  # the same decision everywhere: any rank's skip, the least coef
            decision = torch.stack([skip.float(), -fold_coef.float()])
            gg_dist.all_reduce_max_(decision, self.process_group)
            skip, fold_coef = decision[0] > 0, -decision[1]
        scale_needed = fold_coef < 1.0

        if self.fused:
            self._fused_step(skip, fold_coef)
            if self.scheduler is not None:
                self._last_skipped_host = bool(skip)  # the one read: the scheduler must know
                if not self._last_skipped_host:
                    self.scheduler.step()
            else:
                self._last_skipped_host = None
            flags_host = None
        else:
            bits = self._bit_weights[device]
            code = int((torch.stack([skip, scale_needed, *verdict.flags]).long() * bits).sum())  # the read
            skipped = bool(code & 1)
            flags_host = code >> 2
            if not skipped:
                if code & 2:
                    scale_grads_(stats.grads, fold_coef)
                self._optimizer_step()
                if self.scheduler is not None:
                    self.scheduler.step()
            self._last_skipped_host = skipped
        if self.scaler is not None:
            self.scaler.update()

        coef = fold_coef if in_place_coef is None else torch.minimum(fold_coef, in_place_coef)
        clipped = (coef < 1.0) & ~skip
        counts = torch.stack([skip, clipped]).long()
        self._counts = counts if self._counts is None else self._counts + counts
        self._last_stepped = ~skip
        self._record(stats, loss, verdict, coef, ceiling, skip, clipped)
        if flags_host is not None:
            self._after_step(self.step_count, flags_host, skipped=bool(self._last_skipped_host))
        return ~skip

    def _fused_step(self, skip: Tensor, fold_coef: Tensor) -> None:
        """Let the fused optimizer skip and clip: it divides by ``grad_scale`` and skips on ``found_inf``."""
        opt: Any = self.optimizer
        if self._momentum_buffers_missing() and bool(skip):  # a read, until SGD's first real step
            return
        # with a GradScaler the gradients were unscaled already (stage UNSCALED): only our coefficient
        opt.grad_scale = torch.where(skip, torch.ones_like(fold_coef), 1.0 / fold_coef).float()
        opt.found_inf = skip.float()
        try:
            self._optimizer_step()
        finally:
            del opt.grad_scale
            del opt.found_inf

    def _momentum_buffers_missing(self) -> bool:
        """torch's fused SGD (2.13) makes its momentum buffers with ``empty_like`` on its first step and fills
        them in the kernel, which ``found_inf`` skips: a skipped first step would leave them uninitialised.
        Until the buffers exist, the skip flag is read and a skipped step does not reach the optimizer (the
        same corruption under GradScaler: LibreYOLO/libreyolo#771)."""
        opt = self.optimizer
        if not isinstance(opt, torch.optim.SGD):
            return False
        return any(
            group["momentum"] != 0 and any("momentum_buffer" not in opt.state.get(p, {}) for p in group["params"])
            for group in opt.param_groups
        )

    def _device_masks(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._masks:
            skip_mask = torch.zeros(len(STEP_KINDS), dtype=torch.bool)
            skip_mask[self._skip_kinds] = True
            clip_mask = torch.zeros(len(STEP_KINDS), dtype=torch.bool)
            clip_mask[self._clip_kinds] = True
            self._masks[device] = (skip_mask.to(device), clip_mask.to(device))
            self._bit_weights[device] = torch.tensor([1 << i for i in range(2 + len(STEP_KINDS))], device=device)
        return self._masks[device]

    def _record(self, stats: Any, loss: Tensor | None, verdict: Any, coef: Tensor, ceiling: Tensor,
                skip: Tensor, clipped: Tensor) -> None:
        device = stats.total_norm.device
        total = stats.total_norm.float()
        nan = torch.full((), math.nan, dtype=torch.float32, device=device)
        weights = self._bit_weights[device][: len(STEP_KINDS)]
        values = {
            "loss": nan if loss is None else loss.float().reshape(()).to(device),
            "total_norm": total,
            "coef": coef.float(),
            "clip_threshold": torch.where(clipped, total * coef, ceiling),
            "skipped": skip.float(),
            "clipped": clipped.float(),
            "flags": (verdict.flags.long() * weights).sum().float(),
            "grad_z": verdict.grad_z.float(),
            "loss_z": verdict.loss_z.float(),
            "spike_threshold": verdict.spike_threshold.float(),
            "growth_rate": verdict.growth_rate.float(),
            "layer": verdict.layer.float(),
        }
        row = torch.stack([values[name] for name in FIELDS])
        lr = self.optimizer.param_groups[0]["lr"]
        lr = float(lr) if not isinstance(lr, Tensor) else float("nan")  # a tensor LR is not read per step
        layer_norms = stats.norms if self.layer_every and self.step_count % self.layer_every == 0 else None
        self.history_buffer.record(self.step_count, row, lr, stats.names, layer_norms)

    # ------------------------------------------------------------------ host decisions

    def _after_step(self, step: int, flags: int, skipped: bool) -> None:
        """The host side of one step: ``"raise"``/``"rollback"`` responses, then the escalation rungs."""
        flagged = [kind for bit, kind in enumerate(STEP_KINDS) if flags >> bit & 1]
        for kind in flagged:
            if self.responses[kind] == "raise":
                self._diverge(f"a {kind} event at step {step}, whose response is 'raise'", step)
        for kind in flagged:
            if self.responses[kind] == "rollback":
                self._rollback(step, f"a {kind} event")
                return
        rung = self.policy.observe(step, skipped)
        if rung == "lr_backoff":
            self._lr_backoff(step)
        elif rung == "lr_recover":
            self._lr_recover(step)
        elif rung == "rollback":
            self._rollback(step, f"{len(self.policy.skips)} skipped steps within {self.policy.skip_window}")

    def _note_action(self, step: int, event: dict[str, Any]) -> None:
        self._actions.setdefault(step, []).append(event)
        self._recent_events.append(event)

    def _scale_lr(self, factor: float) -> tuple[float, float]:
        before = float(self.optimizer.param_groups[0]["lr"])
        scale_lr_(self.optimizer, factor, self.scheduler)
        return before, float(self.optimizer.param_groups[0]["lr"])

    def _lr_backoff(self, step: int) -> None:
        before, after = self._scale_lr(self.policy.lr_backoff)
        self.policy.cuts.append(self.policy.lr_backoff)
        self.policy.lr_backoffs += 1
        self._note_action(step, {"step": step, "kind": "lr_backoff", "layer": None, "action": "lr_backoff",
                                 "lr_before": before, "lr_after": after})

    def _lr_recover(self, step: int) -> None:
        before, after = self._scale_lr(1.0 / self.policy.cuts.pop())
        self._note_action(step, {"step": step, "kind": "lr_recover", "layer": None, "action": "lr_recover",
                                 "lr_before": before, "lr_after": after})

    def _rollback(self, step: int, reason: str) -> None:
        if self.snapshot.step is None:
            self._diverge(f"{reason} at step {step} called for a rollback, and snapshots are off "
                          "(snapshot_every=None)", step)
        if self.policy.rollbacks >= self.policy.max_rollbacks:
            self._diverge(f"{reason} at step {step} called for a rollback, and the rollback budget is spent "
                          f"({self.policy.rollbacks} of max_rollbacks={self.policy.max_rollbacks})", step)
        # the learning rates in force survive the restore: the snapshot brings back weights and moments
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        base_lrs = list(getattr(self.scheduler, "base_lrs", []))
        self._training_state.restore(self.snapshot.load())
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        if base_lrs:
            self.scheduler.base_lrs = base_lrs
        before, after = self._scale_lr(self.policy.rollback_lr_factor)
        self.policy.cuts.append(self.policy.rollback_lr_factor)
        self.policy.rollbacks += 1
        self.policy.after_rollback()
        self._note_action(step, {"step": step, "kind": "rollback", "layer": None, "action": "rollback",
                                 "reason": reason, "to_step": self.snapshot.step, "lr_before": before,
                                 "lr_after": after})

    def _diverge(self, reason: str, step: int) -> None:
        if not self._in_flush:  # publish what is on the device, so the account and the sinks have it
            self._publish(self._drain()[0])
        summary = self.summary()
        lines = [f"gradguard: training diverged at step {step}: {reason}."]
        if self._recent_events:
            lines.append("What happened (latest events):")
            for event in list(self._recent_events)[-10:]:
                values = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in event.items() if k not in ("step", "kind", "layer", "action")
                )
                where = f" in {event['layer']!r}" if event.get("layer") else ""
                lines.append(f"  step {event['step']}: {event['kind']}{where} ({values}) -> {event['action']}")
        lr_now = self.optimizer.param_groups[0]["lr"]
        lines.append(
            f"Counters: {summary['steps']} steps, {summary['skipped']} skipped, {summary['clipped']} clipped, "
            f"{summary['rollbacks']} rollbacks, {summary['lr_backoffs']} LR back-offs; "
            f"lr {self._initial_lrs[0]:.3g} -> {float(lr_now):.3g}."
        )
        if self.snapshot.step is not None:
            lines.append(f"Last good snapshot: step {self.snapshot.step}.")
        lines.append("Try a lower learning rate, gradient clipping (gg.clip.GlobalNorm), a better-scaled init "
                     "(gg.init.auto_), or gg.doctor(model, batch, loss_fn) to find the layer.")
        raise TrainingDiverged("\n".join(lines), step, list(self._recent_events), summary)

    # ------------------------------------------------------------------ flush

    def _drain(self) -> tuple[list[dict[str, Any]], int]:
        """Rows since the last flush as records, and the first non-finite parameter (-1: none)."""
        check = nonfinite_layer(self._named_local()).float().reshape(1) if self._named else None
        rows, extra = self.history_buffer.drain(extra=check)
        records = [to_record(row, self.responses) for row in rows]
        for record in records:
            self._recent_events.extend(record["events"])
        bad_param = int(extra[0]) if extra else -1
        return records, bad_param

    def _named_local(self) -> list[tuple[str, Tensor]]:
        return gg_dist.local_named_parameters(self._named)[0] if self._has_dtensor else self._named

    def flush(self) -> list[dict[str, Any]]:
        """Copy the history to the host (one transfer), run the host-side recovery, write to the sinks.

        Returns the records flushed. Called every ``log_every`` steps by ``step``.
        """
        self._in_flush = True
        error: TrainingDiverged | None = None
        try:
            records, bad_param = self._drain()
            rolled_back = False
            try:
                if self.fused:  # the host decisions of these steps were deferred to now
                    for record in records:
                        flags = sum(1 << STEP_KINDS.index(e["kind"]) for e in record["events"])
                        rollbacks = self.policy.rollbacks
                        self._after_step(record["step"], flags, record["skipped"])
                        if self.policy.rollbacks != rollbacks:
                            rolled_back = True  # later rows came from the state just abandoned
                            break
                if not rolled_back:
                    self._check_params(bad_param)
            except TrainingDiverged as exc:
                error = exc
            self._publish(records)
        finally:
            self._in_flush = False
        if error is not None:
            raise error
        return records

    def _check_params(self, bad_param: int) -> None:
        step = self.step_count - 1
        nonfinite = bad_param >= 0
        if self.process_group is not None:
            flag = torch.tensor([float(nonfinite)], device=self._device())
            nonfinite = bool(gg_dist.all_reduce_max_(flag, self.process_group)[0] > 0)  # flush-time only
        if nonfinite:
            layer = self._named[bad_param][0] if bad_param >= 0 else None
            self._recent_events.append({"step": step, "kind": "nonfinite_param", "layer": layer,
                                        "action": self.responses["nonfinite_param"]})
            self._actions.setdefault(step, []).append(self._recent_events[-1])
            if self.responses["nonfinite_param"] == "raise":
                self._diverge(f"non-finite weights in {layer!r} after step {step}", step)
            self._rollback(step, f"non-finite weights in {layer!r}")
            return
        due = self.snapshot_every is not None and (
            self.snapshot.step is None or self.step_count - self.snapshot.step >= self.snapshot_every
        )
        if due:
            self.snapshot.save(self.step_count, self._training_state.capture())

    def _publish(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            record["events"].extend(self._actions.pop(record["step"], []))
        if self._actions and records:  # actions noted for a step whose row was already published
            last = records[-1]
            for step in sorted(self._actions):
                last["events"].extend(self._actions.pop(step))
        self._history.extend(records)
        for sink in self.sinks:
            sink.write(records)

    def _device(self) -> torch.device:
        return self._named[0][1].device if self._named else torch.device("cpu")

    # ------------------------------------------------------------------ reading

    @property
    def history(self) -> list[dict[str, Any]]:
        """The records flushed so far (oldest first; at most ``max_history``). See ``gradguard.history``."""
        return list(self._history)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last guarded step was skipped (a host read on the fused path without scheduler)."""
        if self._last_skipped_host is not None:
            return self._last_skipped_host
        return self._last_stepped is not None and not bool(self._last_stepped)

    def summary(self) -> dict[str, int]:
        """``{"steps", "skipped", "clipped", "rollbacks", "lr_backoffs"}`` as ints (one host read)."""
        skipped, clipped = (0, 0) if self._counts is None else (int(v) for v in self._counts.tolist())
        return {
            "steps": self.step_count,
            "skipped": skipped,
            "clipped": clipped,
            "rollbacks": self.policy.rollbacks,
            "lr_backoffs": self.policy.lr_backoffs,
        }

    def close(self) -> None:
        """Flush what is left and close the sinks."""
        if self._closed:
            return
        try:
            if self.history_buffer.pending:
                self.flush()
        finally:
            self._closed = True
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def _recoverable_state(self) -> dict[str, Any]:
        """What a rollback restores of the Guard: the detector's and the clipper's statistics."""
        return {
            "detector": self.detector.state_dict(),
            "clip": self.clip.state_dict() if self.clip is not None else {},
        }

    def _load_recoverable_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.clip is not None:
            self.clip.load_state_dict(state["clip"])

    def state_dict(self) -> dict[str, Any]:
        """Detector, clipper, counters, recovery policy, snapshot and unflushed history: a resumed Guard
        continues exactly as the uninterrupted one would (save it with the model and the optimizer).

        An in-memory snapshot is part of it (a copy of the model and optimizer state); with
        ``snapshot_dir`` only the snapshot's step is, and the file stays where it is."""
        return clone_tree({
            **self._recoverable_state(),
            "step_count": self.step_count,
            "micro": self._micro,
            "loss_sum": self._loss_sum,
            "counts": self._counts,
            "policy": self.policy.state_dict(),
            "snapshot": self.snapshot.state_dict(),
            "history": self.history_buffer.state_dict(),
            "actions": self._actions,
            "initial_lrs": self._initial_lrs,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = clone_tree(state)
        self._load_recoverable_state(state)
        self.step_count = int(state["step_count"])
        self._micro = int(state["micro"])
        self._loss_sum = state["loss_sum"]
        self._counts = state["counts"]
        self.policy.load_state_dict(state["policy"])
        self.snapshot.load_state_dict(state["snapshot"])
        self.history_buffer.load_state_dict(state["history"])
        self._actions = {int(k): v for k, v in state["actions"].items()}
        self._initial_lrs = list(state["initial_lrs"])

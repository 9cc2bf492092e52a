"""Guard: the object a training loop hands its optimizer step to.

::

    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip(), sinks=[gg.sinks.JSONL("run.jsonl")])
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)                       # measure, decide, apply: step the optimizer or skip
        optimizer.zero_grad(set_to_none=True)
    guard.close()                              # flush the last records, close the sinks

One guarded step (an accumulation boundary) reads top to bottom in :meth:`Guard.step`:

1. **measure**: ``grad_stats`` (per-layer and global gradient norms, one read of the gradients;
   all-reduced across ranks when distributed, see ``dist.py``) and the clip strategy's coefficient;
2. **detect and decide**: :func:`gradguard.device_step.device_step`, one pure function of those device
   tensors and the detector's state: the detector's verdict (:func:`gradguard.detect.detector_step`), the
   decision (:func:`gradguard.decide.decide`: skip or not, the coefficient for the gradients, the action
   per kind of event) and the step's history row; with ``compile=True``, compiled (one fused kernel);
3. **apply**, one path per kind of optimizer (below): the optimizer step, or a skip (parameters *and*
   optimizer state unchanged, scheduler not advanced);
4. **record**: the row into the history's ring on the device (``history.py``); every ``log_every`` steps the
   rows are copied to the host in one transfer, written to the sinks, and the host-side recovery runs
   (``recover.py``: LR back-off, rollback to the last good snapshot, ``TrainingDiverged``).

**Host reads.** A plain optimizer needs a Python ``if`` to skip, so the Guard reads one integer per step,
which carries the skip flag, whether to scale the gradients, and the event flags; steps without
clipping then cost no pass over the gradients beyond the norm. A fused optimizer (torch ``Adam``,
``AdamW``, ``SGD`` with ``fused=True``) takes the decision itself, as with ``torch.amp.GradScaler``: the
skip flag goes in as ``found_inf`` and the clip coefficient is folded into ``grad_scale``
(``grad_scale = 1 / coef``: fused kernels divide by it), so a guarded step reads nothing and clipping costs
no pass of its own: the kernel divides each gradient as it reads it (torch's kernels write the clipped
value back into ``.grad`` on a real step; a skipped step leaves ``.grad`` as it was). Decisions that need
the host (LR back-off, rollback, ``"raise"``) are then taken when the history is flushed, every
``log_every`` steps, from the flushed rows, with the same rules; the weights are checked for NaN/Inf at
the same moment on both paths, and on the plain path also at a step whose loss is NaN/Inf (one pass and one
read on such steps only), so that NaN weights are rolled back at the first loss they spoil (the fused path
finds that step in the flushed rows: the first of the NaN losses that run to the flush). A ``scheduler``
given to a Guard with a fused optimizer costs one read per step (it must know whether the step happened).

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

**Forensics**: with ``forensics=gg.Forensics(...)`` and ``guard.step(loss, batch=batch)``, each step with a
``nonfinite_grad``, ``nonfinite_loss``, ``grad_spike`` or ``loss_spike`` event is explained before the
weights move (the origin layer, the samples responsible, whether it reproduces, a replay bundle: see
``gradguard.forensics``), in ``event["forensics"]`` and ``guard.bad_samples``. Healthy steps keep references
only (the batch, the per-layer norms) and read nothing more on the plain path; on the fused path forensics
adds the one read of the event flags per step.

**Bad input** is refused before anything changes, with the argument named: a loss that is not a scalar,
a step with no gradient at all (backward not called, or every parameter frozen), an optimizer that holds
none of the model's parameters, a model on the meta device, unknown ``groups``, a clip strategy's invalid
``norm_type``, a complex or integer loss, a scheduler without ``step()``, a scaler without ``update()``, a
``process_group`` that is not one, a second ``step()`` on the gradients of the last one (their version
counters unchanged: a host-side check), and a ``load_state_dict`` whose state does not match this model and
optimizer.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import dist as gg_dist
from gradguard.clip import Clipper, ClipResult, GlobalNorm, ScaleClipper, default_clip, scale_grads_
from gradguard.decide import ACTIONS, ALLOWED_ACTIONS, Decision, Responses
from gradguard.detect import STEP_KINDS, Detector, DetectorStep, kinds_of, nonfinite_layer
from gradguard.device_step import DeviceStep, StepConfig, StepOutput, UpdateInputs, code_weights
from gradguard.forensics import ANALYSED_KINDS, BadSample, Forensics, ForensicsRecord
from gradguard.forensics.watch import DataWatch
from gradguard.history import History, StepRecord, history_row, to_record
from gradguard.names import user_name
from gradguard.precursor import weight_norm
from gradguard.recover import (
    GiveUp,
    Recovery,
    RecoveryPolicy,
    TrainingDiverged,
    TrainingState,
    clone_tree,
    nonfinite_flag,
)
from gradguard.sinks import Sink
from gradguard.stats import GradStats, named_grad_stats
from gradguard.update_size import UpdateSizeStep, log_lr

__all__ = ["ACTIONS", "ALLOWED_ACTIONS", "Guard", "RecoveryPolicy", "TrainingDiverged"]

_GROUPINGS = ("module", "param")
#: The version of ``Guard.state_dict``'s layout; ``load_state_dict`` refuses others. 4: the recovery's LR cut
#: is one ``lr_scale`` (was a list of cuts) and its pending loss-level reset is saved; 5: the recovery's
#: counters renamed (rollbacks_to_snapshot, real_steps_at_scale, quiet_steps, ...) and its state named.
STATE_FORMAT = "gradguard.Guard/5"
_STATE_KEYS = ("format", "fingerprint", "detector", "clip", "step_count", "micro", "loss_sum", "counts",
               "recovery", "history")


def _int_at_least(value: Any, low: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Guard: {name} must be an int >= {low}, got {value!r}")
    return value


def _fused_amp_capable(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that take ``grad_scale`` / ``found_inf`` attributes, as GradScaler uses them."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and (
        "grad_scaler" not in inspect.signature(optimizer.step).parameters
    )


def _check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"Guard: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"Guard: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    named = list(model.named_parameters())
    meta = [name for name, p in named if p.is_meta]
    if meta:
        raise ValueError(
            f"Guard: model has parameters on the meta device ({', '.join(map(repr, meta[:3]))}"
            f"{', ...' if len(meta) > 3 else ''}): they hold no values to guard; materialise them first "
            "(model.to_empty(device=...) and initialise, or load a checkpoint)"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if named and not any(id(p) in held for _, p in named):
        raise ValueError(
            f"Guard: optimizer holds none of the model's {len(named)} parameters: make it from this model's "
            "parameters (e.g. torch.optim.AdamW(model.parameters()))"
        )


def _held_outside(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """Parameters the optimizer holds that are not the model's, named ``optimizer[<group>][<index>]`` (no
    dot: each is a layer of its own in the per-layer norms)."""
    own = {id(p) for p in model.parameters()}
    return [(f"optimizer[{g}][{i}]", p) for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"]) if id(p) not in own]


def _is_sink(obj: Any) -> bool:
    return callable(getattr(obj, "write", None)) and callable(getattr(obj, "close", None))


def _check_step_partners(scheduler: Any, scaler: Any, process_group: Any) -> None:
    """The objects the Guard calls at each step, checked when it is made, not at the first step."""
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise ValueError(f"Guard: scheduler must be an LR scheduler with step() (torch.optim.lr_scheduler) or None, "
                         f"got {scheduler!r}")
    if scaler is not None and not (callable(getattr(scaler, "unscale_", None))
                                   and callable(getattr(scaler, "update", None))):
        raise ValueError(f"Guard: scaler must be a torch.amp.GradScaler (unscale_() and update()) or None, "
                         f"got {scaler!r}")
    if process_group is not None and not (
            torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)):
        raise ValueError(f"Guard: process_group must be a torch.distributed.ProcessGroup or None (the world), "
                         f"got {process_group!r}")


def _nan_weights_onset(records: Sequence[StepRecord]) -> int | None:
    """Fused path, weights found NaN/Inf at the flush: the index of the record where they went bad, as far as the
    records tell: the first of the NaN/Inf losses that run to the last record (weights that hold NaN spoil every
    loss after them); None when the last loss is finite (the NaN is where no loss sees it: an idle parameter,
    the optimizer state), which the flush's own check handles."""
    onset = None
    for index in range(len(records) - 1, -1, -1):
        if not any(event["kind"] == "nonfinite_loss" for event in records[index]["events"]):
            break
        onset = index
    return onset


class Guard:
    """Keeps a training run stable: detects exploding gradients and responds, step by step.

    Args:
        model: the model being trained (its ``named_parameters`` name the layers).
        optimizer: its optimizer; ``guard.step`` calls ``optimizer.step()``.
        clip: a ``gradguard.clip`` strategy applied at every step, None for none, or ``"default"``:
            ``gradguard.clip.default_clip(model)``: ``AutoClip(percentile=5.0)`` for a model with a vanilla
            recurrence (``nn.RNN``), ``ArmedAutoClip()`` (the same, once the gradient norm turns rough) for
            one with LSTM/GRU layers, None otherwise (the detector's spike clipping alone). Scale strategies (GlobalNorm, AutoClip, ZClip) are folded into fused
            optimizers' ``grad_scale``.
        on_nonfinite: response to NaN/Inf gradients or loss: ``"skip"``, ``"rollback"`` or ``"raise"``.
        on_spike: response to a gradient-norm spike: ``"clip"`` (to the detector's threshold),
            ``"skip"``, ``"rollback"``, ``"raise"`` or ``"log"``.
        on_loss_spike: response to a loss spike (same choices). ``"skip"`` by default: a batch whose loss
            is far above the run's is an outlier not to learn from, and when the weights themselves went
            bad (a learning rate far too high) every following step is skipped until the skips call for a
            rollback.
        responses: per-kind overrides, ``{kind: action}``; kinds are ``gradguard.detect.EVENT_KINDS``
            (``growth``, sustained growth of the norm, ``"clip"`` by default: to its moving level;
            ``nonfinite_param`` accepts ``"rollback"`` or ``"raise"``).
        detector: a configured :class:`~gradguard.detect.Detector` (default ``Detector()``).
        recovery: a :class:`~gradguard.recover.RecoveryPolicy`: LR back-off, rollback, snapshots (default
            ``RecoveryPolicy()``).
        scaler: a ``torch.amp.GradScaler``, when training with one.
        scheduler: an LR scheduler the Guard advances after each real (not skipped) step.
        accumulation_steps: micro-batches per optimizer step.
        log_every: steps between two flushes of the history to the host and the sinks.
        layer_every: steps between two records of per-layer norms (0: never).
        sinks: where flushed records go (``gradguard.sinks``).
        groups: how layers are formed for per-layer norms (``grad_stats``'s ``groups``: ``"module"`` or
            ``"param"``).
        process_group: the torch.distributed group (default: the world, when initialised).
        forensics: a :class:`~gradguard.forensics.Forensics` to explain bad steps (``guard.step(loss,
            batch=...)``); its ``keep`` must be at least ``accumulation_steps``.
        data_watch: a :class:`~gradguard.forensics.DataWatch` to flag samples whose loss stands out, every
            step (``guard.step(loss, batch=..., sample_losses=...)``; no host read); its flagged samples
            are events ``"data_outlier"`` of the flushed records.
        optimizer_step: for integrations only: the framework's original ``optimizer.step`` when the
            framework routes ``optimizer.step()`` to the Guard. By default the Guard calls
            ``optimizer.step()`` at each step (so a scheduler made after the Guard sees the step).
        compile: run the step's device arithmetic (detect, decide, the history row: ``gradguard.device_step``)
            through ``torch.compile`` once the detector's warm-up is over: a few fused kernels instead of ~80
            small ones (on a GPU, ~80 kernel launches a step), at the cost of a compilation (seconds) at the
            first steady step. Falls back to eager, with a warning, where it cannot compile.
    """

    #: Flushed records kept in ``guard.history`` (the oldest are dropped).
    MAX_HISTORY = 100_000

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: Clipper | str | None = "default",
        *,
        on_nonfinite: str = "skip",
        on_spike: str = "clip",
        on_loss_spike: str = "skip",
        responses: Mapping[str, str] | None = None,
        detector: Detector | None = None,
        recovery: RecoveryPolicy | None = None,
        scaler: Any = None,
        scheduler: Any = None,
        accumulation_steps: int = 1,
        log_every: int = 25,
        layer_every: int = 10,
        sinks: Sequence[Sink] | Iterable[Sink] = (),
        groups: str = "module",
        process_group: Any = None,
        forensics: Forensics | None = None,
        data_watch: DataWatch | None = None,
        optimizer_step: Callable[[], Any] | None = None,
        compile: bool = False,
    ):
        _check_model_and_optimizer(model, optimizer)
        if isinstance(clip, str) and clip == "default":
            clip = default_clip(model)
        if clip is not None and not isinstance(clip, Clipper):
            raise ValueError(f"Guard: clip must be a gradguard.clip strategy, \"default\" or None, got {clip!r}")
        if detector is not None and not isinstance(detector, Detector):
            raise ValueError(f"Guard: detector must be a gradguard.detect.Detector, got {type(detector).__name__}")
        if recovery is not None and not isinstance(recovery, RecoveryPolicy):
            raise ValueError(f"Guard: recovery must be a gradguard.RecoveryPolicy or None, got {recovery!r}")
        if groups not in _GROUPINGS:
            raise ValueError(f"Guard: groups must be one of {_GROUPINGS}, got {groups!r}")
        norm_type = clip.norm_type if clip is not None else 2.0
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise ValueError(f"Guard: clip.norm_type must be a number > 0 or inf, got {norm_type!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"Guard: compile must be True or False, got {compile!r}")
        if optimizer_step is not None and not callable(optimizer_step):
            raise ValueError(f"Guard: optimizer_step must be callable or None, got {optimizer_step!r}")
        self.responses = Responses.resolve(on_nonfinite, on_spike, on_loss_spike, responses)
        self.accumulation_steps = _int_at_least(accumulation_steps, 1, "accumulation_steps")
        if forensics is not None and not isinstance(forensics, Forensics):
            raise ValueError(f"Guard: forensics must be a gradguard.Forensics or None, got {forensics!r}")
        if forensics is not None and forensics.keep < self.accumulation_steps:
            raise ValueError(f"Guard: Forensics(keep={forensics.keep}) is less than accumulation_steps="
                             f"{self.accumulation_steps}: a bad step's micro-batches would not all be kept")
        if data_watch is not None and not isinstance(data_watch, DataWatch):
            raise ValueError(f"Guard: data_watch must be a gradguard.forensics.DataWatch or None, got {data_watch!r}")
        self.log_every = _int_at_least(log_every, 1, "log_every")
        self.layer_every = _int_at_least(layer_every, 0, "layer_every")
        if isinstance(sinks, (str, bytes)):
            raise ValueError(f"Guard: sinks must be a list of sinks, got the string {sinks!r} (for a file: "
                             "sinks=[gg.sinks.JSONL(path)])")
        # one sink given alone (sinks=gg.sinks.JSONL(path)) is taken as a list of one
        self.sinks: list[Sink] = [sinks] if _is_sink(sinks) else list(sinks)  # type: ignore[list-item]
        for i, sink in enumerate(self.sinks):
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise ValueError(f"Guard: sinks[{i}] must have write(records) and close(), got {sink!r}")

        _check_step_partners(scheduler, scaler, process_group)

        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self.detector = detector if detector is not None else Detector()
        self.scaler = scaler
        self.scheduler = scheduler
        self.groups = groups
        self.norm_type = float(norm_type)
        self.fused = _fused_amp_capable(optimizer)
        self.process_group = gg_dist.process_group_or_none(process_group)
        self._optimizer_step = optimizer_step
        # the model's parameters, then those the optimizer holds outside the model (an uncertainty-weighted
        # loss's weights): measured, checked and restored with the model's
        self._named: list[tuple[str, Tensor]] = list(model.named_parameters()) + _held_outside(model, optimizer)
        self._param_names = {id(p): name for name, p in self._named}
        self._layout = self._param_layout()  # what the per-step check compares (parameters changed mid-run)
        self._model_param_count = sum(1 for _ in model.parameters())
        rank = "" if self.process_group is None else f".rank{torch.distributed.get_rank(self.process_group)}"
        self.recovery = Recovery(recovery if recovery is not None else RecoveryPolicy(),
                                 TrainingState(model, optimizer, scheduler,
                                               [p for _, p in _held_outside(model, optimizer)]),
                                 fingerprint=self._run_fingerprint(rank), name_suffix=rank)
        self._has_dtensor = any(gg_dist._is_dtensor(p) for _, p in self._named)
        self._ceiling = clip.max_norm if isinstance(clip, GlobalNorm) else math.inf
        self._bit_weights: dict[torch.device, Tensor] = {}
        self._step_fn = DeviceStep(compile)
        self._step_configs: dict[tuple[DetectorStep, UpdateSizeStep | None], StepConfig] = {}
        # the update size (gradguard.update_size): off under FSDP2, whose sharded weights it does not copy
        self._update_size = None if self._has_dtensor else self.detector.update_size
        self._update_config: UpdateSizeStep | None = None
        self._layer_indexes: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

        self.history_buffer = History(capacity=self.log_every, layer_every=self.layer_every)
        self._history: deque[StepRecord] = deque(maxlen=self.MAX_HISTORY)
        self.step_count = 0  # optimizer steps (accumulation boundaries) guarded so far
        self.sync_gradients = True
        self._micro = 0
        self._loss_sum: Tensor | None = None
        self._counts: Tensor | None = None  # device, float32: [skipped, clipped]
        self._last_skip: Tensor | None = None  # the last step's skip flag, on the device
        self._last_skipped_host: bool | None = None
        self._in_flush = False
        self._closed = False
        # (parameter, its gradient, the gradient's version) at the last boundary: a second step on them is refused
        self._stepped_grads: list[tuple[Tensor, weakref.ref[Tensor], int]] = []
        self._dropped_records = 0  # records a sink failed to take (summary()["dropped_records"])
        self._failed_sinks: set[int] = set()  # sinks whose failure was warned already
        self.forensics = forensics
        self.data_watch = data_watch
        self._explained: dict[int, ForensicsRecord] = {}  # step -> its analysis, until its row is published
        if forensics is not None:
            if self._has_dtensor:
                raise ValueError("Guard: forensics does not support FSDP2 (DTensor parameters): its per-sample "
                                 "passes would enter the sharded model's collectives unevenly; leave it off")
            forensics.start(self._device(), self.process_group)

    # ------------------------------------------------------------------ the step

    def step(self, loss: Tensor | None = None, batch: Any = None, sample_losses: Tensor | None = None) -> Tensor:
        """Guard one optimizer step: measure, decide, apply (clip, then ``optimizer.step()``, or skip).

        Args:
            loss: this micro-batch's loss, a scalar tensor (unscaled; detached here), or None to skip the
                loss checks.
            batch: this micro-batch, for ``forensics`` (``gradguard.batch``'s convention); a reference is
                kept, nothing is computed on it unless the step goes bad. Ignored without forensics.
            sample_losses: this micro-batch's per-sample losses ``(B,)`` (``reduction="none"``), for
                ``data_watch`` (device ops only); needs ``Guard(data_watch=...)``.

        Returns:
            0-d bool device tensor, True when the optimizer stepped. Between accumulation boundaries
            nothing happens and it is False.
        """
        if self._closed:
            raise RuntimeError("Guard: step() after close()")
        loss = self._checked_loss(loss)
        boundary = self._micro + 1 >= self.accumulation_steps
        if boundary:
            self._check_gradients()
        if self.forensics is not None and batch is not None:
            self.forensics.remember(batch)
        if sample_losses is not None:
            if self.data_watch is None:
                raise ValueError("Guard.step: sample_losses is for a data watch: make the Guard with "
                                 "data_watch=gg.forensics.DataWatch()")
            self.data_watch.observe(sample_losses, batch, self.step_count)
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        if not boundary:
            self._micro += 1
            self.sync_gradients = False
            if self.forensics is not None:
                self.forensics.end_call()
            return torch.zeros((), dtype=torch.bool)
        self._micro = 0
        self.sync_gradients = True
        loss, self._loss_sum = self._loss_sum, None
        if self._param_layout() != self._layout:  # add_param_group since the last step (a host-side check)
            self._parameters_changed()
        if self.recovery.loss_level_due:  # a rollback replaced the weights, or a relevel moved the loss's level
            self._put_loss_level()
        self.recovery.start(self.step_count, before_flush=(self.step_count + 1) % self.log_every == 0)

        # 1. measure
        stats, loss = self._measure(loss)
        weights = weight_norm(p for _, p in self._named) if self.detector.precursor.wants_weights() else None
        # GlobalNorm's coefficient is decide's static ceiling (the same kernels); other scale strategies' own
        clip_coef = self.clip.coefficient(stats) if isinstance(self.clip, ScaleClipper) and not isinstance(
            self.clip, GlobalNorm) else None
        # the update size: the last sampled step's update, measured now, before this step's (update_size.py)
        update = self._update_inputs(stats)
        # 2. detect and decide: one pure function of device tensors (device_step.py; compiled with compile=True)
        # (distributed: every input is global already, so every rank takes the same decision; dist.py)
        out = self._device_step(stats, loss, weights, clip_coef, update)
        if clip_coef is not None:  # a skipped step teaches the clip strategy nothing (ScaleClipper.forget_last)
            assert isinstance(self.clip, ScaleClipper)
            self.clip.forget_last(out.skip)
        verdict = out.detector.verdict
        decision = Decision(skip=out.skip, coef=out.coef, ceiling=out.ceiling, flags=verdict.flags,
                            responses=self.responses)
        # forensics: a bad step is explained before the weights move (the step's one read, on both paths)
        code = None
        if self.forensics is not None:
            code = int(out.codes[0])
            self._explain(stats, loss, kinds_of(code >> 2))
        # 3. apply (on a sampled step, the weights are copied first: the update is measured at the next step)
        if update is not None and self._update_size is not None and self._update_size.samples_now:
            self._update_size.copy_before_step(stats.params, self._layer_index(stats), len(stats.names),
                                               update.log_lr)
        if self.fused:
            kinds, in_place = None, self._apply_fused(decision, stats, out)
        else:
            kinds, in_place = self._apply_eager(decision, stats, out.codes, code)
        if self.scaler is not None:
            self.scaler.update()
        if self._update_size is not None:
            self._update_size.stepped(out.stepped)
        # 4. record; the host side of the step (plain optimizers: now; fused: at the flush)
        self._record(stats, loss, out, in_place)
        if kinds is not None:
            assert self._last_skipped_host is not None
            try:
                self.recovery.after_step(self.step_count, kinds, self.responses, self._last_skipped_host,
                                         now=self.step_count, loss_given=loss is not None,
                                         scaler_overflow=self._scaler_overflow(kinds),
                                         nonfinite_weight=self._nonfinite_weight(kinds), loss=loss)
            except GiveUp as give_up:
                # the step happened (it was skipped and recorded): count it before the account is taken, as the
                # fused path does, whose give-up comes at the flush after the count
                self.step_count += 1
                self._give_up(give_up)
        self._remember_gradients()
        self.step_count += 1
        if self.forensics is not None:
            self.forensics.end_call()
        if self.step_count % self.log_every == 0:
            self.flush()
        return out.stepped

    def _put_loss_level(self) -> None:
        """Put the detector's loss level where recovery says (``Recovery.loss_level_due``): after a relevel, at the
        level the losses moved to; after a rollback, at the restored weights' own loss, and the signals that
        measured the weights that are gone start over."""
        relevel, self.recovery.loss_level = self.recovery.loss_level, None
        self.recovery.loss_level_due = False
        if relevel is not None:
            self.detector.set_loss_level(relevel)
            return
        snapshot = self.recovery.snapshot
        own = snapshot.loss
        if own is None and snapshot.step is not None:
            # the snapshot's own step is not flushed yet (a rollback early in a flush interval): its loss is in the
            # history's unread rows (one read, at a rollback only). Left unknown, the old level scored every loss
            # of the restored weights a spike: 10 skips, then a second rollback to the same weights
            own = self.history_buffer.loss_of(snapshot.step)
        self.detector.set_loss_level(own)
        if self._update_size is not None:
            self._update_size.drop_copy()  # a copy of weights that are gone measures no update
        self.detector.precursor.weights_replaced()  # nor is their fall in the norm a growth

    def _nonfinite_weight(self, kinds: Sequence[str]) -> str | None:
        """At a NaN/Inf loss (plain path), the first weight holding NaN/Inf (None: all finite): one pass over the
        weights and one read, on such steps only, so that NaN weights are rolled back at the first loss they
        spoil instead of at the flush, after up to ``log_every`` NaN losses counted against the LR. Every rank
        sees the same loss events, so the check (all-reduced) is taken on all of them."""
        if "nonfinite_loss" not in kinds:
            return None
        named = self._named_local()
        bad = int(nonfinite_layer(named)) if named else -1
        finite, layer, _ = self._all_ranks_finite(named[bad][0] if bad >= 0 else None, False)
        return None if finite else (layer or "?")

    def _param_layout(self) -> tuple[int, ...]:
        """The number of parameters in each of the optimizer's groups: O(groups), checked every step."""
        return tuple(len(group["params"]) for group in self.optimizer.param_groups)

    def _parameters_changed(self) -> None:
        """Parameters were added mid-run (``optimizer.add_param_group``, gradual unfreezing; or a module added
        to the model, noticed at a flush): measure and check them from now on, and start the snapshots
        afresh from the state as this step begins (the old snapshot cannot be loaded into the new optimizer:
        a rollback never crosses the change). The rollback budget starts afresh with it."""
        before = {name for name, _ in self._named}
        self._named = list(self.model.named_parameters()) + _held_outside(self.model, self.optimizer)
        self._param_names = {id(p): name for name, p in self._named}
        self._has_dtensor = any(gg_dist._is_dtensor(p) for _, p in self._named)
        self._layout = self._param_layout()
        self._model_param_count = sum(1 for _ in self.model.parameters())
        self.recovery.state.outside = [p for _, p in _held_outside(self.model, self.optimizer)]
        added = [user_name(name) for name, _ in self._named if name not in before]
        self.recovery.parameters_changed(self.step_count, added)

    def _scaler_overflow(self, kinds: Sequence[str]) -> bool:
        """A step whose only event is a non-finite gradient, under a GradScaler: the scaler's overflow (it
        halves its scale), not evidence against the weights or the learning rate."""
        return self.scaler is not None and list(kinds) == ["nonfinite_grad"]

    def _checked_loss(self, loss: Any) -> Tensor | None:
        if loss is None:
            return None
        if not isinstance(loss, Tensor):
            raise ValueError(f"Guard.step: loss must be a scalar tensor or None, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"Guard.step: loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}; "
                "reduce it first (e.g. loss.mean())"
            )
        if loss.is_complex() or not loss.is_floating_point():
            raise ValueError(f"Guard.step: loss must be a real floating-point tensor, got dtype {loss.dtype} (a "
                             "loss that can be backpropagated: float32, float16, bfloat16 or float64)")
        return loss.detach()

    def _check_gradients(self) -> None:
        if not any(p.grad is not None for _, p in self._named):
            raise RuntimeError(
                "Guard.step: no parameter of the model has a gradient: call loss.backward() before "
                "guard.step(), and check that some parameters require grad (all frozen?). Nothing was done "
                "and no step was counted."
            )
        if self._stepped_grads and all(ref() is p.grad and p.grad is not None and p.grad._version == version
                                       for p, ref, version in self._stepped_grads):
            raise RuntimeError(
                "Guard.step: the gradients are those of the last guarded step (no backward since; the "
                "gradients' version counters are unchanged): a second step would apply them twice. Call "
                "optimizer.zero_grad() and loss.backward() before guard.step(). Nothing was done and no "
                "step was counted."
            )

    def _remember_gradients(self) -> None:
        """The gradients this step used, by identity and version counter (host-side, no device read): a
        backward, ``zero_grad`` or any write to them since changes one of them. Not for DTensor parameters,
        whose gradient wrappers do not carry the local shard's version."""
        if self._has_dtensor:
            return
        self._stepped_grads = [(p, weakref.ref(p.grad), p.grad._version) for _, p in self._named
                               if p.grad is not None]

    def _measure(self, loss: Tensor | None) -> tuple[GradStats, Tensor | None]:
        """Unscale (GradScaler), then the gradients' norms, all-reduced when distributed."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        named, sharded = self._named, None
        if self._has_dtensor:
            named, sharded = gg_dist.local_named_parameters(named)
        stats = named_grad_stats(named, self.groups, self.norm_type)
        if self.process_group is not None:
            stats, loss = gg_dist.all_reduce_stats(stats, loss, self.process_group, sharded)
        return stats, loss

    def _update_inputs(self, stats: GradStats) -> UpdateInputs | None:
        """The update size's inputs for this step: its state, the learning rate about to be used, the last sampled
        step's update (measured now, from the transient copy); None when the signal is off."""
        sizes = self._update_size
        if sizes is None or not stats.names:
            return None
        measurement = sizes.measure()
        if measurement is not None and measurement.layer_ratio.shape[0] != len(stats.names):
            measurement = None  # measured over another set of layers (one without a gradient now): not comparable
        device = stats.total_norm.device
        state, config = sizes.begin(len(stats.names), device, measurement is not None)
        self._update_config = config
        return UpdateInputs(state=state, log_lr=log_lr(self.optimizer.param_groups[0]["lr"], device),
                            measurement=measurement)

    def _layer_index(self, stats: GradStats) -> Tensor:
        """The layer of each parameter of ``stats``, as a device tensor (made once per layout)."""
        key = (tuple(stats.group_index), stats.total_norm.device)
        if key not in self._layer_indexes:
            self._layer_indexes = {key: torch.tensor(stats.group_index, dtype=torch.int64,
                                                     device=stats.total_norm.device)}
        return self._layer_indexes[key]

    def _device_step(self, stats: GradStats, loss: Tensor | None, weights: Tensor | None,
                     clip_coef: Tensor | None, update: UpdateInputs | None) -> StepOutput:
        """Detect, decide and build the history row (``gradguard.device_step``), then keep the detector's state
        (and the update size's)."""
        state, constants, detector_config = self.detector.begin(stats, loss is not None, weights is not None)
        update_config = self._update_config if update is not None else None
        config = self._step_configs.get((detector_config, update_config))
        if config is None:  # one object per kind of step: a compiled step sees the same one
            config = StepConfig(detector=detector_config, ceiling=self._ceiling,
                                record=self.clip is None or isinstance(self.clip, ScaleClipper), fused=self.fused,
                                update=update_config)
            self._step_configs[(detector_config, update_config)] = config
        steady = detector_config.ema and detector_config.growth_full and detector_config.precursor.warm and not (
            detector_config.precursor.first_update)
        device = stats.total_norm.device
        out = self._step_fn(stats.total_norm, stats.finite, stats.norms, loss, state, weights, clip_coef,
                            self._counts, update, constants, self._code_weights(device), self.responses, config,
                            steady=steady)
        self.detector.commit(out.detector, detector_config)
        if self._update_size is not None and update_config is not None and out.update_state is not None:
            self._update_size.keep(out.update_state, update_config)
        return out

    def _call_optimizer_step(self) -> None:
        if self._optimizer_step is not None:
            self._optimizer_step()
        else:
            self.optimizer.step()

    def _in_place_clip(self, stats: GradStats) -> ClipResult | None:
        """Strategies that clip per layer, unit or element (not a scale) clip the gradients themselves."""
        if self.clip is None or isinstance(self.clip, ScaleClipper):
            return None
        return self.clip.clip_(stats)

    def _explain(self, stats: GradStats, loss: Tensor | None, kinds: list[str]) -> None:
        """Forensics of a bad step (``gradguard.forensics``); a healthy step's layer norms join its history."""
        assert self.forensics is not None
        bad = [kind for kind in kinds if kind in ANALYSED_KINDS]
        if bad:
            self._explained[self.step_count] = self.forensics.analyse(
                self.model, stats, bad, self.step_count, loss, self._config())
        self.forensics.end_step(None if kinds else stats.norms)

    def _config(self) -> dict[str, Any]:
        """The Guard's configuration, as plain values (for replay bundles)."""
        detector = {k: v for k, v in vars(self.detector).items() if isinstance(v, (int, float, str))}
        return {"responses": dict(self.responses.by_kind), "clip": repr(self.clip), "detector": detector,
                "accumulation_steps": self.accumulation_steps, "groups": self.groups,
                "norm_type": self.norm_type, "fused": self.fused}

    def _apply_eager(self, decision: Decision, stats: GradStats, codes: Tensor,
                     code: int | None = None) -> tuple[list[str], Tensor | None]:
        """A plain optimizer: one host read (skip, scale, event flags; ``code``, when forensics read it
        already), then clip and step, or nothing."""
        if code is None:
            code = int(codes[0])  # the one host read of the step
        skipped = bool(code & 1)
        in_place = None
        if not skipped:
            result = self._in_place_clip(stats)
            in_place = None if result is None else result.coef
            if code & 2:
                scale_grads_(stats.grads, decision.coef)
            self._call_optimizer_step()
            if self.scheduler is not None:
                self.scheduler.step()
        self._last_skipped_host = skipped
        return kinds_of(code >> 2), in_place

    def _apply_fused(self, decision: Decision, stats: GradStats, out: StepOutput) -> Tensor | None:
        """A fused optimizer takes the decision itself: it divides by ``grad_scale`` and skips on ``found_inf``
        (``coef`` is 1 on a skipped step, so ``grad_scale = 1 / coef`` either way)."""
        result = self._in_place_clip(stats)
        opt: Any = self.optimizer
        if not (self._momentum_buffers_missing() and bool(decision.skip)):  # a read until SGD's first step
            # with a GradScaler the gradients were unscaled already (stage UNSCALED): only our coefficient
            opt.grad_scale = out.grad_scale
            opt.found_inf = out.bits[0]  # the skip flag as 0.0 / 1.0
            try:
                self._call_optimizer_step()
            finally:
                del opt.grad_scale
                del opt.found_inf
        if self.scheduler is not None:
            self._last_skipped_host = bool(decision.skip)  # the one read: the scheduler must know
            if not self._last_skipped_host:
                self.scheduler.step()
        else:
            self._last_skipped_host = None
        return None if result is None else result.coef

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

    def _code_weights(self, device: torch.device) -> Tensor:
        if device not in self._bit_weights:
            self._bit_weights[device] = code_weights(len(STEP_KINDS), device)
        return self._bit_weights[device]

    def _record(self, stats: GradStats, loss: Tensor | None, out: StepOutput, in_place: Tensor | None) -> None:
        """One row of history on the device (``FIELDS`` as float32): the step's, or, when a per-layer / per-element
        strategy clipped the gradients itself (``in_place``, its coefficient), one that says so."""
        row, counts = out.row, out.counts
        if row is None or in_place is not None:
            device = stats.total_norm.device
            recorded_loss = self.responses.constant(math.nan, torch.float32, device) if loss is None else loss
            row, step_counts = history_row(recorded_loss, out.detector.verdict, stats.total_norm, out.coef,
                                           out.ceiling, out.skip, out.flags, out.bits, out.codes, in_place,
                                           out.update)
            counts = step_counts if self._counts is None else self._counts + step_counts
        assert counts is not None
        self._counts = counts
        self._last_skip = out.skip
        lr = self.optimizer.param_groups[0]["lr"]
        lr = float(lr) if not isinstance(lr, Tensor) else float("nan")  # a tensor LR is not read per step
        layer_norms = stats.norms if self.layer_every and self.step_count % self.layer_every == 0 else None
        self.history_buffer.record(self.step_count, row, lr, stats.names, layer_norms)

    def _give_up(self, give_up: GiveUp) -> None:
        """Restore the last good snapshot first (``Recovery.diverged``), then publish what is on the device
        (so the account and the sinks have it: a sink that fails now cannot leave NaN weights behind), then
        raise."""
        records = None if self._in_flush else self._drain()[0]  # read first: the account lists their events
        diverged = self.recovery.diverged(give_up, self.summary())
        if records is not None:
            self._publish(records)
        raise diverged from None

    # ------------------------------------------------------------------ flush

    def _drain(self) -> tuple[list[StepRecord], list[float], str | None, bool]:
        """Rows since the last flush as records, their loss z-scores, the name of the first tensor holding
        NaN/Inf among the weights and the optimizer state (None: all finite), and whether the snapshot
        candidate holds any: all in one transfer (the checks are device passes queued before it)."""
        checked = self._named_local() + self._optimizer_state_named()
        flags = [nonfinite_layer(checked).float().reshape(1)] if checked else []
        candidate_check = self.recovery.candidate.nonfinite
        if candidate_check is not None:
            flags.append(candidate_check.float().reshape(1).to(flags[0].device if flags else self._device()))
        rows, extra = self.history_buffer.drain(extra=torch.cat(flags) if flags else None)
        records = [to_record(row, self.responses) for row in rows]
        for record in records:
            self.recovery.recent.extend(record["events"])
        bad = int(extra[0]) if checked else -1
        candidate_bad = candidate_check is not None and extra[-1] > 0
        return records, [row["loss_z"] for row in rows], (checked[bad][0] if bad >= 0 else None), candidate_bad

    def _optimizer_state_named(self) -> list[tuple[str, Tensor]]:
        """Every floating tensor of the optimizer state, named after its parameter and key (``"0.weight
        (optimizer state 'exp_avg_sq')"``): NaN/Inf there (an idle head's Adam moments) is as bad as in
        the weights. Local shards for DTensors. A pass over the state at each flush, never per step."""
        names = self._param_names
        named = []
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
                    local = value.to_local() if gg_dist._is_dtensor(value) else value  # type: ignore[attr-defined]
                    named.append((f"{names.get(id(p), '?')} (optimizer state {key!r})", local))
        return named

    def _named_local(self) -> list[tuple[str, Tensor]]:
        return gg_dist.local_named_parameters(self._named)[0] if self._has_dtensor else self._named

    def flush(self) -> list[StepRecord]:
        """Copy the history to the host (one transfer), run the host-side recovery, write to the sinks.

        Returns the records flushed. Called every ``log_every`` steps by ``step``.
        """
        self._in_flush = True
        give_up: GiveUp | None = None
        diverged: TrainingDiverged | None = None
        try:
            records, loss_z, bad_name, candidate_bad = self._drain()
            self.recovery.note_losses(records)
            try:
                finite, layer, candidate_finite = self._all_ranks_finite(bad_name, candidate_bad)
                bad = None if finite else (layer or "?")
                rolled_back = False
                if self.fused:  # the host decisions of these steps were deferred to now
                    onset = _nan_weights_onset(records) if bad is not None else None
                    for index, record in enumerate(records):
                        kinds = [event["kind"] for event in record["events"]]
                        rolled_back = self.recovery.after_step(
                            record["step"], kinds, self.responses, record["skipped"], now=self.step_count - 1,
                            loss_given="nonfinite_loss" in kinds or not math.isnan(record["loss"]),
                            scaler_overflow=self._scaler_overflow(kinds),
                            nonfinite_weight=bad if index == onset else None, loss=record["loss"],
                        )
                        if rolled_back:
                            break  # later rows came from the state just abandoned (or the loss level replaced)
                if not rolled_back:
                    self.recovery.at_flush(records, loss_z, bad, self.responses["nonfinite_param"], self.step_count,
                                           candidate_finite)
            except GiveUp as exc:
                give_up = exc
            # restore first, then anything that can fail: the sinks get the records after the snapshot is back
            diverged = None if give_up is None else self.recovery.diverged(give_up, self.summary())
            self._publish(records)
        finally:
            self._in_flush = False
        if diverged is not None:
            raise diverged from None
        if sum(1 for _ in self.model.parameters()) != self._model_param_count:  # a module added: measure it
            self._parameters_changed()
        return records

    def _all_ranks_finite(self, bad_name: str | None, candidate_bad: bool) -> tuple[bool, str | None, bool]:
        """Whether every rank's weights and optimizer state are finite, the first bad one's name on this
        rank, and whether every rank's snapshot candidate is finite."""
        nonfinite = bad_name is not None
        if self.process_group is not None:
            flags = torch.tensor([float(nonfinite), float(candidate_bad)], device=self._device())
            reduced = gg_dist.all_reduce_max_(flags, self.process_group).tolist()  # flush-time only
            nonfinite, candidate_bad = reduced[0] > 0, reduced[1] > 0
        return not nonfinite, None if bad_name is None else user_name(bad_name), not candidate_bad

    def _publish(self, records: list[StepRecord]) -> None:
        actions = self.recovery.actions
        for record in records:
            explained = self._explained.pop(record["step"], None)
            for event in record["events"]:
                if explained is not None and event["kind"] in ANALYSED_KINDS:
                    event["forensics"] = dict(explained)
            record["events"].extend(actions.pop(record["step"], []))
        if self.data_watch is not None:
            self._attach_suspects(records)
        if actions and records:  # actions noted for a step whose row was already published
            last = records[-1]
            for step in sorted(actions):
                last["events"].extend(actions.pop(step))
        self._history.extend(records)
        for sink in self.sinks:
            self._call_sink(sink, "write", records)

    def _call_sink(self, sink: Sink, method: str, records: list[StepRecord] | None = None) -> None:
        """A sink's ``write(records)`` or ``close()``, isolated: a sink is a side channel, and its failure (a
        full disk, a tracker's network) never stops training nor replaces the Guard's own exception. The
        first failure of each sink is warned, naming the sink and the error; the records a sink failed to
        take are counted in ``summary()["dropped_records"]``. (Megatron-LM's rerun state machine logs a
        failed tracker write the same way.)"""
        try:
            if records is None:
                sink.close()
            else:
                sink.write(records)
        except Exception as error:
            if records is not None:
                self._dropped_records += len(records)
            if id(sink) not in self._failed_sinks:
                self._failed_sinks.add(id(sink))
                warnings.warn(f"gradguard: sink {sink!r} failed in {method}() ({type(error).__name__}: {error}); "
                              "training goes on, and its records are counted in guard.summary()"
                              "['dropped_records']", RuntimeWarning, stacklevel=4)

    def _attach_suspects(self, records: list[StepRecord]) -> None:
        """The data watch's flagged samples (its one read per flush) as a ``"data_outlier"`` event of their
        step's record (of the last record when their step's row was published already)."""
        assert self.data_watch is not None
        by_step: dict[int, list[Any]] = {}
        for suspect in self.data_watch.drain():
            by_step.setdefault(suspect["step"], []).append(suspect)
        rows = {record["step"]: record for record in records}
        for step, suspects in sorted(by_step.items()):
            record = rows.get(step, records[-1] if records else None)
            if record is None:
                continue
            record["events"].append({
                "step": step, "kind": "data_outlier", "layer": None, "action": "log",
                "samples": [s["id"] for s in suspects], "scores": [s["z"] for s in suspects],
                "losses": [s["loss"] for s in suspects]})

    def _device(self) -> torch.device:
        return self._named[0][1].device if self._named else torch.device("cpu")

    # ------------------------------------------------------------------ reading

    @property
    def history(self) -> list[StepRecord]:
        """The records flushed so far (oldest first; at most ``MAX_HISTORY``). See ``gradguard.history``."""
        return list(self._history)

    @property
    def bad_samples(self) -> list[BadSample]:
        """Every sample forensics named so far, ``{"id", "step", "score"}`` (empty without forensics)."""
        return [] if self.forensics is None else list(self.forensics.bad_samples)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last guarded step was skipped (a host read on the fused path without scheduler)."""
        if self._last_skipped_host is not None:
            return self._last_skipped_host
        return self._last_skip is not None and bool(self._last_skip)

    def summary(self) -> dict[str, int]:
        """``{"steps", "skipped", "clipped", "rollbacks", "lr_backoffs", "dropped_records"}`` as ints (one host
        read); ``dropped_records``: records that a sink failed to take (summed over the sinks)."""
        skipped, clipped = (0, 0) if self._counts is None else (int(v) for v in self._counts.tolist())
        return {
            "steps": self.step_count,
            "skipped": skipped,
            "clipped": clipped,
            "rollbacks": self.recovery.rollbacks,
            "lr_backoffs": self.recovery.lr_backoffs,
            "dropped_records": self._dropped_records,
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
                self._call_sink(sink, "close")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        """What a state must match to be loaded here: parameter names, shapes and dtypes, the kinds of
        optimizer, clip strategy and detector, the grouping and the flush window."""
        return {
            "params": [[name, list(p.shape), str(p.dtype).removeprefix("torch.")] for name, p in self._named],
            "optimizer": type(self.optimizer).__name__,
            "param_groups": [len(group["params"]) for group in self.optimizer.param_groups],
            "clip": None if self.clip is None else type(self.clip).__name__,
            "detector": type(self.detector).__name__,
            "groups": self.groups,
            "log_every": self.log_every,
        }

    def _run_fingerprint(self, rank: str) -> str:
        """A short hash of :meth:`_fingerprint` and the rank, written into each snapshot file: a file of
        another model, optimizer or rank is never restored."""
        text = json.dumps([self._fingerprint(), rank], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Detector, clipper, counters, recovery (policy state, snapshot, action log) and unflushed history:
        a resumed Guard continues exactly as the uninterrupted one would (save it with the model and the
        optimizer).

        An in-memory snapshot is part of it (a copy of the model and optimizer state); with
        ``snapshot_dir`` only the snapshot's step is, and the file stays where it is."""
        state: dict[str, Any] = clone_tree({
            "format": STATE_FORMAT,
            "fingerprint": self._fingerprint(),
            "detector": self.detector.state_dict(),
            "clip": self.clip.state_dict() if self.clip is not None else {},
            "step_count": self.step_count,
            "micro": self._micro,
            "loss_sum": self._loss_sum,
            "counts": self._counts,
            "recovery": self.recovery.state_dict(),
            "history": self.history_buffer.state_dict(),
        })
        return state

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming what differs when ``state`` was not saved by a Guard over a model and
        optimizer like these (names, shapes, dtypes, kinds); change nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(f"Guard.load_state_dict: state must be a dict, got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"Guard.load_state_dict: state is missing {missing} (not a complete Guard state)")
        if state["format"] != STATE_FORMAT:
            raise ValueError(
                f"Guard.load_state_dict: state format {state['format']!r}, this Guard reads {STATE_FORMAT!r}"
            )
        theirs, ours = state["fingerprint"], self._fingerprint()
        their_params = {name: (shape, dtype) for name, shape, dtype in theirs.get("params", [])}
        our_params = {name: (shape, dtype) for name, shape, dtype in ours["params"]}
        only_theirs = sorted(set(their_params) - set(our_params))
        only_ours = sorted(set(our_params) - set(their_params))
        if only_theirs or only_ours:
            raise ValueError(
                "Guard.load_state_dict: the state is of another model: parameters only in the state: "
                f"{only_theirs[:5]}, only in this model: {only_ours[:5]}"
            )
        for name, (shape, dtype) in our_params.items():
            if their_params[name] != (shape, dtype):
                raise ValueError(
                    f"Guard.load_state_dict: parameter {name!r} is {their_params[name][0]} "
                    f"{their_params[name][1]} in the state, {shape} {dtype} in this model"
                )
        for key in ours:
            if key != "params" and theirs.get(key) != ours[key]:
                raise ValueError(f"Guard.load_state_dict: {key} differs: state has {theirs.get(key)!r}, "
                                 f"this Guard has {ours[key]!r}")
        snapshot = state["recovery"]["snapshot"]["state"]
        if snapshot is not None:
            model_state = self.model.state_dict()
            saved = snapshot["model"]
            if set(saved) != set(model_state):
                raise ValueError(
                    "Guard.load_state_dict: the snapshot's model state has other entries than this model: "
                    f"{sorted(set(saved) ^ set(model_state))[:5]}"
                )
            for key, value in saved.items():
                if tuple(value.shape) != tuple(model_state[key].shape):
                    raise ValueError(f"Guard.load_state_dict: the snapshot's {key!r} has shape "
                                     f"{tuple(value.shape)}, this model's {tuple(model_state[key].shape)}")
            self._check_snapshot_optimizer(snapshot["optimizer"])
            flag = nonfinite_flag(snapshot)
            if flag is not None and bool(flag):  # load time: one host read
                raise ValueError("Guard.load_state_dict: the snapshot holds NaN/Inf (weights or optimizer state): "
                                 "a rollback would restore them; it is not a good snapshot")
        self._check_detector_state(state["detector"])

    def _check_snapshot_optimizer(self, saved: Any) -> None:
        """The snapshot's optimizer state must be one this optimizer can load: the same groups, the same
        number of parameters in each, the same hyperparameter keys (an Adam state has ``betas``, an SGD one
        ``momentum``)."""
        ours = self.optimizer.state_dict()["param_groups"]
        theirs = saved.get("param_groups") if isinstance(saved, Mapping) else None
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            raise ValueError(f"Guard.load_state_dict: the snapshot's optimizer state has "
                             f"{len(theirs) if isinstance(theirs, list) else 'no'} parameter groups, this optimizer "
                             f"{len(ours)}")
        for i, (their_group, our_group) in enumerate(zip(theirs, ours)):
            their_keys, our_keys = set(their_group) - {"params"}, set(our_group) - {"params"}
            if their_keys != our_keys or len(their_group["params"]) != len(our_group["params"]):
                raise ValueError(
                    f"Guard.load_state_dict: the snapshot's optimizer group {i} is not of this optimizer "
                    f"({type(self.optimizer).__name__}): its settings {sorted(their_keys ^ our_keys)[:6]} differ, "
                    f"{len(their_group['params'])} parameters against {len(our_group['params'])}")

    @staticmethod
    def _check_detector_state(detector: Any) -> None:
        """The detector's moving statistics must have one slot per scored value: total, loss, each layer."""
        names = detector["layer_names"]
        scores = detector["scores"]
        if names is None:
            return
        width = 2 + len(names)
        for key in ("seen", "mean", "var"):
            value = scores.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.shape[-1] != width):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Guard.load_state_dict: the detector's {key} has shape {shape}, but "
                                 f"{len(names)} layers need {width} slots (total, loss, one per layer)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`: checked first (:meth:`check_state_dict`), then applied all
        at once; if applying fails, the Guard is put back as it was."""
        self.check_state_dict(state)
        before = self.state_dict()
        try:
            self._apply_state(clone_tree(dict(state)))
        except Exception as error:
            self._apply_state(before)
            raise ValueError(f"Guard.load_state_dict: the state does not fit this Guard ({error}); "
                             "nothing was changed") from error

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.clip is not None:
            self.clip.load_state_dict(state["clip"])
        self.step_count = int(state["step_count"])
        self._micro = int(state["micro"])
        self._loss_sum = state["loss_sum"]
        self._counts = state["counts"]
        self.recovery.load_state_dict(state["recovery"])
        self.history_buffer.load_state_dict(state["history"])

"""Hugging Face ``transformers.Trainer``: ``GradGuardCallback`` puts a :class:`gradguard.Guard` in the run.

::

    from gradguard.integrations.transformers import GradGuardCallback

    args = TrainingArguments(...)                           # max_grad_norm 1.0: the Guard clips to it
    trainer = Trainer(model, args, ..., callbacks=[GradGuardCallback()])

    args = TrainingArguments(..., max_grad_norm=0)          # another clip: the Guard's, not the Trainer's
    trainer = Trainer(model, args, ..., callbacks=[GradGuardCallback(clip=gg.clip.ZClip())])

The Trainer's clip (``max_grad_norm``, 1.0 by default) becomes the Guard's: ``clip=GlobalNorm(max_grad_norm)``,
applied by ``guard.step`` on the gradients as the backward pass left them (so a NaN in one layer is seen in that
layer, not spread by the clip into all of them). A run that follows the Trainer's defaults keeps its clip (with
none, a tiny BERT masked LM of ``max_grad_norm=0`` ended 0.7-1.1% above the Trainer's own run, 3 of 3 seeds;
with it, equal). Another ``clip=`` given to the callback needs ``max_grad_norm=0``: two clips are refused.

How it hooks in: at each accumulation boundary the Trainer (transformers 4.5x-5.x) first clips with
``accelerator.clip_grad_norm_(params, max_grad_norm)`` when ``max_grad_norm > 0``, or measures the gradient norm
for its logs with ``accelerator.clip_grad_norm_(params, inf)``, then calls ``optimizer.step()`` on accelerate's ``AcceleratedOptimizer``. That norm
call multiplies every gradient by ``inf / norm``: by NaN when one layer's gradient is NaN, which would make
every layer look poisoned (and it is one more pass over the gradients). So when training begins the
callback builds a Guard over the wrapped torch optimizer (and accelerate's ``GradScaler``, when there is
one) and takes that norm call (the first of a boundary) for itself: there ``guard.step`` sees the gradients as the backward pass left
them, measures, clips, and steps or skips; the Trainer's ``optimizer.step()`` that follows does nothing
more. The Trainer then has no ``grad_norm`` of its own: the callback logs the Guard's (below). Where the
Trainer makes no such call (older versions), ``guard.step`` runs at ``optimizer.step()``. A skipped step
is reported to the Trainer the way accelerate reports an fp16 overflow (``optimizer_step_was_skipped``), so
the LR scheduler is not advanced. The loss is taken from the model's output (``output.loss``) with a
forward hook, in training mode only. With ``forensics=gg.Forensics()`` each training micro-batch (the keyword
inputs the Trainer calls the model with) is handed to it by a forward pre-hook; the loss is then
``output.loss``, as the Trainer computes it.

Flushed records are appended to ``trainer.state.log_history`` (tags of :func:`gradguard.sinks.scalars_of`)
with the Trainer's step numbers: ``global_step`` after that optimizer step, 1 for the first.

The trackers of ``report_to`` (W&B, MLflow, TensorBoard, ...) get the Guard's numbers in the Trainer's own
log rows: at each ``on_log`` (every ``logging_steps``) the callback flushes the Guard (one host read, where
the Trainer itself reads the loss) and adds :func:`logs_of` the steps since the last row: ``grad_norm``
again (the Guard's norm), ``gradguard/*`` and ``gradguard_events/<kind>/<layer>``. So a run that already
reports to a tracker needs no gradguard sink; ``logging_steps=1`` gives every step its row. The callback
puts itself first among the Trainer's callbacks, so that the reporting callbacks see what it adds.

Supported: one optimizer, gradient accumulation, fp16 with accelerate's GradScaler and bf16. Not
supported: a ``clip`` option with ``max_grad_norm > 0`` (an error at the start), DeepSpeed (its engine owns the
step), XLA, and LOMO optimizers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradguard.clip import GlobalNorm
from gradguard.guard import Guard
from gradguard.integrations import check_guard_options
from gradguard.sinks import Record, event_scalars, scalars_of, step_scalars


def logs_of(records: Sequence[Record]) -> dict[str, float]:
    """What a Trainer log row gets from the Guard's steps since the last row (oldest first).

    The last step's scalars (:func:`gradguard.sinks.step_scalars`; ``grad_norm`` is its total norm, as the
    Trainer's own ``grad_norm`` is its last step's), except the counts, which are summed over the steps:
    ``gradguard/skipped``, ``gradguard/clipped``, ``gradguard/rollback``, ``gradguard/lr_backoff`` and the
    events' ``gradguard_events/<kind>/<layer>``. Empty when there is no step.
    """
    if not records:
        return {}
    logs = step_scalars(records[-1])
    for key in ("skipped", "clipped", "rollback", "lr_backoff"):
        logs[f"gradguard/{key}"] = sum(step_scalars(record)[f"gradguard/{key}"] for record in records)
    for record in records:
        for tag, count in event_scalars(record).items():
            logs[tag] = logs.get(tag, 0.0) + count
    logs["grad_norm"] = logs["gradguard/total_norm"]
    return logs


class LogHistorySink:
    """Appends each flushed record's scalars to the Trainer's ``state.log_history``, at the Trainer's step:
    ``first_step`` (the ``global_step`` training started from) + the Guard's 0-based step + 1."""

    def __init__(self, state: TrainerState, first_step: int = 0):
        self.state = state
        self.first_step = first_step

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self.state.log_history.append({**scalars_of(record), "step": self.first_step + record["step"] + 1})

    def close(self) -> None:
        pass


class PendingSink:
    """Keeps the flushed records until the Trainer's next log row takes them (:func:`logs_of`)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    def take(self) -> list[Record]:
        records, self.records = self.records, []
        return records

    def close(self) -> None:
        pass


class GradGuardCallback(TrainerCallback):
    """A ``TrainerCallback`` that drives a :class:`gradguard.Guard`; ``callback.guard`` once training begins.

    Args:
        **guard_options: passed to ``gg.Guard`` (``clip``, ``on_nonfinite``, ``on_spike``, ``log_every``,
            ``sinks``, ...). ``model``, ``optimizer``, ``scaler``, ``scheduler`` and ``accumulation_steps``
            come from the Trainer; ``clip`` too, as ``GlobalNorm(max_grad_norm)``, when ``max_grad_norm > 0``
            (the Trainer's default 1.0) and no ``clip`` is given.
    """

    def __init__(self, **guard_options: Any):
        check_guard_options(
            guard_options, "GradGuardCallback", reserved=("scaler", "scheduler", "accumulation_steps", "optimizer_step")
        )
        self.guard_options = guard_options
        self.guard: Guard | None = None
        self._accelerated: Any = None
        self._accelerator: Any = None
        self._stepped = False  # guard.step ran at the Trainer's norm call of this boundary
        self._hook: Any = None
        self._batch_hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._pending = PendingSink()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        options = dict(self.guard_options)
        if args.max_grad_norm and args.max_grad_norm > 0:
            if "clip" in options:
                raise ValueError(
                    f"GradGuardCallback: clip={options['clip']!r} and TrainingArguments(max_grad_norm="
                    f"{args.max_grad_norm}) are two clips: set max_grad_norm=0 to use the callback's clip, or drop "
                    "clip= to clip to max_grad_norm"
                )
            options["clip"] = GlobalNorm(args.max_grad_norm)  # the Trainer's clip, on the raw gradients
        forensics = self.guard_options.get("forensics")
        if forensics is not None and forensics.keep < args.gradient_accumulation_steps:
            raise ValueError(f"GradGuardCallback: Forensics(keep={forensics.keep}) is less than "
                             f"gradient_accumulation_steps={args.gradient_accumulation_steps}")
        model, accelerated = kwargs["model"], kwargs["optimizer"]
        optimizer = getattr(accelerated, "optimizer", accelerated)  # the torch optimizer inside accelerate's
        options["sinks"] = [*options.get("sinks", ()), LogHistorySink(state, first_step=state.global_step),
                            self._pending]
        self.guard = Guard(model, optimizer, scaler=getattr(accelerated, "scaler", None), **options)
        self._accelerated = accelerated
        accelerated.step = self._guarded_step
        trainer = _calling_trainer()
        self._accelerator = getattr(trainer, "accelerator", None)
        if trainer is not None:  # first, so that the reporting callbacks' on_log see the rows it adds to
            callbacks = trainer.callback_handler.callbacks
            callbacks.insert(0, callbacks.pop(callbacks.index(self)))
        if self._accelerator is not None:
            self._accelerator.clip_grad_norm_ = self._guarded_grad_norm
        # torch's LR scheduler warns unless optimizer.step is its own counting wrapper: say it is, and set
        # the flag that wrapper sets (see torch.optim.lr_scheduler.LRScheduler.step).
        self._guarded_step.__func__._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._hook = model.register_forward_hook(self._keep_loss)
        if self.guard.forensics is not None:
            self._batch_hook = model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)

    def _keep_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and self.guard is not None and self.guard.forensics is not None:
            self.guard.forensics.remember(kwargs, before_forward=True)

    def _keep_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        analysing = self.guard is not None and self.guard.forensics is not None and self.guard.forensics.analysing
        if module.training and isinstance(loss, torch.Tensor) and not analysing:
            self._losses.append(loss.detach())

    def _step_guard(self) -> None:
        assert self.guard is not None
        loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses = []
        self.guard.step(loss)

    def _guarded_grad_norm(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> None:
        """``accelerator.clip_grad_norm_``, as the Trainer calls it at a boundary, to clip to ``max_grad_norm``
        (the Guard's clip since train begin) or to log the norm (``max_norm`` inf): the Guard's step instead, once
        per boundary, on the gradients as they are. Returns None: no ``grad_norm`` log."""
        if not self._accelerator.sync_gradients:  # not the Trainer's boundary call: accelerate's own
            return type(self._accelerator).clip_grad_norm_(self._accelerator, parameters, max_norm, norm_type)
        if not self._stepped:  # the Trainer's second call of a boundary (the log's, after its clip) steps nothing
            self._step_guard()
            self._stepped = True
        return None

    def _guarded_step(self, closure: Any = None) -> None:
        assert self.guard is not None
        if self._stepped:  # the Guard stepped (or skipped) at the Trainer's norm call just before
            self._stepped = False
        else:
            self._step_guard()
        self._accelerated._opt_called = True
        # accelerate's own flag for "the step was skipped" keeps the Trainer's LR scheduler in place.
        # It is a host read, and the Guard's non-fused step made it already.
        self._accelerated._is_overflow = self.guard.last_step_skipped

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if self.guard is None or logs is None:
            return
        if self.guard.history_buffer.pending:
            self.guard.flush()  # at the Trainer's log row, which reads the loss on the host anyway
        logs.update(logs_of(self._pending.take()))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is not None:
            self.guard.flush()
        if self._accelerated is not None:
            del self._accelerated.step  # accelerate's step again
            self._accelerated = None
        if self._accelerator is not None:
            del self._accelerator.clip_grad_norm_
            self._accelerator = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None


def _calling_trainer() -> Trainer | None:
    """The ``Trainer`` whose training loop is calling this callback, found on the call stack.

    The Trainer does not pass itself (nor its accelerator) to callbacks, and the callback must take over
    the accelerator's norm call; the caller of ``on_train_begin`` is ``Trainer._inner_training_loop``.
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None

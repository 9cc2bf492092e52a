"""Hugging Face ``transformers.Trainer``: ``GradGuardCallback`` puts a :class:`gradguard.Guard` in the run.

::

    from gradguard.integrations.transformers import GradGuardCallback

    args = TrainingArguments(..., max_grad_norm=0)          # gradguard does the clipping
    trainer = Trainer(model, args, ..., callbacks=[GradGuardCallback(clip=gg.clip.ZClip())])

How it hooks in: the Trainer calls ``self.optimizer.step()`` on accelerate's ``AcceleratedOptimizer`` at
each accumulation boundary. When training begins the callback builds a Guard over the wrapped torch
optimizer (and accelerate's ``GradScaler``, when there is one) and routes that call to ``guard.step``, which
measures, clips, and steps or skips. A skipped step is reported to the Trainer the way accelerate reports
an fp16 overflow (``optimizer_step_was_skipped``), so the LR scheduler is not advanced. The loss is taken
from the model's output (``output.loss``) with a forward hook, in training mode only.

Flushed records are appended to ``trainer.state.log_history`` (tags of :func:`gradguard.sinks.scalars_of`).

Supported: one optimizer, gradient accumulation, fp16 with accelerate's GradScaler and bf16. Not
supported: ``max_grad_norm > 0`` (an error at the start: the Trainer would clip, and spread a NaN of one
layer into every gradient, before the Guard sees them), DeepSpeed (its engine owns the step), XLA, and
LOMO optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradguard.guard import Guard
from gradguard.integrations import check_guard_options
from gradguard.sinks import Record, scalars_of


class LogHistorySink:
    """Appends each flushed record's scalars to the Trainer's ``state.log_history``."""

    def __init__(self, state: TrainerState):
        self.state = state

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self.state.log_history.append({**scalars_of(record), "step": record["step"]})

    def close(self) -> None:
        pass


class GradGuardCallback(TrainerCallback):
    """A ``TrainerCallback`` that drives a :class:`gradguard.Guard`; ``callback.guard`` once training begins.

    Args:
        **guard_options: passed to ``gg.Guard`` (``clip``, ``on_nonfinite``, ``on_spike``, ``log_every``,
            ``sinks``, ...). ``model``, ``optimizer``, ``scaler``, ``scheduler`` and ``accumulation_steps``
            come from the Trainer.
    """

    def __init__(self, **guard_options: Any):
        check_guard_options(
            guard_options, "GradGuardCallback", reserved=("scaler", "scheduler", "accumulation_steps", "optimizer_step")
        )
        self.guard_options = guard_options
        self.guard: Guard | None = None
        self._accelerated: Any = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"GradGuardCallback: set TrainingArguments(max_grad_norm=0) (got {args.max_grad_norm}); "
                "pass clip=gg.clip.GlobalNorm(...) to the callback instead"
            )
        model, accelerated = kwargs["model"], kwargs["optimizer"]
        optimizer = getattr(accelerated, "optimizer", accelerated)  # the torch optimizer inside accelerate's
        options = dict(self.guard_options)
        options["sinks"] = [*options.get("sinks", ()), LogHistorySink(state)]
        self.guard = Guard(model, optimizer, scaler=getattr(accelerated, "scaler", None), **options)
        self._accelerated = accelerated
        accelerated.step = self._guarded_step
        # torch's LR scheduler warns unless optimizer.step is its own counting wrapper: say it is, and set
        # the flag that wrapper sets (see torch.optim.lr_scheduler.LRScheduler.step).
        self._guarded_step.__func__._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def _guarded_step(self, closure: Any = None) -> None:
        assert self.guard is not None
        loss = torch.stack(self._losses).mean() if self._losses else None
        self._losses = []
        self.guard.step(loss)
        self._accelerated._opt_called = True
        # accelerate's own flag for "the step was skipped" keeps the Trainer's LR scheduler in place.
        # It is a host read, and the Guard's non-fused step made it already.
        self._accelerated._is_overflow = self.guard.last_step_skipped

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is not None:
            self.guard.flush()
        if self._accelerated is not None:
            del self._accelerated.step  # accelerate's step again
            self._accelerated = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

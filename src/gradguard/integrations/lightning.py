"""Lightning 2.x: ``GradGuardCallback`` puts a :class:`gradguard.Guard` in a ``Trainer`` run.

::

    from gradguard.integrations.lightning import GradGuardCallback

    trainer = L.Trainer(callbacks=[GradGuardCallback(clip=gg.clip.ZClip())])

How it hooks in (automatic optimization): Lightning calls ``optimizer.step(closure)``, the closure runs the
forward and backward passes, then ``on_before_optimizer_step`` -- after the precision plugin has unscaled
the gradients. The callback lets the closure run, then hands the step to the Guard there, which measures,
clips, and steps the optimizer or skips it. The optimizer's own ``step`` is replaced for the run by one
that only runs the closure, so the step is never taken twice; the original is restored when training ends.

With ``forensics=gg.Forensics(loss_fn=...)`` each training batch is handed to it as it starts
(``on_train_batch_start``); forensics then calls ``pl_module(inputs)`` and ``loss_fn(output, targets)`` on a
bad step, so the batch must follow ``gradguard.batch``'s convention and the module's ``forward`` give what
``loss_fn`` takes.

The Guard's records go to every logger of the Trainer (``trainer.loggers``: CSV, TensorBoard, W&B,
MLflow, ...) through ``log_metrics`` when the Guard flushes, every ``log_every`` steps (no host read in
between), at the Guard's step (the optimizer step, from 0): the step's scalars, its events as
``gradguard_events/<kind>/<layer>`` (1 at the step: a skipped step names its layer) and the per-layer norms
(``gradguard_layers/<layer>``), all of :func:`gradguard.sinks.scalars_of`. A run with a logger needs no
gradguard sink.

Supported: one optimizer, automatic optimization, gradient accumulation (``accumulate_grad_batches``:
Lightning calls the hook on boundaries only), the precision plugins ("32", "16-mixed", "bf16-mixed"; the
gradients are unscaled before the Guard sees them). Not supported, with an error at the start: manual
optimization (use ``gg.Guard`` in ``training_step`` yourself), several optimizers, and Lightning's own
``gradient_clip_val`` (the Guard clips; Lightning would clip after the step was taken). Not covered:
DeepSpeed and other strategies that own the optimizer step; the LR scheduler is stepped by Lightning, also
after a skipped step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from gradguard.guard import Guard
from gradguard.integrations import check_guard_options
from gradguard.sinks import Record, scalars_of

#: Metrics in one ``log_metrics`` call at most (MLflow's logger sends one call as one request, which takes
#: at most 1000 metrics; a model of many layers has more norms than that).
BATCH = 1000


class LoggerSink:
    """Sends flushed records to the Trainer's loggers, tagged as in :func:`gradguard.sinks.scalars_of`."""

    def __init__(self, trainer: L.Trainer):
        self.trainer = trainer

    def write(self, records: Sequence[Record]) -> None:
        for logger in self.trainer.loggers:
            for record in records:
                scalars = list(scalars_of(record).items())
                for start in range(0, len(scalars), BATCH):
                    logger.log_metrics(dict(scalars[start : start + BATCH]), step=record["step"])

    def close(self) -> None:
        pass


class GradGuardCallback(L.Callback):
    """A Lightning callback that drives a :class:`gradguard.Guard`; ``callback.guard`` once training starts.

    Args:
        **guard_options: passed to ``gg.Guard`` (``clip``, ``on_nonfinite``, ``on_spike``, ``log_every``,
            ``sinks``, ...). ``model``, ``optimizer``, ``scaler``, ``scheduler`` and
            ``accumulation_steps`` come from the Trainer.
    """

    def __init__(self, **guard_options: Any):
        check_guard_options(
            guard_options, "GradGuardCallback", reserved=("scaler", "scheduler", "accumulation_steps", "optimizer_step")
        )
        self.guard_options = guard_options
        self.guard: Guard | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GradGuardCallback: manual optimization is not supported; call gg.Guard.step in training_step"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradGuardCallback: expected one optimizer, the Trainer has {len(trainer.optimizers)}"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"GradGuardCallback: set gradient_clip_val=None (got {trainer.gradient_clip_val}); "
                "pass clip=gg.clip.GlobalNorm(...) to the callback instead"
            )
        forensics = self.guard_options.get("forensics")
        if forensics is not None and forensics.keep < trainer.accumulate_grad_batches:
            raise ValueError(f"GradGuardCallback: Forensics(keep={forensics.keep}) is less than "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
        optimizer = trainer.optimizers[0]
        options = dict(self.guard_options)
        options["sinks"] = [*options.get("sinks", ()), LoggerSink(trainer)]
        # Lightning's optimizer.step(closure) will only run the closure; the Guard takes the real step (the
        # method as it is now, given as optimizer_step) in on_before_optimizer_step.
        self.guard = Guard(pl_module, optimizer, optimizer_step=optimizer.step, **options)
        self._optimizer = optimizer
        optimizer.step = _run_closure_only

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.guard is not None and self.guard.forensics is not None:
            self.guard.forensics.remember(batch, before_forward=True)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Lightning divides each micro-batch loss by accumulate_grad_batches: their sum is the mean loss.
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.guard is not None
        loss, self._loss = self._loss, None
        self.guard.step(loss)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard is not None:
            self.guard.flush()
        if self._optimizer is not None:
            del self._optimizer.step  # the class's step again
            self._optimizer = None


def _run_closure_only(closure: Any = None, **kwargs: Any) -> Any:
    return closure() if closure is not None else None

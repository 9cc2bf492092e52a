"""One run of ``gradguard sweep``: the user's factory at one learning rate, one remedy, one seed.

:func:`train_one` is the task every executor runs (a module-level function of the config alone, so that a
worker process or a Ray worker can import it): load the factory, seed everything, build the run, train it
with the lab's loop (``gradguard.lab.training.train``) and the lab's remedies, and return the lab's record
(``gradguard.lab.record.make_record``) with two more values:

* ``initial_loss`` (L0): the loss on the factory's ``eval_batch`` at initialisation, else the first
  training loss;
* ``val_loss`` (L(lr)): the loss on ``eval_batch`` after training, else the mean of the last 10 training
  losses (NaN when the run diverged to a non-finite loss).
"""

from __future__ import annotations

import math
import time
from typing import Any

from torch import Tensor

from gradguard.lab.metrics import final_loss
from gradguard.lab.record import make_record
from gradguard.lab.remedies import Batch, GuardRemedy, Remedy, make_remedy
from gradguard.lab.scenarios import Record, RunConfig, seed_everything
from gradguard.lab.sweep_factory import build_run, load_sweep_factory
from gradguard.lab.training import evaluate_loss, train
from gradguard.stats import GradStats


class WarmupStep(Remedy):
    """A linear LR warm-up over the first ``warmup`` steps around any remedy and any schedule: step ``t``
    runs at ``min(1, (t + 1) / warmup)`` times the LR in force (the schedule's), which is put back after the
    step, so the factory's own schedule goes on as written."""

    def __init__(self, remedy: Remedy, warmup: int):
        super().__init__(remedy.optimizer)
        self.remedy = remedy
        self.warmup = warmup
        self.calls = 0

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        factor = min(1.0, (self.calls + 1) / self.warmup)
        self.calls += 1
        groups = self.optimizer.param_groups
        in_force = [group["lr"] for group in groups]
        for group, lr in zip(groups, in_force):
            group["lr"] = lr * factor
        try:
            self.remedy.step(loss, stats, batch=batch)
        finally:  # the LR in force back, exactly; one changed inside the step (a Guard's cut) keeps the change
            for group, lr in zip(groups, in_force):
                group["lr"] = lr if group["lr"] == lr * factor else group["lr"] / factor

    def summary(self) -> dict[str, int]:
        return self.remedy.summary()


class ScheduledStep(Remedy):
    """The remedy's step, then the factory's LR schedule (not used with the Guard, which steps it itself)."""

    def __init__(self, remedy: Remedy, scheduler: Any):
        super().__init__(remedy.optimizer)
        self.remedy = remedy
        self.scheduler = scheduler

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        self.remedy.step(loss, stats, batch=batch)
        self.scheduler.step()

    def summary(self) -> dict[str, int]:
        return self.remedy.summary()


def train_one(config: RunConfig) -> Record:
    """Train the factory's run that ``config`` describes; the record of the lab (see the module docstring)."""
    cpu_start = time.process_time()
    factory = load_sweep_factory(config["factory"])
    seed_everything(config["seed"])
    run = build_run(factory, config["factory"], config["lr"], config["seed"], config["options"])
    model, optimizer = run.model, run.optimizer
    eval_loss_fn = run.eval_loss_fn or run.loss_fn
    initial = evaluate_loss(model, eval_loss_fn, *run.eval_batch) if run.eval_batch is not None else None

    remedy: Remedy
    step: Remedy
    if config["clip"]["name"] == "guard":  # the Guard steps the schedule itself, only on the steps it takes
        options = {key: value for key, value in config["clip"].items() if key != "name"}
        remedy = GuardRemedy(model, optimizer, {**options, **({"scheduler": run.scheduler} if run.scheduler else {})})
        step = remedy
    else:
        remedy = make_remedy(config["clip"], model, optimizer)
        step = ScheduledStep(remedy, run.scheduler) if run.scheduler is not None else remedy
    if config["warmup"]:
        step = WarmupStep(step, config["warmup"])

    log = train(model, step, run.batches(), run.loss_fn, config["steps"])
    if run.eval_batch is not None:
        final = evaluate_loss(model, eval_loss_fn, *run.eval_batch)
    else:
        final = final_loss(log.losses)
    return make_record(
        config,
        log,
        val_loss=final if math.isfinite(final) else math.nan,
        remedy_summary=remedy.summary(),
        cpu_seconds=round(time.process_time() - cpu_start, 3),
        **({"initial_loss": initial} if initial is not None else {}),
    )

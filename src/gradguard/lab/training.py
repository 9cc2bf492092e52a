"""The lab's training loop: one plain loop for every scenario, readable top to bottom.

Each step: get a batch (maybe corrupt it), forward, backward (maybe poison a gradient), measure the
gradients with ``gg.grad_stats`` (the pre-clipping norm the report plots), let the remedy clip and step
(or skip), record the loss and the norm. The loop stops early only when the parameters themselves have
become non-finite (nothing can recover from that, and the rest of the curve would be NaN), or when the
Guard raises ``TrainingDiverged`` (its rollback budget is spent).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradguard.lab.remedies import Batch, LossFn, Remedy
from gradguard.recover import TrainingDiverged
from gradguard.stats import grad_stats


@dataclass
class Faults:
    """Faults injected into training (the faults scenario).

    Attributes:
        bad_batch_steps: steps whose inputs are multiplied by ``bad_batch_scale`` (a corrupted batch).
        nan_grad_steps: steps at which one gradient element of the first parameter is set to NaN after
            the backward pass (a numerical fault in the backward pass).
        bad_sample_steps: steps at which the samples at ``bad_sample_positions`` of the batch have their
            inputs multiplied by ``bad_sample_scale`` (corrupted samples in a healthy batch; forensics should
            name exactly those).
    """

    bad_batch_steps: frozenset[int] = frozenset()
    bad_batch_scale: float = 1e4
    nan_grad_steps: frozenset[int] = frozenset()
    bad_sample_steps: frozenset[int] = frozenset()
    bad_sample_positions: tuple[int, ...] = ()
    bad_sample_scale: float = 1e3


@dataclass
class TrainLog:
    """What one training run recorded, one entry per step actually run."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    stopped_at: int | None = None  # the step after which the parameters were non-finite
    stop_reason: str | None = None
    seconds: float = 0.0

    @property
    def params_finite(self) -> bool:
        return self.stopped_at is None


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(
    model: nn.Module,
    remedy: Remedy,
    next_batch: Callable[[int], Batch],
    loss_fn: LossFn,
    steps: int,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    faults: Faults | None = None,
) -> TrainLog:
    """Train ``model`` for ``steps`` steps; ``next_batch(step)`` gives (inputs, targets).

    ``penalty(model)`` is added to the loss (regularization); the recorded loss is the task loss alone,
    the recorded gradient norm that of the penalised loss (the gradient the optimizer follows).
    """
    faults = faults or Faults()
    optimizer = remedy.optimizer
    log = TrainLog()
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        inputs, targets = next_batch(step)
        if step in faults.bad_batch_steps:
            inputs = inputs * faults.bad_batch_scale
        if step in faults.bad_sample_steps:
            inputs = inputs.clone()
            inputs[list(faults.bad_sample_positions)] *= faults.bad_sample_scale

        task_loss = loss_fn(model(inputs), targets)
        loss = task_loss if penalty is None else task_loss + penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step in faults.nan_grad_steps:
            first = next(p for p in model.parameters() if p.grad is not None)
            assert first.grad is not None
            first.grad.view(-1)[0] = math.nan

        stats = grad_stats(model)
        log.losses.append(float(task_loss.detach()))
        log.grad_norms.append(float(stats.total_norm))

        try:
            remedy.step(loss.detach(), stats, batch=(inputs, targets))
        except TrainingDiverged as error:  # the Guard spent its rollback budget: the run is over
            log.stopped_at = step
            log.stop_reason = str(error).splitlines()[0]
            break
        if not math.isfinite(log.grad_norms[-1]) or not math.isfinite(log.losses[-1]):
            if not parameters_finite(model):
                log.stopped_at = step
                log.stop_reason = "non-finite parameters"
                break
    log.seconds = time.perf_counter() - start
    return log


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """Fraction of ``inputs`` whose argmax logit is the label (NaN logits count as wrong)."""
    model.eval()
    logits = model(inputs)
    model.train()
    return float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> float:
    model.eval()
    value = float(loss_fn(model(inputs), targets))
    model.train()
    return value


def downsample(values: list[float], points: int, reduce: str = "mean") -> tuple[list[int], list[float]]:
    """At most ``points`` (step, value) pairs: the bucket's ``reduce`` ("mean" or "max"), so that plots of
    long runs stay small. Max keeps gradient spikes visible; a NaN in a bucket makes it NaN."""
    if len(values) <= points:
        return list(range(len(values))), [float(v) for v in values]
    edges = torch.linspace(0, len(values), points + 1).long().tolist()
    array = torch.tensor(values, dtype=torch.float64)
    steps, reduced = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        bucket = array[lo:hi]
        steps.append(hi - 1)
        reduced.append(float(bucket.max() if reduce == "max" else bucket.mean()))
    return steps, reduced

"""The contract between ``gradguard sweep`` and the user's code: a factory that builds one training run.

A factory is a function ``build(lr, ...)`` (loaded from ``path/file.py:build`` or ``package.module:build``,
as ``gradguard doctor`` loads its factory) that returns a :class:`SweepRun`, or the tuple
``(model, optimizer, data, loss_fn)``:

* ``model``: an ``nn.Module``, called as ``model(inputs)``;
* ``optimizer``: a ``torch.optim.Optimizer`` over the model's parameters, built with the ``lr`` it was given;
* ``data``: ``data(step) -> (inputs, targets)``, or an iterable of ``(inputs, targets)`` batches (a
  ``DataLoader``, a list), started again when it runs out;
* ``loss_fn(output, targets)``: the training loss, a scalar tensor.

An ordinary training script adapts by moving what it builds before its loop into ``build(lr)`` and
returning it (``examples/sweep_factory.py``). The factory puts the model and its batches on the device it
wants (under ``--ray --gpus-per-run 0.25`` a run's task sees the GPU Ray gave it: ``cuda`` when
``torch.cuda.is_available()``). The sweep seeds ``torch``, ``numpy`` and ``random`` from the
run's seed before it calls the factory; the factory also gets ``seed=`` when its signature names ``seed``
(e.g. for a ``torch.Generator`` of its own).

Remedies that need the model's code are keyword arguments the factory may accept: ``qk_norm: bool``
(qk-layernorm in every attention, ``gg.qk_norm``) and ``z_loss: float`` (the coefficient of the z-loss
``coef * log^2 Z`` to add to the training loss, ``gg.regularize.z_loss``). The sweep passes them only to a
factory whose signature names them, and lists the remedy as not applicable otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.batch import scalar_loss
from gradguard.explain.factory import FactoryError, load_factory
from gradguard.explain.preserve import preserved

__all__ = ["MODEL_OPTIONS", "SweepRun", "build_run", "check_factory", "factory_digest", "factory_options",
           "load_sweep_factory"]

#: the keyword arguments that remedies needing the model's code pass to the factory
MODEL_OPTIONS = ("qk_norm", "z_loss")
RETURNS = "(model, optimizer, data, loss_fn) or a gg.lab.SweepRun"

Batch = tuple[Tensor, Tensor]


@dataclass
class SweepRun:
    """One training run, as the factory builds it.

    Attributes:
        model, optimizer, data, loss_fn: as in the module docstring.
        scheduler: an LR scheduler over ``optimizer``, stepped after every step taken (by the Guard itself
            when the remedy is the Guard, which steps it only on steps it did not skip); None: constant LR.
        eval_batch: ``(inputs, targets)`` on which the final loss L(lr) and the loss at initialisation L0 are
            measured; None: the mean of the last 10 training losses and the first training loss.
        eval_loss_fn: the loss measured on ``eval_batch`` (e.g. the cross-entropy without the z-loss);
            None: ``loss_fn``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Callable[[int], Batch] | Iterable[Batch]
    loss_fn: Callable[[Any, Any], Tensor]
    scheduler: Any = None
    eval_batch: Batch | None = None
    eval_loss_fn: Callable[[Any, Any], Tensor] | None = None

    def batches(self) -> Callable[[int], Batch]:
        """``data`` as ``next_batch(step)`` (the lab's training loop takes that)."""
        if callable(self.data):
            return self.data
        iterable = self.data
        iterator: Iterator[Batch] = iter(iterable)

        def next_batch(step: int) -> Batch:
            nonlocal iterator
            try:
                batch = next(iterator)
            except StopIteration:  # an epoch ended: start the next one
                iterator = iter(iterable)
                batch = next(iterator)
            inputs, targets = batch
            return inputs, targets

        return next_batch


def load_sweep_factory(target: str) -> Callable[..., Any]:
    """The factory ``target`` names (raises :class:`FactoryError` naming what is wrong)."""
    return load_factory(target, returns=RETURNS)


def factory_options(factory: Callable[..., Any]) -> frozenset[str]:
    """The keyword arguments of :data:`MODEL_OPTIONS` and ``seed`` that the factory's signature names
    (``**kwargs`` does not count: a remedy is applied only where the factory says it knows it)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing is known
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(name for name, p in parameters.items() if p.kind in kinds and name in (*MODEL_OPTIONS, "seed"))


def factory_digest(target: str) -> str:
    """A hash of the file that defines the factory, so that the run cache notices an edit to it."""
    location = target.rpartition(":")[0]
    if location.endswith(".py") or "/" in location or "\\" in location:
        path: Path | None = Path(location)
    else:
        spec = importlib.util.find_spec(location)
        path = Path(spec.origin) if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FactoryError(f"cannot find the file of {target!r}")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_run(factory: Callable[..., Any], target: str, lr: float, seed: int, options: dict[str, Any]) -> SweepRun:
    """Call ``factory(lr, **options)`` (plus ``seed=`` when it takes it) and check what it returned."""
    kwargs = dict(options)
    if "seed" in factory_options(factory):
        kwargs["seed"] = seed
    try:
        result = factory(lr, **kwargs)
    except Exception as error:
        raise FactoryError(f"{target}({lr!r}, **{kwargs}) raised {type(error).__name__}: {error}") from error
    if isinstance(result, SweepRun):
        run = result
    elif isinstance(result, (tuple, list)) and len(result) == 4:
        run = SweepRun(*result)
    else:
        raise FactoryError(f"{target} must return {RETURNS}, got {type(result).__name__}"
                           + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    if not isinstance(run.model, nn.Module):
        raise FactoryError(f"{target}: the model must be an nn.Module, got {type(run.model).__name__}")
    if not isinstance(run.optimizer, torch.optim.Optimizer):
        raise FactoryError(f"{target}: the optimizer must be a torch.optim.Optimizer, got {type(run.optimizer).__name__}")
    group_lrs = {group.get("initial_lr", group["lr"]) for group in run.optimizer.param_groups}
    if lr not in group_lrs:  # a scheduler keeps the lr it was built with as "initial_lr"
        raise FactoryError(f"{target}: the optimizer must be built with the lr it was given ({lr!r}), "
                           f"its param groups have lr {sorted(group_lrs)}")
    if not (callable(run.data) or isinstance(run.data, Iterable)):
        raise FactoryError(f"{target}: data must be data(step) -> (inputs, targets) or an iterable of batches, "
                           f"got {type(run.data).__name__}")
    if not callable(run.loss_fn):
        raise FactoryError(f"{target}: loss_fn must be callable, got {type(run.loss_fn).__name__}")
    return run


def check_factory(factory: Callable[..., Any], target: str, lr: float, options: dict[str, Any]) -> None:
    """Build one run and compute the loss of its first batch without gradients: a factory that cannot be
    swept fails here, with a :class:`FactoryError`, before any run starts."""
    run = build_run(factory, target, lr, 0, options)
    try:
        batch = run.batches()(0)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"a batch must be (inputs, targets), got {type(batch).__name__}")
        with preserved(run.model), torch.no_grad():
            scalar_loss(run.loss_fn(run.model(batch[0]), batch[1]), "loss_fn")
    except Exception as error:  # the user's data, model or loss: bad input, said as such
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise FactoryError(f"{target}: the run fails on its first batch: {type(error).__name__}: {first_line}") from error

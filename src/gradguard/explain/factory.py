"""Load a user's ``(model, batch, loss_fn)`` factory from ``package.module:function`` or ``path/file.py:function``.

The command line (``gradguard doctor TARGET``) diagnoses whatever the factory returns: ``(model, batch,
loss_fn)``, or ``(model, batch, loss_fn, optimizer)`` to also measure the update sizes; the batch and
loss_fn follow ``gradguard.batch`` (a dict batch with ``loss_fn`` None reads ``output.loss``). Every
problem is raised as :class:`FactoryError` with a message that says what was wrong, which the CLI prints
before exiting with code 2 — a model that fails on its own batch too: it is called once, without
gradients, before anything else runs (its buffers restored afterwards).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.batch import as_batch, forward_loss, scalar_loss
from gradguard.explain.preserve import preserved
from gradguard.trace import eager

__all__ = ["FactoryError", "Patient", "load_factory", "load_patient"]


class FactoryError(ValueError):
    """The target could not be loaded, or its factory returned something the doctor cannot use."""


@dataclass
class Patient:
    """What the factory returned."""

    model: nn.Module
    batch: Any
    loss_fn: Any
    optimizer: torch.optim.Optimizer | None = None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise FactoryError(f"no such file: {path}")
    name = f"_gradguard_patient_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file fails to run: bad input, said as such
        raise FactoryError(f"importing {path} raised {type(error).__name__}: {error}") from error
    return module


def _import(location: str) -> Any:
    if location.endswith(".py") or "/" in location or "\\" in location:
        return _import_file(Path(location))
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`, modules of the current directory import
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise FactoryError(f"cannot import module {location!r}: {error}") from error
    except Exception as error:
        raise FactoryError(f"importing {location!r} raised {type(error).__name__}: {error}") from error


def load_factory(target: str, returns: str = "(model, batch, loss_fn)") -> Callable[..., Any]:
    """Import ``target`` (``"package.module:factory"`` or ``"path/to/file.py:factory"``) and return the
    factory, without calling it; ``returns`` says what it should return, for the error messages. Used by
    ``gradguard doctor`` and ``gradguard sweep``."""
    location, colon, attribute = target.rpartition(":")
    if not colon or not location or not attribute:
        raise FactoryError(f"target must look like package.module:factory or path/file.py:factory, got {target!r}")
    module = _import(location)
    factory = getattr(module, attribute, None)
    if factory is None:
        raise FactoryError(f"{location} has no attribute {attribute!r}")
    if not callable(factory):
        raise FactoryError(f"{location}:{attribute} is not callable (a function returning {returns})")
    return factory


def load_patient(target: str) -> Patient:
    """Import ``target`` (``"package.module:factory"`` or ``"path/to/file.py:factory"``) and call the factory."""
    factory = load_factory(target)
    try:
        result = factory()
    except Exception as error:
        raise FactoryError(f"{target}() raised {type(error).__name__}: {error}") from error
    if not (isinstance(result, (tuple, list)) and len(result) in (3, 4)):
        raise FactoryError(f"{target} must return (model, batch, loss_fn) or (model, batch, loss_fn, optimizer), "
                           f"got {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    model, batch, loss_fn, *rest = result
    optimizer = rest[0] if rest else None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{target}: the model (item 0) must be an nn.Module, got {type(model).__name__}")
    try:
        split = as_batch(batch, f"{target}: the batch (item 1)")
    except ValueError as error:
        raise FactoryError(str(error)) from None
    if loss_fn is not None and not callable(loss_fn):
        raise FactoryError(f"{target}: the loss function (item 2) must be callable or None, got {type(loss_fn).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise FactoryError(f"{target}: item 3 must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    try:
        with preserved(model), eager(), torch.no_grad():
            scalar_loss(forward_loss(model, split, loss_fn)[1], f"{target}: the loss function (item 2)")
    except Exception as error:  # the user's model or loss on the user's batch: bad input, said as such
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise FactoryError(f"{target}: the model fails on its batch: {type(error).__name__}: {first_line}") from error
    return Patient(model, tuple(batch) if isinstance(batch, list) else batch, loss_fn, optimizer)

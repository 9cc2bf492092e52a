"""Remedies: a fix both as the code the report shows and as a function the doctor can apply.

For a flow that explodes or vanishes, the doctor does not only name a fix: it applies it to a deep copy of
the model and measures the flow again (:func:`first_stabilising`). The candidates, in order:

1. the fix chosen from the cause (``findings.py``);
2. ``gg.init.auto_`` — the init each layer's activation calls for (Glorot & Bengio 2010, He et al. 2015,
   orthogonal recurrent weights, Saxe et al. 2014);
3. swapping saturating activations for ReLU, then ``auto_`` (Glorot & Bengio 2010 on sigmoid; He et al.
   2015);
4. ``gg.init.lsuv_`` — unit output variance measured on the batch (Mishkin & Matas 2016), for activations
   and structures no formula covers.

Over time, the candidate is the cause's own fix alone: orthogonal hidden weights for an explosion, chrono
initialisation of the gate biases for a gated unit that forgets (Tallec & Ollivier 2018).

The first candidate that makes the measured axis (depth or time) stable is the one reported. When none
does, the cause's own fix is kept and the finding says what the flow becomes after it.

Every remedy but one re-initialises weights, which throws away what a trained model has learned: its code
says so in a comment. The exception is :func:`rescale_layer`, for one layer far off the scale of the others
among well-scaled ones: it multiplies that layer's weights by one number, keeping their direction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from gradguard.activations import SATURATING, replace_
from gradguard.init import auto_, chrono_, lsuv_

__all__ = ["REINITIALISES", "Remedy", "auto_init", "chrono", "first_stabilising", "flow_candidates", "lsuv",
           "rescale_layer", "swap_saturating"]

REINITIALISES = "  # re-initialises the weights: for a model at init, it discards trained ones"


@dataclass(frozen=True)
class Remedy:
    """A fix: ``code`` as the report prints it (names ``gg``, ``nn``, ``model``, ``batch``), ``apply``, which
    does the same to a model given the batch, and ``cause``, the cause it addresses (a ``Finding.cause``)."""

    code: str
    apply: Callable[[nn.Module, Any], object]
    cause: str = ""


def auto_init(cells_present: bool) -> Remedy:
    if cells_present:  # auto_ finds hand-written recurrent cells only by running the model once
        return Remedy("gg.init.auto_(model, batch)" + REINITIALISES, lambda model, batch: auto_(model, batch),
                      "init_scale")
    return Remedy("gg.init.auto_(model)" + REINITIALISES, lambda model, batch: auto_(model), "init_scale")


def chrono(module_name: str, steps: int) -> Remedy:
    """Chrono init of a gated recurrent module's gate biases over ``steps`` (Tallec & Ollivier 2018)."""
    span = max(steps, 3)
    return Remedy(f'gg.init.chrono_(model.get_submodule("{module_name}"), max_steps={span})'
                  "  # re-initialises the gate biases only",
                  lambda model, batch: chrono_(model.get_submodule(module_name), max_steps=span), "recurrent")


def lsuv() -> Remedy:
    return Remedy("gg.init.lsuv_(model, batch)" + REINITIALISES, lambda model, batch: lsuv_(model, batch), "depth")


def rescale_layer(layer: str, factor: float, target: str) -> Remedy:
    """Multiply one layer's weights by ``factor`` (its prescribed std over its measured std, ``target``)."""
    code = f'model.get_submodule("{layer}").weight.data.mul_({factor:.3g})  # to {target}; the direction is kept'

    def apply(model: nn.Module, batch: Any) -> None:
        weight = model.get_submodule(layer).weight
        assert isinstance(weight, Tensor)
        weight.data.mul_(float(f"{factor:.3g}"))

    return Remedy(code, apply, "init_scale")


def saturating_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The saturating activation classes (``nn.Tanh``, ``nn.Sigmoid``, ...) used in ``model``."""
    return [cls for cls in SATURATING if any(type(m) is cls for m in model.modules())]


def swap_saturating(classes: list[type[nn.Module]], then: Remedy) -> Remedy:
    """Replace each class by ``nn.ReLU``, then apply ``then`` (the new activation needs its own init)."""
    code = "; ".join(f"gg.activations.replace_(model, nn.{cls.__name__}, nn.ReLU)" for cls in classes)

    def apply(model: nn.Module, batch: Any) -> None:
        for cls in classes:
            replace_(model, cls, nn.ReLU)
        then.apply(model, batch)

    return Remedy(f"{code}; {then.code}", apply, "activation")


def flow_candidates(first: Remedy, model: nn.Module, cells_present: bool) -> list[Remedy]:
    """``first``, then the other flow remedies in the module docstring's order, without repeats."""
    saturating = saturating_classes(model)
    candidates = [first, auto_init(cells_present)]
    if saturating:
        candidates.append(swap_saturating(saturating, auto_init(cells_present)))
    candidates.append(lsuv())
    unique: list[Remedy] = []
    for remedy in candidates:
        if all(remedy.code != seen.code for seen in unique):
            unique.append(remedy)
    return unique


def first_stabilising(
    candidates: list[Remedy],
    model: nn.Module,
    batch: Any,
    verdict_after: Callable[[nn.Module], str],
) -> tuple[Remedy, str | None, str]:
    """The first candidate after which ``verdict_after(copy)`` is ``"stable"``, applied to a deep copy.

    Returns ``(remedy, None, first)`` for a remedy that works, or ``(candidates[0], verdict after it, same)``
    when none does (``"not checked: ..."`` when the copy or the remedy fails); ``first`` is the verdict
    after ``candidates[0]``.
    """
    first_outcome: str | None = None
    for remedy in candidates:
        try:
            trial = copy.deepcopy(model)
            remedy.apply(trial, batch)
            outcome = verdict_after(trial)
        except Exception as error:  # a model that cannot be copied, an init the layer refuses...
            outcome = f"not checked: {type(error).__name__}: {str(error)[:120]}"
        if first_outcome is None:
            first_outcome = outcome
        if outcome == "stable":
            return remedy, None, first_outcome
    return candidates[0], first_outcome, first_outcome  # type: ignore[return-value]

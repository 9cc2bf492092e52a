"""Activation functions: what kind each one is, and swapping one kind for another.

The kind decides two things elsewhere in gradguard:

* the initialisation a layer needs (``gradguard.init``): He et al. 2015 for the rectifier family, whose
  derivative is 0 on half the inputs, Glorot & Bengio 2010 (Xavier) for the symmetric saturating
  functions (tanh, sigmoid) and for no activation at all;
* how much of the error signal it lets through: ``|phi'| <= gamma`` with ``gamma = 1`` for tanh and
  ``1/4`` for sigmoid (Pascanu et al. 2013). A deep stack of sigmoids shrinks the error signal by up to
  4x per layer whatever the weights (Glorot & Bengio 2010), which is why swapping the activation
  (:func:`replace_`) is sometimes the fix and re-initialising is not.

Only activations that are ``nn.Module`` s are seen; ``torch.tanh(x)`` inside a ``forward`` is not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

__all__ = ["activation_kind", "derivative_bound", "replace_", "RECTIFIERS", "SATURATING"]

# Rectifier-like: He et al. 2015 initialisation keeps their variance (gain sqrt(2), or sqrt(2/(1+a^2))).
RECTIFIERS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "leaky_relu",
    nn.RReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.CELU: "elu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Softplus: "softplus",
}

# Bounded, saturating: their derivative vanishes away from 0 (Glorot & Bengio 2010, section 3).
SATURATING: dict[type[nn.Module], str] = {
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardtanh: "tanh",
    nn.Softsign: "tanh",
    nn.Hardsigmoid: "sigmoid",
}

# Largest |phi'(x)| (Pascanu et al. 2013, the gamma of their bound).
_DERIVATIVE_BOUND = {"tanh": 1.0, "sigmoid": 0.25, "linear": 1.0, "relu": 1.0}


def activation_kind(module: nn.Module) -> str | None:
    """The activation ``module`` computes (``"relu"``, ``"tanh"``, ``"sigmoid"``, ...), None if it is not one."""
    for table in (RECTIFIERS, SATURATING):
        for cls, kind in table.items():
            if type(module) is cls:
                return kind
    return None


def negative_slope(module: nn.Module) -> float:
    """The slope on negative inputs of a leaky rectifier (0 for the others): He et al.'s ``a``."""
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        return float(module.weight.detach().abs().mean())
    if isinstance(module, nn.RReLU):
        return (module.lower + module.upper) / 2
    return 0.0


def derivative_bound(kind: str) -> float:
    """``gamma`` of Pascanu et al. 2013: the largest value of ``|phi'|`` (1 for tanh, 1/4 for sigmoid).

    Rectifiers are bounded by 1 too; unknown kinds get 1, the loosest bound of the usual activations.
    """
    return _DERIVATIVE_BOUND.get(kind, 1.0)


def replace_(
    model: nn.Module,
    old: type[nn.Module],
    new: type[nn.Module] | Callable[[], nn.Module] | nn.Module,
) -> list[str]:
    """Swap every submodule of type ``old`` for a fresh ``new``, in place.

    Args:
        model: the model to edit. The root itself is never replaced.
        old: the activation class to remove, e.g. ``nn.Sigmoid``.
        new: a class or zero-argument factory (``nn.ReLU``, ``lambda: nn.LeakyReLU(0.1)``), or a module
            instance, deep-copied for each place it goes.

    Returns:
        The names of the replaced submodules (empty when there were none).

    Example::

        gg.activations.replace_(model, nn.Sigmoid, nn.ReLU)
        gg.init.auto_(model)   # the new activation wants another initialisation
    """
    if not (isinstance(old, type) and issubclass(old, nn.Module)):
        raise TypeError(f"replace_: old must be an nn.Module class such as nn.Sigmoid, got {old!r}")
    if not (isinstance(new, nn.Module) or callable(new)):
        raise TypeError(f"replace_: new must be a module class, factory or instance, got {new!r}")

    def make() -> nn.Module:
        fresh = copy.deepcopy(new) if isinstance(new, nn.Module) else new()
        if not isinstance(fresh, nn.Module):
            raise TypeError(f"replace_: new() must return an nn.Module, got {type(fresh).__name__}")
        return fresh

    replaced: list[str] = []
    # Collect first: editing a module's children while iterating named_modules() would skip some.
    targets = [(name, module) for name, module in model.named_modules() if name and type(module) is old]
    for name, _ in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, make())
        replaced.append(name)
    return replaced

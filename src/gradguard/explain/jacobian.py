"""Largest singular value of a Jacobian by power iteration, never forming the Jacobian.

For ``y = f(x)`` with Jacobian ``J``, power iteration on ``J^T J``

    v <- J^T J v / ||J^T J v||,    sigma_max ~= ||J v||   (``||v|| = 1``)

needs one Jacobian-vector product (``torch.func.jvp``, forward mode) and one vector-Jacobian product
(``torch.func.vjp``, reverse mode) per step: the cost of about two forward passes and one backward, whatever
the sizes of ``x`` and ``y``. ``||J v||`` rises to ``sigma_max`` at the rate ``(sigma_2 / sigma_1)^2`` per
step (Golub & Van Loan, section 8.2): the estimate is a lower bound, and stopping when a step changes it
by less than ``tol`` leaves an error of about ``tol / (1 - (sigma_2 / sigma_1)^2)``.

The same routine measures the input-output Jacobian of a model, of each of its blocks, and ``dh_T/dh_0`` of
a recurrent model (Pascanu et al. 2013: the long-term factor whose norm explodes or vanishes). A batch is
one input: samples that do not interact give a block-diagonal ``J``, and ``sigma_max`` is then the largest
over the samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SpectralNorm", "spectral_norm"]


@dataclass
class SpectralNorm:
    """Result of :func:`spectral_norm`: the estimate, the steps taken, and whether it settled within ``tol``."""

    value: float
    iterations: int
    converged: bool


def _norm(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))


def _as_tuple(value: Tensor | tuple | list) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def spectral_norm(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    primals: tuple[Tensor, ...],
    iterations: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
) -> SpectralNorm:
    """Largest singular value of the Jacobian of ``fn`` at ``primals``.

    Args:
        fn: a function of the tensors in ``primals`` returning a tensor or a tuple of tensors. It must be
            deterministic (no dropout), as every step calls it again.
        primals: the point; floating-point tensors. Several tensors (an LSTM's ``(h, c)``) are one vector.
        iterations: power-iteration steps at most.
        tol: stop when ``||J v||`` changes by less than ``tol`` (relative) between steps.
        seed: seed of the random start vector (the estimate is deterministic for a given seed).
    """
    if iterations < 1:
        raise ValueError(f"spectral_norm: iterations must be >= 1, got {iterations}")
    primals = tuple(p.detach() for p in primals)
    for i, p in enumerate(primals):
        if not p.is_floating_point():
            raise TypeError(f"spectral_norm: primal {i} must be floating point, got {p.dtype}")
    generator = torch.Generator().manual_seed(seed)
    v = tuple(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in primals)
    scale = _norm(v)
    v = tuple(t / scale.to(t.dtype) for t in v)
    vjp_fn = torch.func.vjp(lambda *xs: _as_tuple(fn(*xs)), *primals)[1]
    sigma = 0.0
    for step in range(1, iterations + 1):
        # Forward mode needs no autograd graph; with parameters that require grad, building one makes the
        # product ~10x slower on CPU.
        with torch.no_grad(), warnings.catch_warnings():
            # torch's first forward-AD call loads its jvp decompositions through torch.jit.script, which
            # warns that it is deprecated: torch's own business, not the caller's.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            jv = torch.func.jvp(lambda *xs: _as_tuple(fn(*xs)), primals, v)[1]
        new_sigma = float(_norm(jv))
        jtjv = tuple(t.detach() for t in vjp_fn(jv))
        length = _norm(jtjv)
        if new_sigma == 0.0 or not torch.isfinite(length) or float(length) == 0.0:
            return SpectralNorm(new_sigma, step, True)
        v = tuple(t / length.to(t.dtype) for t in jtjv)
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return SpectralNorm(new_sigma, step, True)
        sigma = new_sigma
    return SpectralNorm(sigma, iterations, False)

"""L1/L2 weight penalties, and optimizer parameter groups that decay the same weights.

An L2 penalty keeps weights, and so the per-layer gains that multiply the error signal, from growing
without bound; Pascanu et al. 2013 (section 3.3) discuss it as a remedy for exploding gradients in RNNs,
with the caveat that it also keeps the recurrent weights in the vanishing regime if it is too strong. L1
(Tibshirani 1996) drives weights to exactly 0.

:func:`penalty` returns ``l1 * sum |w| + (l2 / 2) * sum w^2``, differentiable, to add to the loss. The
``1/2`` makes ``l2`` equal to SGD's ``weight_decay``: the penalty's gradient is ``l2 * w``.

Biases and the parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm,
RMSNorm) are left out by default: they set offsets and scales, not how much a layer amplifies, and
decaying them towards 0 hurts (the practice of nanoGPT's ``configure_optimizers``, among others). A
bias is a parameter whose own name starts with ``bias`` (``bias``, ``bias_ih_l0``).

:func:`z_loss` penalises the output logits instead of the weights: ``coef * mean(log^2 Z)``, which keeps
the softmax normaliser ``log Z`` near 0 (Chowdhery et al. 2022; Wortsman et al. 2023 show it prevents
output-logit divergence).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NORMALIZATION_LAYERS", "decayed_parameters", "param_groups", "penalty", "z_loss"]

NORMALIZATION_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def decayed_parameters(
    model: nn.Module, include_biases: bool = False, include_normalization: bool = False
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split ``model``'s parameters into ``(decayed, not_decayed)`` (name, parameter) lists.

    A parameter shared by several modules appears once, where ``named_parameters()`` first lists it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"regularize: model must be an nn.Module, got {type(model).__name__}")
    decayed: list[tuple[str, nn.Parameter]] = []
    kept: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORMALIZATION_LAYERS)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            is_bias = param_name.startswith("bias")
            excluded = (is_bias and not include_biases) or (is_norm and not include_normalization)
            (kept if excluded else decayed).append((name, param))
    return decayed, kept


def penalty(
    model: nn.Module,
    l1: float = 0.0,
    l2: float = 0.0,
    include_biases: bool = False,
    include_normalization: bool = False,
) -> Tensor:
    """``l1 * sum |w| + (l2 / 2) * sum w^2`` over the decayed weights, a differentiable 0-d tensor.

    Args:
        model: the model whose weights are penalised.
        l1: L1 coefficient (>= 0).
        l2: L2 coefficient (>= 0); equal to SGD's ``weight_decay`` for the same effect.
        include_biases: also penalise biases.
        include_normalization: also penalise normalisation layers' weights and biases.

    Example::

        loss = loss_fn(model(x), y) + gg.regularize.penalty(model, l2=1e-4)
    """
    if l1 < 0:
        raise ValueError(f"penalty: l1 must be >= 0, got {l1}")
    if l2 < 0:
        raise ValueError(f"penalty: l2 must be >= 0, got {l2}")
    decayed, _ = decayed_parameters(model, include_biases, include_normalization)
    first = next(model.parameters(), None)
    total = torch.zeros((), device=first.device if first is not None else None)
    if not decayed or (l1 == 0 and l2 == 0):
        return total
    weights = [p for _, p in decayed]
    if l1:
        total = total + l1 * sum(w.abs().sum(dtype=torch.float32) for w in weights)
    if l2:
        total = total + (l2 / 2) * sum(w.float().square().sum() for w in weights)
    return total


def param_groups(
    model: nn.Module,
    weight_decay: float,
    include_biases: bool = False,
    include_normalization: bool = False,
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: the decayed weights with ``weight_decay``, the rest with 0.

    Example::

        optimizer = torch.optim.AdamW(gg.regularize.param_groups(model, weight_decay=0.1), lr=3e-4)
    """
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
    decayed, kept = decayed_parameters(model, include_biases, include_normalization)
    groups = [{"params": [p for _, p in decayed], "weight_decay": weight_decay}]
    if kept:
        groups.append({"params": [p for _, p in kept], "weight_decay": 0.0})
    return groups


def z_loss(logits: Tensor, coef: float = 1e-4) -> Tensor:
    """``coef * mean(log(Z)^2)``, ``log Z = logsumexp(logits, dim=-1)``: the auxiliary z-loss of PaLM
    (Chowdhery et al. 2022, section 5), to add to a cross-entropy loss.

    A softmax does not change when a constant is added to every logit, so cross-entropy leaves ``log Z``
    free to drift. Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
    instabilities", arXiv 2309.14322, section 3.2) show that at high learning rates it drifts far from 0
    (*output-logit divergence*) and the loss diverges; ``coef = 1e-4`` pulls it back to 0 and removes
    the instability. The gradient with respect to the logits is ``2 coef log(Z) softmax(logits) / n``.

    Args:
        logits: the output logits, classes (vocabulary) on the last dimension; any leading shape
            (``(batch, time, vocab)`` for a language model). Computed in float32.
        coef: the weight of the penalty (>= 0).

    Returns:
        A 0-d float32 tensor, differentiable, on ``logits``' device.

    Example::

        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + gg.regularize.z_loss(logits)
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("z_loss: logits must be a floating-point tensor with the classes on its last dimension, "
                         f"got {type(logits).__name__}"
                         + (f" {logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else ""))
    if not coef >= 0 or coef == float("inf"):
        raise ValueError(f"z_loss: coef must be a finite number >= 0, got {coef}")
    log_z = torch.logsumexp(logits.float(), dim=-1)
    return coef * log_z.square().mean()

"""Which samples made a step bad: each sample's loss and gradient norm against the rest of its batch.

For every sample ``i`` of the batch: its loss ``l_i`` and the norm of its own gradient
``||g_i|| = ||d l_i / d theta||``, each sample run as a batch of one. The gradients come from
``torch.func``: ``vmap(grad(l))`` over the samples (the per-sample-gradient recipe of the torch.func
documentation, also the first step of DP-SGD, Abadi et al. 2016), in chunks that bound the memory of the
per-sample gradients (``MAX_GRAD_BYTES``). A model ``vmap`` cannot run (data-dependent Python control flow,
in-place buffer updates such as batch norm in training mode, ops without a batching rule) is run one
sample at a time instead, with ``torch.autograd.grad``; a model that cannot take a batch of one in training
mode (``BatchNorm1d``) is then run in eval mode.

Each sample is scored against the rest of the batch with a robust z-score of the logs (losses and norms
vary multiplicatively; median and MAD are not moved by the few outliers being looked for)::

    z_i(x) = (log x_i - median_{j != i} log x_j) / max(1.4826 * MAD_{j != i}(log x), SIGMA_FLOOR)
    score_i = max(z_i(loss), z_i(||g||))          (+inf when l_i or g_i is NaN/Inf)

(losses that are not all positive are scored as they are, not as logs). The samples named responsible
are those with ``score > z_thresh``, highest first, at most ``top_k`` (only the non-finite ones when there
are any): none when no sample stands out, which says the step went bad for a reason other than its data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from gradguard.batch import Batch, LossFn, forward_loss, leaves, take

__all__ = ["MAX_GRAD_BYTES", "SIGMA_FLOOR", "SampleStats", "per_sample", "robust_z", "scores_of", "responsible"]

#: Lower bound on the spread of the logs: a sample must be at least ``exp(z_thresh * 0.25)`` times the
#: median of the others (2.7x at ``z_thresh=4``) to be named.
SIGMA_FLOOR = 0.25
#: Per-sample gradients held at once by ``vmap`` (float32 bytes); the samples are processed in chunks.
MAX_GRAD_BYTES = 1 << 28


@dataclass
class SampleStats:
    """Per-sample losses and gradient norms of one batch (float32, CPU), and how they were computed.

    Attributes:
        losses: ``(B,)`` each sample's loss.
        grad_norms: ``(B,)`` the L2 norm of each sample's gradient over every trained parameter.
        method: ``"vmap"`` (torch.func) or ``"loop"`` (one sample at a time), ``"loop-eval"`` (in eval mode).
    """

    losses: Tensor
    grad_norms: Tensor
    method: str


def _trained(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))
    return params, frozen


def _by_vmap(model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    params, frozen = _trained(model)
    tensors, put = leaves(batch)
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, min(batch.size, MAX_GRAD_BYTES // (4 * max(numel, 1))))

    def sample_loss(params: dict[str, Tensor], sample: list[Tensor]) -> Tensor:
        one = put([t.unsqueeze(0) for t in sample])

        def call(*args: object, **kwargs: object) -> object:
            return functional_call(model, (params, frozen), args, kwargs)

        return forward_loss(call, one, loss_fn)[1].reshape(())

    def norm_and_loss(params: dict[str, Tensor], sample: list[Tensor]) -> tuple[Tensor, Tensor]:
        grads, loss = grad_and_value(sample_loss)(params, sample)
        squares = torch.stack([g.float().pow(2).sum() for g in grads.values()])
        return squares.sum().sqrt(), loss.detach().float()

    norms, losses = vmap(norm_and_loss, in_dims=(None, 0), randomness="different", chunk_size=chunk)(
        params, tensors)
    return losses, norms


def _by_loop(model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms = [], []
    for i in range(batch.size):
        loss = forward_loss(model, take(batch, i), loss_fn)[1].reshape(())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(squares).sum().sqrt() if squares else loss.new_zeros((), dtype=torch.float32))
        losses.append(loss.detach().float())
    return torch.stack(losses), torch.stack(norms)


def per_sample(model: nn.Module, batch: Batch, loss_fn: LossFn | None) -> SampleStats:
    """Each sample's loss and gradient norm at the model's current weights (``.grad`` is not touched).

    Random ops draw from torch's generators: wrap the call in ``rng.replaying`` to leave them as they were.
    Buffers a forward pass updates (batch-norm statistics) are the caller's to restore.
    """
    method = "vmap"
    try:
        losses, norms = _by_vmap(model, batch, loss_fn)
    except Exception:  # noqa: BLE001 - any model vmap cannot run is run sample by sample instead
        method = "loop"
        try:
            losses, norms = _by_loop(model, batch, loss_fn)
        except (ValueError, RuntimeError):  # e.g. BatchNorm1d cannot normalise one sample in training mode
            method = "loop-eval"
            training = model.training
            model.eval()
            try:
                losses, norms = _by_loop(model, batch, loss_fn)
            finally:
                model.train(training)
    return SampleStats(losses.detach().float().cpu(), norms.detach().float().cpu(), method)


def robust_z(values: Tensor, log: bool = True) -> Tensor:
    """``z_i = (x_i - median_{j != i} x_j) / max(1.4826 MAD_{j != i}, SIGMA_FLOOR)`` over the finite values
    (of ``log x`` when ``log``); +inf where ``x_i`` is not finite, 0 where there is nothing to compare with."""
    x = values.double()
    finite = torch.isfinite(x)
    if log:
        x = torch.log(x.clamp(min=1e-30))
    n = x.numel()
    others = x.expand(n, n).clone()
    others[~finite.expand(n, n)] = math.nan
    others.fill_diagonal_(math.nan)
    median = others.nanmedian(dim=1).values
    mad = (others - median[:, None]).abs().nanmedian(dim=1).values
    z = (x - median) / (1.4826 * mad).clamp(min=SIGMA_FLOOR)
    z = torch.nan_to_num(z, nan=0.0)
    return torch.where(finite, z, math.inf).float()


def scores_of(stats: SampleStats) -> Tensor:
    """``score_i = max(z_i(loss), z_i(grad norm))`` (see the module docstring)."""
    losses = stats.losses
    finite_losses = losses[torch.isfinite(losses)]
    positive = bool((finite_losses > 0).all()) if finite_losses.numel() else True
    return torch.maximum(robust_z(losses, log=positive), robust_z(stats.grad_norms))


def responsible(scores: Tensor, ids: list[object], z_thresh: float, top_k: int) -> tuple[list[object], list[float]]:
    """The ids with ``score > z_thresh``, highest score first, at most ``top_k``, and their scores. When some
    samples are non-finite (score inf), only they are named: a NaN/Inf in the batch explains the step, and
    a finite sample that merely stands out does not."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    threshold = math.inf if bool(torch.isinf(scores).any()) else z_thresh
    chosen = [i for i in order if scores[i] > z_thresh and scores[i] >= threshold][:top_k]
    return [ids[i] for i in chosen], [float(scores[i]) for i in chosen]

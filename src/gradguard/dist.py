"""Distributed training: global norms and the same decision on every rank.

Under ``torch.distributed`` every rank must clip, skip and roll back at the same step, or the replicas
drift apart (DDP) or the shards stop matching (FSDP). The Guard makes every rank see the same numbers
before it decides, with **one collective per guarded step**: the per-layer norms (or powers), the count of
non-finite tensors and the loss, packed in one small vector:

* **replicated gradients** (DDP, or plain tensors): every rank holds the whole, already averaged gradient.
  The per-layer norms and the loss are averaged over ranks; equal inputs stay equal, and a NaN on one
  rank (a fault the all-reduce of the backward pass did not see) becomes a NaN on all of them.
* **sharded gradients** (FSDP2 / DTensor with a ``Shard`` placement): each rank holds a slice. Norms are
  combined from the slices: ``||g||_p^p = sum_ranks ||g_r||_p^p`` (the max for ``p = inf``, where the
  one collective is an all-gather, reduced on each rank). A DTensor gradient with a ``Replicate``
  placement counts ``1 / world`` on each rank so that it is counted once.

No second collective for the decision: every input of the decision is either one of these global values or
a deterministic function of them and of state that every rank updated from the same values (the detector,
the clip strategy), so every rank takes the same decision (skip, coefficient, rollback) by itself. At
thousands of ranks each small collective is a latency-bound step on the communication stream.
These are device collectives; none reads a tensor on the host.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from gradguard.stats import GradStats, combine_norms, is_dtensor, segment_norms


def process_group_or_none(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """``group`` (or the default group) when torch.distributed is initialised with more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _is_dtensor(t: Tensor | None) -> bool:
    return t is not None and is_dtensor(t)


def _is_sharded(t: Tensor) -> bool:
    return _is_dtensor(t) and any(p.is_shard() for p in t.placements)  # type: ignore[attr-defined]


def local_named_parameters(named: list[tuple[str, Tensor]]) -> tuple[list[tuple[str, Tensor]], list[bool]]:
    """Replace DTensor parameters by leaf views of their local shard, carrying the local gradient shard.

    Every DTensor parameter is replaced, with a gradient or without (after ``zero_grad(set_to_none=True)``
    the weights are still checked at a flush, and local and distributed tensors cannot be mixed in one op).
    The stand-ins share memory with the DTensors' local tensors, so clipping them in place clips the real
    gradients. Returns the named stand-ins and, for each, whether its gradient (or, without one, the
    parameter) is sharded.
    """
    out: list[tuple[str, Tensor]] = []
    sharded: list[bool] = []
    for name, p in named:
        if _is_dtensor(p):
            holder = p.detach().to_local()  # type: ignore[attr-defined]
            if p.grad is not None:
                holder.grad = p.grad.to_local() if _is_dtensor(p.grad) else p.grad  # type: ignore[attr-defined]
            out.append((name, holder))
            sharded.append(_is_sharded(p.grad if p.grad is not None else p))
        else:
            out.append((name, p))
            sharded.append(False)
    return out, sharded


def all_reduce_stats(
    stats: GradStats,
    loss: Tensor | None,
    group: dist.ProcessGroup,
    sharded: list[bool] | None = None,
) -> tuple[GradStats, Tensor | None]:
    """Global per-layer norms, total norm, finite flag and mean loss, equal on every rank: one collective.

    ``sharded[i]`` says whether ``stats.params[i]``'s gradient is a shard (see the module docstring).
    """
    world = dist.get_world_size(group)
    device = stats.total_norm.device
    p = stats.norm_type
    loss_value = (
        torch.zeros((), device=device) if loss is None else loss.detach().float().reshape(()).to(device)
    )
    any_sharded = bool(sharded) and any(sharded)  # type: ignore[arg-type]
    if not any_sharded:
        # replicated: average norms and loss. NaN anywhere spreads to every rank.
        packed = torch.cat([stats.norms, loss_value.reshape(1).to(stats.norms.dtype)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed / world
        norms, loss_value = packed[:-1], packed[-1].float()
        total = combine_norms(norms, p) if norms.numel() else stats.total_norm
    else:
        assert sharded is not None
        n = len(stats.names)
        dtype = stats.param_norms.dtype
        weight = torch.tensor([1.0 if s else 1.0 / world for s in sharded], dtype=dtype, device=device)
        index = torch.tensor(stats.group_index, device=device)
        # per layer, how many of its shards are not finite (counted apart: a NaN must stay in its layer
        # whatever the collective does with it, and an Inf must not be lost to an Inf - Inf)
        nonfinite = torch.zeros(n, dtype=dtype, device=device)
        nonfinite.index_add_(0, index, (~torch.isfinite(stats.param_norms)).to(dtype))
        if p == math.inf:  # a max for the norms, a sum for the rest: gather once, reduce on each rank
            local = torch.cat([segment_norms(stats.param_norms, index, n, p), nonfinite,
                               loss_value.reshape(1).to(dtype)])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local, group=group)
            ranks = torch.stack(gathered)
            norms = ranks[:, :n].amax(dim=0)
            packed = ranks[:, n:].sum(dim=0)
        else:
            powers = torch.zeros(n, dtype=dtype, device=device)
            powers.index_add_(0, index, stats.param_norms.pow(p) * weight)
            packed = torch.cat([powers, nonfinite, loss_value.reshape(1).to(dtype)])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            norms = packed[:n].pow(1.0 / p)
        nonfinite, loss_value = packed[-1 - n : -1], (packed[-1] / world).float()
        norms = torch.where(nonfinite > 0, torch.full_like(norms, math.nan), norms)
        total = combine_norms(norms, p) if norms.numel() else stats.total_norm
    finite = torch.isfinite(total)
    new_stats = replace(stats, total_norm=total, norms=norms, finite=finite)
    return new_stats, None if loss is None else loss_value


def all_reduce_max_(flags: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Element-wise MAX over ranks, in place: any rank's True (or largest value) wins everywhere."""
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags

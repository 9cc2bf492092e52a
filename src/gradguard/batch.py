"""The batch and loss convention: how gradguard calls a user's model on a batch and gets a loss.

A batch is one of:

* ``(inputs, targets)``: the model is called as ``model(inputs)`` and the loss is
  ``loss_fn(output, targets)``; a third item, ``(inputs, targets, ids)``, names the samples;
* a dict of keyword inputs (a Hugging Face batch): the model is called as ``model(**inputs)``; the loss is
  ``output.loss`` (a ``ModelOutput``, a dict with a ``"loss"`` key, or the first item of a tuple, as
  ``return_dict=False`` gives it) when ``loss_fn`` is None, else ``loss_fn(output, batch)``. An ``"ids"`` or ``"index"`` key names the samples and is not passed to the
  model.

Without ids a sample is named by its position in the batch. The batch dimension is the first dimension of
the first input tensor; every tensor (inputs, targets, ids) whose first dimension has that size is cut
along it when one sample is taken out (:func:`take`), everything else is passed whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["ID_KEYS", "Batch", "as_batch", "check_model_and_loss_fn", "forward_loss", "leaf_inputs", "leaves",
           "model_loss", "scalar_loss", "take", "to_device"]

#: Keys of a dict batch that name its samples (the first one present is used).
ID_KEYS = ("ids", "index")

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class Batch:
    """A batch split by the convention.

    Attributes:
        inputs: what the model takes: a tensor (or any pytree) for ``model(inputs)``, or a dict for
            ``model(**inputs)`` when ``keyword``.
        targets: the second item of a pair; for a dict batch, the whole dict (what ``loss_fn`` gets).
        ids: the sample ids as given (a tensor, a list), or None.
        keyword: True for a dict batch.
        size: the number of samples (first dimension of the first input tensor).
    """

    inputs: Any
    targets: Any
    ids: Any
    keyword: bool
    size: int

    def sample_ids(self) -> list[Any]:
        """One id per sample: the batch's own ids as Python values, else positions ``0..size-1``."""
        if self.ids is None:
            return list(range(self.size))
        ids = self.ids.tolist() if isinstance(self.ids, Tensor) else list(self.ids)
        if len(ids) != self.size:
            raise ValueError(f"batch: {len(ids)} sample ids for a batch of {self.size} samples")
        return ids

    def as_given(self) -> Any:
        """The batch in the user's form (the ids put back)."""
        if self.keyword:
            return self.targets
        if self.ids is None:
            return (self.inputs, self.targets)
        return (self.inputs, self.targets, self.ids)


def _first_size(tree: Any) -> int | None:
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def as_batch(batch: Any, where: str = "batch") -> Batch:
    """Split ``batch`` by the convention; raises ``ValueError`` naming ``where`` when it fits none."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):
        batch = dict(batch)  # a BatchEncoding (a UserDict) as a plain dict
        id_key = next((k for k in ID_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != id_key}
        ids = batch[id_key] if id_key is not None else None
        size = _first_size(inputs)
        if size is None:
            raise ValueError(f"{where}: a dict batch needs at least one tensor input with a batch dimension")
        return Batch(inputs, batch, ids, keyword=True, size=size)
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        size = _first_size(batch[0])
        if size is None:
            raise ValueError(f"{where}: the inputs (item 0) need a tensor with a batch dimension")
        return Batch(batch[0], batch[1], batch[2] if len(batch) == 3 else None, keyword=False, size=size)
    raise ValueError(
        f"{where}: a batch must be (inputs, targets), (inputs, targets, ids) or a dict of keyword inputs, "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def check_model_and_loss_fn(model: object, loss_fn: object, where: str) -> None:
    """``TypeError`` naming ``where`` for a model that is not an ``nn.Module`` or a loss_fn not callable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable as loss_fn(output, targets), or None to read the loss "
                        f"from the output (output.loss), got {type(loss_fn).__name__}")


def scalar_loss(loss: object, where: str) -> Tensor:
    """``loss`` as a 0-d tensor; ``TypeError`` naming ``where`` when it is not a one-element tensor."""
    if not (isinstance(loss, Tensor) and loss.numel() == 1):
        raise TypeError(f"{where}: the loss must be a scalar tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    return loss.reshape(())


def model_loss(output: Any) -> Tensor:
    """``output.loss`` of a Hugging Face style output (attribute, ``"loss"`` key, or a tuple's first item)."""
    if isinstance(output, dict):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) and output[0].numel() == 1:
        loss = output[0]  # return_dict=False: (loss, logits, ...) when labels were given
    else:
        loss = getattr(output, "loss", None)
    if not isinstance(loss, Tensor):
        raise ValueError("batch: with no loss_fn the model's output must carry a loss (output.loss); "
                         "pass labels in the batch, or give a loss_fn")
    return loss


def forward_loss(model: nn.Module | Callable[..., Any], batch: Batch, loss_fn: LossFn | None) -> tuple[Any, Tensor]:
    """Call the model on the batch; returns ``(output, loss)``."""
    if batch.keyword:
        output = model(**batch.inputs)
        loss = model_loss(output) if loss_fn is None else loss_fn(output, batch.targets)
    else:
        if loss_fn is None:
            raise ValueError("batch: an (inputs, targets) batch needs a loss_fn(output, targets)")
        output = model(batch.inputs)
        loss = loss_fn(output, batch.targets)
    return output, loss


def _cut(tree: Any, size: int, index: slice) -> Any:
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == size else t,
                    tree)


def take(batch: Batch, index: int | slice) -> Batch:
    """Samples ``index`` of the batch (an int gives a batch of one), same form."""
    cut = index if isinstance(index, slice) else slice(index, index + 1)
    size = len(range(batch.size)[cut])
    targets = _cut(batch.targets, batch.size, cut)
    inputs = {k: targets[k] for k in batch.inputs} if batch.keyword else _cut(batch.inputs, batch.size, cut)
    ids = _cut(batch.ids, batch.size, cut) if isinstance(batch.ids, Tensor) else (
        None if batch.ids is None else list(batch.ids)[cut])
    return Batch(inputs, targets, ids, batch.keyword, size)


def leaves(batch: Batch) -> tuple[list[Tensor], Callable[[list[Tensor]], Batch]]:
    """The per-sample tensors of the batch (first dimension = batch size) and a function that puts new
    tensors in their place (``torch.func.vmap`` maps over the first, then calls the second)."""
    flat, spec = tree_flatten(batch.targets if batch.keyword else (batch.inputs, batch.targets))
    where = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch.size]

    def put(tensors: list[Tensor]) -> Batch:
        new = list(flat)
        for i, t in zip(where, tensors):
            new[i] = t
        if batch.keyword:
            targets = tree_unflatten(new, spec)
            inputs = {k: targets[k] for k in batch.inputs}
        else:
            inputs, targets = tree_unflatten(new, spec)
        size = _first_size(inputs) or 0
        return Batch(inputs, targets, None, batch.keyword, size)

    return [flat[i] for i in where], put


def leaf_inputs(batch: Batch) -> tuple[Batch, list[Tensor]]:
    """The batch with each floating-point input tensor replaced by a detached leaf that takes a gradient, and
    those leaves: after ``backward`` their ``.grad`` is ``dL/dx`` at the model input. Integer inputs (token
    ids) stay as they are."""
    new_leaves: list[Tensor] = []

    def leaf(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.detach().requires_grad_(True)
            new_leaves.append(x)
        return x

    inputs = tree_map(leaf, batch.inputs)
    return Batch(inputs, batch.targets, batch.ids, batch.keyword, batch.size), new_leaves


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of a batch (any form) moved to ``device``, detached."""
    return tree_map(lambda t: t.detach().to(device) if isinstance(t, Tensor) else t, batch)

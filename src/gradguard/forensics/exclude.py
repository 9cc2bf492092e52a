"""Leave out the samples forensics named, so a resumed run does not see them again.

::

    bad = [s["id"] for s in guard.bad_samples]         # ids: the batch's "ids"/"index", else positions
    loader = DataLoader(gg.forensics.exclude(dataset, bad), batch_size=32, shuffle=True)
    # or keep the dataset and wrap its sampler:
    loader = DataLoader(dataset, sampler=gg.forensics.exclude(RandomSampler(dataset), bad), batch_size=32)

The ids must be dataset indices: have the batch carry them (an ``"index"`` key, or a third tuple item);
positions within a batch name samples only within that batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any, cast

from torch.utils.data import Dataset, IterableDataset, Sampler, Subset

__all__ = ["ExcludingSampler", "exclude"]


def _id_set(ids: Iterable[Any]) -> set[Any]:
    """Ids from plain ids or from ``guard.bad_samples`` records (``{"id", "step", "score"}``)."""
    out = set()
    for item in ids:
        out.add(item["id"] if isinstance(item, dict) else item)
    return out


class ExcludingSampler(Sampler):
    """A sampler that yields what ``sampler`` yields, except ``ids`` (indices, or lists of indices for a
    batch sampler, each list filtered and dropped when emptied)."""

    def __init__(self, sampler: Iterable[Any], ids: Iterable[Any]):
        self.sampler = sampler
        self.ids = _id_set(ids)

    def __iter__(self) -> Iterator[Any]:
        for item in self.sampler:
            if isinstance(item, list):
                kept = [i for i in item if i not in self.ids]
                if kept:
                    yield kept
            elif item not in self.ids:
                yield item

    def __len__(self) -> int:
        """Exact for samplers that yield each index once (sequential, shuffled without replacement)."""
        if not isinstance(self.sampler, Sized):
            raise TypeError("ExcludingSampler: the wrapped sampler has no len()")
        source = getattr(self.sampler, "data_source", None)
        if isinstance(source, Sized):
            return len(self.sampler) - sum(1 for i in self.ids if isinstance(i, int) and 0 <= i < len(source))
        return sum(1 for _ in self)


def exclude(data: Any, ids: Iterable[Any]) -> Any:
    """``data`` without the samples ``ids``: a ``Subset`` of a map-style dataset, or an
    :class:`ExcludingSampler` around a sampler (or a batch sampler)."""
    if isinstance(data, Sampler):
        return ExcludingSampler(data, ids)
    if isinstance(data, IterableDataset):
        raise TypeError("exclude: an IterableDataset has no indices; filter its stream by id instead")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and isinstance(data, Sized)):
        drop = _id_set(ids)
        size = len(cast(Sized, data))
        bad = [i for i in drop if not (isinstance(i, int) and 0 <= i < size)]
        if bad:
            raise ValueError(f"exclude: ids must be indices of the dataset (0..{size - 1}), got {bad[:5]}")
        return Subset(cast(Dataset, data), [i for i in range(size) if i not in drop])
    raise TypeError(f"exclude: data must be a map-style dataset or a sampler, got {type(data).__name__}")

"""count_host_syncs counts every read of tensor values on the host, each once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import gradguard as gg

t = torch.tensor([1.0, 0.0, 3.0])
mask = t > 0
SYNCS: dict[str, Callable[[], object]] = {
    "item": lambda: t[0].item(),
    "bool / if": lambda: 1 if mask.any() else 0,
    "float": lambda: float(t[0]),
    "int": lambda: int(t[0]),
    "list index": lambda: [1, 2, 3][torch.tensor(1)],
    "format": lambda: f"{t[0]:.2f}",
    "tolist": lambda: t.tolist(),
    "numpy": lambda: t.numpy(),
    "cpu": lambda: t.cpu(),
    "cpu().numpy().tolist()": lambda: t.cpu().numpy().tolist(),
    "repr": lambda: repr(t),
    "print / str": lambda: str(t),
    "nonzero": lambda: t.nonzero(),
    "where(cond)": lambda: torch.where(mask),
    "argwhere": lambda: torch.argwhere(t),
    "boolean mask index": lambda: t[mask],
    "boolean list index": lambda: t[[True, False, True]],
    "boolean mask assignment": lambda: t.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: t.masked_select(mask),
    "unique": lambda: t.unique(),
    "unique_consecutive": lambda: t.unique_consecutive(),
    "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
    "bincount": lambda: torch.bincount(torch.tensor([0, 2])),
    "equal": lambda: torch.equal(t, t),
    "allclose": lambda: torch.allclose(t, t),
}
NO_SYNCS: dict[str, Callable[[], object]] = {
    "arithmetic": lambda: (t * 2 + 1).sum(),
    "masked_fill": lambda: t.masked_fill(mask, 0.0),
    "where(cond, a, b)": lambda: torch.where(mask, t, 0.0),
    "integer index": lambda: t[torch.tensor([0, 2])],
    "slice": lambda: t[1:],
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(torch.tensor([1, 2]), output_size=3),
    "nonzero_static": lambda: torch.nonzero_static(t, size=3),
    "shape": lambda: t.shape[0] + t.numel(),
    "to(same device)": lambda: t.to("cpu"),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_each_host_read_counts_once(name: str) -> None:
    with gg.count_host_syncs() as syncs:
        SYNCS[name]()
    assert syncs.count == 1, syncs.reads
    assert len(syncs.reads) == 1


@pytest.mark.parametrize("name", list(NO_SYNCS))
def test_device_only_work_counts_nothing(name: str) -> None:
    with gg.count_host_syncs() as syncs:
        NO_SYNCS[name]()
    assert syncs.count == 0, syncs.reads


def test_counts_add_up_and_name_what_they_saw() -> None:
    with gg.count_host_syncs() as syncs:
        t[0].item()
        t.tolist()
        t[mask]
    assert syncs.count == 3
    assert syncs.reads == ["aten._local_scalar_dense", "Tensor.tolist", "aten.index"]


def test_counter_is_a_reusable_context_manager() -> None:
    counter = gg.syncs.HostSyncCounter()
    with counter:
        t.tolist()
    t.tolist()  # outside: not counted
    assert counter.count == 1

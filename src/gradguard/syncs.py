"""Count host syncs: the reads that make the CPU wait for the device.

On a GPU, the Python thread queues kernels and runs ahead of them; anything that needs a tensor's values
(or a size that depends on them) on the host blocks it until the queue has run. A training step that does
so cannot run ahead of the device. The counter counts every such read, on any device, the CPU included
(where nothing waits, but the same code would on a GPU)::

    with gg.count_host_syncs() as syncs:
        guard.step(loss)
    assert syncs.count <= 1, syncs.reads

What is counted, each call once:

* values read into Python: ``.item()``, ``bool(t)`` (a Python ``if``), ``float(t)``, ``int(t)``, indexing
  a list with a tensor (all end in ``aten._local_scalar_dense``), ``t.tolist()``, ``t.numpy()``,
  ``repr(t)`` / ``print(t)``, and ops that return a Python bool (``torch.equal``, ``torch.allclose``);
* copies to the host: ``t.cpu()`` (counted on the CPU too: the same line copies from a GPU), and a
  ``.to("cpu")`` / ``copy_`` from another device that is not ``non_blocking``;
* ops whose output size depends on the values, which the device must compute before the host can
  allocate the result: ``nonzero`` (``torch.where(cond)``, ``argwhere``), boolean-mask indexing
  ``t[mask]`` and assignment ``t[mask] = v``, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size``, ``bincount``, sparse ``coalesce``.

Python-level reads (``tolist``, ``numpy``, ``cpu``, ``repr``) are seen by a ``TorchFunctionMode``, the rest
by a ``TorchDispatchMode`` on their ATen ops; an ATen op run inside a counted Python-level read (the copy
inside a GPU tensor's ``tolist()``) is not counted again, nor is reading the result of a counted ``.cpu()``
(``t.cpu().numpy()`` is one read). ``.to("cpu")`` of a tensor already on the CPU is
not counted (it does nothing, and on the CPU the counter cannot tell it from a move to the device).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "count_host_syncs"]

aten = torch.ops.aten

# Python-level reads of a tensor's values, and the host copy ``.cpu()``.
_HOST_READ_METHODS = frozenset({"tolist", "numpy", "cpu", "__repr__", "__str__"})

# ATen ops that read values into Python or size their output by the values.
_SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense.default,  # item(), bool(), float(), int(), __index__
        aten.is_nonzero.default,
        aten.equal.default,
        aten.allclose.default,
        aten.nonzero.default,
        aten.nonzero.out,
        aten.masked_select.default,
        aten._unique.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.unique_dim_consecutive.default,
        aten.bincount.default,
        aten._coalesce.default,
    }
)
_INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default})
_COPY_OPS = frozenset({aten._to_copy.default, aten.copy_.default})


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _SYNC_OPS:
        return True
    if func in _INDEX_OPS:  # t[mask], t[mask] = v: the mask becomes indices through nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_mask(i) for i in indices)
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _COPY_OPS:  # a blocking copy from a device to the host
        if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
            return False
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            return dst.device.type == "cpu" and src.device.type != "cpu"
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    return False


class _PythonReads(TorchFunctionMode):
    """Counts the Python-level reads for ``counter``; marks it busy while one runs."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        counter = self.counter
        if name not in _HOST_READ_METHODS or counter._busy or counter._on_host(args[0] if args else None):
            return func(*args, **(kwargs or {}))
        counter._record(f"Tensor.{name}")
        counter._busy = True
        try:
            result = func(*args, **(kwargs or {}))
        finally:
            counter._busy = False
        if name == "cpu":
            counter._host_copies[id(result)] = weakref.ref(result)
        return result


class HostSyncCounter(TorchDispatchMode):
    """A mode that counts host syncs: ``count``, and what each one was in ``reads`` (``"aten.nonzero"``,
    ``"Tensor.tolist"``, ...). Enter it with ``with``; see the module docstring for what is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.reads: list[str] = []
        self._busy = False
        self._host_copies: dict[int, weakref.ref] = {}  # results of counted .cpu(): reading them is free
        self._python_reads = _PythonReads(self)

    def _on_host(self, tensor: Any) -> bool:
        ref = self._host_copies.get(id(tensor))
        return ref is not None and ref() is tensor

    def _record(self, what: str) -> None:
        self.count += 1
        self.reads.append(what)

    def __enter__(self) -> HostSyncCounter:
        self._python_reads.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._python_reads.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._python_reads.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self._busy and _is_sync(func, args, kwargs):
            self._record(str(func.overloadpacket))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Count the host syncs made inside the ``with`` block (``counter.count``, ``counter.reads``)."""
    with HostSyncCounter() as counter:
        yield counter

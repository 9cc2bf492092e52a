"""Which layers get a series of their own in a tracker, and how the rest are summarised.

A model of a few hundred layers logged as one series per layer makes hundreds of charts that nobody reads
(and, in MLflow, hundreds of metric rows per logged step). The tracker sinks (``gradguard.sinks.WandB``,
``gradguard.sinks.MLflow``) therefore give a series to the layers the user names, or else to the ``top_k``
largest norms of the step, a layer whose norm is NaN or infinite always first, and summarise every layer
in a few numbers (:meth:`Layers.summary`). TensorBoard and the framework loggers keep every layer
(:func:`gradguard.sinks.scalars_of`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


class Layers:
    """The layers a tracker logs one by one.

    Args:
        names: the layers to log at every layer step, by the names of ``guard.history`` (``"blocks.3.attn"``);
            ``None``: the ``top_k`` largest of each step instead.
        top_k: how many layers get a series when ``names`` is None (the layers whose norm is not finite
            come first; then the largest norms). 0: none, only the summary.
    """

    def __init__(self, names: Sequence[str] | None = None, top_k: int = 8):
        if isinstance(names, str):
            raise ValueError(f"Layers: names must be a list of layer names, got the string {names!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"Layers: top_k must be an int >= 0, got {top_k!r}")
        self.names = None if names is None else list(names)
        self.top_k = top_k

    def pick(self, norms: Mapping[str, float]) -> dict[str, float]:
        """The norms of the layers that get a series at this step, by name."""
        if self.names is not None:
            return {name: norms[name] for name in self.names if name in norms}

        def size(item: tuple[str, float]) -> float:  # not finite sorts above every finite norm
            return math.inf if not math.isfinite(item[1]) else item[1]

        return dict(sorted(norms.items(), key=size, reverse=True)[: self.top_k])

    @staticmethod
    def summary(norms: Mapping[str, float]) -> dict[str, float]:
        """Every layer in four numbers: ``layer_norm_p50``, ``layer_norm_p99`` and ``layer_norm_max`` over the
        finite norms (left out when none is finite), and ``layers_nonfinite``, how many are NaN or infinite."""
        values = np.asarray(list(norms.values()), dtype=np.float64)
        finite = values[np.isfinite(values)]
        out = {"layers_nonfinite": float(values.size - finite.size)}
        if finite.size:
            p50, p99 = np.percentile(finite, [50, 99])
            out.update(layer_norm_p50=float(p50), layer_norm_p99=float(p99), layer_norm_max=float(finite.max()))
        return out

    def __repr__(self) -> str:
        return f"Layers(names={self.names!r})" if self.names is not None else f"Layers(top_k={self.top_k})"

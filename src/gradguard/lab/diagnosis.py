"""The doctor's view of a lab model at initialization, as JSON values for a run's record.

The gradient flow comes from ``gg.doctor`` (issue 4): the norm of the error signal at each layer's
output, in depth order (Glorot & Bengio 2010, eqs. 13-14). Where the doctor is not available, the
per-layer weight-gradient norms of one backward pass (``gg.grad_stats``) stand in, and the record says so.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradguard.lab.remedies import Batch, LossFn
from gradguard.stats import grad_stats


def gradient_flow_at_init(model: nn.Module, batch: Batch, loss_fn: LossFn) -> dict[str, Any]:
    """``{"source", "names", "norms", "verdict", "start_layer"}``: per-layer gradient norms at init."""
    import gradguard

    doctor = getattr(gradguard, "doctor", None)
    if not callable(doctor):  # the doctor (issue 4) is not in this version
        return _weight_gradient_flow(model, batch, loss_fn)
    report = doctor(model, batch, loss_fn)
    flow = doctor_layer_flow(report.to_dict())
    return {"source": "doctor", **flow, "verdict": report.verdict, "start_layer": report.start_layer}


def doctor_layer_flow(report: dict[str, Any]) -> dict[str, list]:
    """Per-layer names and gradient norms from ``report.to_dict()``."""
    layers = report["gradient_flow"]["layers"]
    return {"names": [layer["name"] for layer in layers], "norms": [layer["grad_norm"] for layer in layers]}


def _weight_gradient_flow(model: nn.Module, batch: Batch, loss_fn: LossFn) -> dict[str, Any]:
    inputs, targets = batch
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    stats = grad_stats(model)
    model.zero_grad(set_to_none=True)
    return {
        "source": "grad_stats",
        "names": stats.names,
        "norms": stats.norms.tolist(),
        "verdict": None,
        "start_layer": None,
    }

"""The doctor's view of a lab model at initialization, as JSON values for a run's record.

The gradient flow comes from ``gg.doctor``: the norm of the error signal ``||dL/dy_l||`` at each
layer's output, in depth order (Glorot & Bengio 2010, eqs. 13-14), its fitted total growth and the
doctor's verdict; for recurrent models also ``||dL/dh_t||`` over time. Where the doctor fails on a model,
the per-layer weight-gradient norms of one backward pass (``gg.grad_stats``) stand in, and the record
says so (``source``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradguard.explain import doctor
from gradguard.lab.remedies import Batch, LossFn
from gradguard.stats import grad_stats

JACOBIAN_ITERATIONS = 3  # the lab reads the flow, not the Jacobian: keep the doctor's power iteration short


def gradient_flow_at_init(model: nn.Module, batch: Batch, loss_fn: LossFn) -> dict[str, Any]:
    """``{"source", "names", "norms", "weight_grads", "total_growth", "verdict", "start_layer", "time"}``."""
    try:
        report = doctor(model, batch, loss_fn, jacobian_iterations=JACOBIAN_ITERATIONS).to_dict()
    except Exception as error:  # a doctor failure must not lose the training run: measure the plain way
        flow = _weight_gradient_flow(model, batch, loss_fn)
        return {**flow, "source": f"grad_stats (the doctor raised {type(error).__name__}: {error})"}
    return {"source": "doctor", **doctor_layer_flow(report)}


def doctor_layer_flow(report: dict[str, Any]) -> dict[str, Any]:
    """The lab's fields from ``DoctorReport.to_dict()``."""
    depth = report["depth_flow"]
    time = report.get("time_flow")
    return {
        "names": [layer["name"] for layer in depth["layers"]],
        "norms": [layer["error_signal"] for layer in depth["layers"]],
        "weight_grads": [layer["weight_grad"] for layer in depth["layers"]],
        "total_growth": depth["total_growth"],
        "verdict": report["verdict"],
        "start_layer": report["start_layer"],
        "time": None if time is None else {
            "grad_norm_per_step": time.get("grad_norm_per_step"),
            "total_growth": time.get("total_growth"),
            "verdict": time.get("verdict"),
        },
    }


def _weight_gradient_flow(model: nn.Module, batch: Batch, loss_fn: LossFn) -> dict[str, Any]:
    inputs, targets = batch
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    stats = grad_stats(model)
    model.zero_grad(set_to_none=True)
    norms = stats.norms.tolist()
    return {
        "source": "grad_stats",
        "names": stats.names,
        "norms": norms,
        "weight_grads": norms,
        "total_growth": None,
        "verdict": None,
        "start_layer": None,
        "time": None,
    }

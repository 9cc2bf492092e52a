"""``gradguard replay``: run a bad step again from its bundle and say what to blame.

The model in a bundle is *trained*: the bundle holds the weights of step ``bundle["step"]``, so nothing
here suggests re-initialising it (the doctor runs with ``trained=True``). The step is recomputed (forward
and backward of every micro-batch, each from its own random-number state, as ``reproduce.py`` does live)
and the blame is put, in this order, on the first of these that holds (Megatron-LM's rerun verdicts:
transient or persistent, and then what persists):

1. ``"transient"``: the step does not come back (``reproduce.reproduces``): a fault of the moment (a flaky
   kernel, a bit flip, nondeterminism, something that ran outside the bundled step). Nothing to change in
   the data or the model; the Guard's skip was the right response.
2. ``"data"``: forensics named samples that stand out from the rest of their batch (their score: a robust z
   of their loss and gradient norm, ``samples.py``): the data is to blame; the fix leaves them out of the
   resumed run with ``gg.forensics.exclude``.
3. ``"nonfinite"``: a NaN/Inf comes back and no sample carries it in: the module where it starts
   (``locate_nonfinite``) is to blame; its fix is the doctor's (an epsilon, a clamp).
4. ``"weights"``: the step comes back, no sample stands out: the weights or the learning rate are at fault.
   The layer is the one forensics found (its gradient left its own history) or else the doctor's start;
   the change is the doctor's that keeps the weights: rescale the one layer off its peers' scale, or a
   smaller learning rate (measured when the factory returns an optimizer), else a smaller learning rate or
   a clip for that layer.

``"none"`` when the replayed step comes back and nothing in it is out of line (a step that was flagged,
then found harmless). Exit codes of the command: 1 for ``"data"``, ``"nonfinite"`` and ``"weights"`` (a
finding), 0 for ``"transient"`` and ``"none"``, 2 for any bad input (``bundle.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradguard.batch import LossFn, as_batch, to_device
from gradguard.explain.diagnose import doctor
from gradguard.explain.init_audit import off_scale_layer
from gradguard.explain.nonfinite import NonfiniteOrigin, locate_nonfinite
from gradguard.explain.preserve import preserved
from gradguard.explain.remedies import rescale_layer
from gradguard.explain.report import DoctorReport
from gradguard.forensics import rng
from gradguard.forensics.bundle import Bundle, load_weights
from gradguard.forensics.reproduce import Recomputed, backward_window, reproduces
from gradguard.stats import grad_stats

__all__ = ["BLAMES", "FINDINGS", "StepDiagnosis", "diagnose_step", "exclude_line"]

#: What a replay can blame, in the order they are tried (module docstring).
BLAMES = ("transient", "data", "nonfinite", "weights", "none")
#: The blames that are findings (the command's exit code 1).
FINDINGS = ("data", "nonfinite", "weights")


def exclude_line(ids: list[Any]) -> str:
    """The line that leaves ``ids`` out of a resumed run (``gg.forensics.exclude``)."""
    return f"loader = DataLoader(gg.forensics.exclude(dataset, {ids!r}), batch_size=..., shuffle=True)"


@dataclass
class StepDiagnosis:
    """What a replayed step says.

    Attributes:
        step: the bad step's number (the weights are those of this step: trained).
        kinds: its events, as the Guard saw them.
        blame: one of :data:`BLAMES`.
        reason: one sentence, with the numbers.
        fix: the line to run (Python), or None.
        layer: the layer to blame (``"weights"``), or the module where a NaN/Inf starts (``"nonfinite"``).
        samples, scores: the samples forensics named and their scores (``"data"``).
        reproducible: whether the recomputed step brought its events back.
        live, replayed: ``(loss, gradient norm)`` of the live step and of the replay.
        origin: the first non-finite value of the replay, or None; micro_batch: in which micro-batch.
        report: the doctor's report on the trained weights (``"weights"`` only), or None.
    """

    step: int
    kinds: list[str]
    blame: str
    reason: str
    fix: str | None
    layer: str | None
    samples: list[Any]
    scores: list[float]
    reproducible: bool
    live: tuple[float, float]
    replayed: tuple[float, float]
    origin: NonfiniteOrigin | None = None
    micro_batch: int | None = None
    report: DoctorReport | None = field(default=None, repr=False)

    @property
    def finding(self) -> bool:
        return self.blame in FINDINGS

    def __str__(self) -> str:
        lines = [
            f"step {self.step}: {', '.join(self.kinds) or 'no event'} (live: loss {self.live[0]:.4g}, gradient norm "
            f"{self.live[1]:.4g}; replayed: loss {self.replayed[0]:.4g}, gradient norm {self.replayed[1]:.4g}; "
            f"{'reproduces' if self.reproducible else 'does not reproduce'}; trained weights of step {self.step})",
        ]
        if self.origin is not None:
            lines.append(f"replayed (micro-batch {self.micro_batch}): {self.origin}")
        lines.append(f"verdict: {self.blame}: {self.reason}")
        if self.fix is not None:
            lines.append(f"fix: {self.fix}")
        if self.report is not None:
            lines += ["", "doctor on the trained weights:", str(self.report)]
        return "\n".join(lines)


def _recompute(model: nn.Module, window: list[tuple[Any, rng.RngState | None]], loss_fn: LossFn | None,
               device: torch.device) -> Recomputed:
    """Forward and backward of the bundled micro-batches (``.grad``, buffers and generators left as they
    were): the loss (mean over micro-batches) and the gradient norm."""
    with preserved(model), rng.replaying(None, device):
        for param in model.parameters():
            param.grad = None
        losses = backward_window(model, window, loss_fn)
        stats = grad_stats(model)
        values = torch.stack([torch.stack(losses).sum().cpu(), stats.total_norm.float().cpu()]).tolist()
    return Recomputed(values[0], values[1], stats.norms.float().cpu(), [])


def _first_nonfinite(model: nn.Module, window: list[tuple[Any, rng.RngState | None]], loss_fn: LossFn | None,
                     device: torch.device) -> tuple[NonfiniteOrigin | None, int | None]:
    for i, (batch, state) in enumerate(window):
        with rng.replaying(state, device):
            origin = locate_nonfinite(model, batch, loss_fn)
        if origin is not None:
            return origin, i
    return None, None


def _weights_fix(report: DoctorReport, layer: str | None) -> tuple[str, str, str | None]:
    """``(fix, why, layer)``: the doctor's error finding that keeps the weights (a rescale, a learning
    rate), else the one layer off its peers' scale, rescaled, else a smaller learning rate or a clip for
    ``layer``."""
    kept = [f for f in report.findings if f.severity == "error" and "re-initialis" not in f.fix
            and not f.fix.startswith("# the weights are trained")]
    if kept:
        return kept[0].fix, f"the doctor on the trained weights: {kept[0].message}", kept[0].layer
    lone = off_scale_layer(report.init_checks)
    if lone is not None:
        check = lone.check
        remedy = rescale_layer(check.layer, lone.factor, f"the other layers' scale (x{lone.peers:.2g} of "
                               f"{check.scheme}'s {check.prescribed:.3g})")
        return remedy.code, (f"the weights of {check.layer!r} are x{1.0 / lone.factor:.2g} the scale of the "
                             f"other layers' (std {check.std:.3g}): rescale that layer alone"), check.layer
    where = repr(layer) if layer is not None else "the model"
    return (f"# lower the learning rate of {where} (its own parameter group), or cap its gradient: "
            "gg.Guard(model, optimizer, clip=gg.clip.LayerNorm(max_norm=...))",
            "the doctor finds no layer off its scale", layer)


def diagnose_step(bundle: Bundle, model: nn.Module, loss_fn: LossFn | None,
                  optimizer: torch.optim.Optimizer | None = None) -> StepDiagnosis:
    """Load the bundle's weights into ``model``, recompute its step and put the blame (module docstring).

    ``model`` and ``loss_fn`` come from the user's factory (the doctor's convention); ``optimizer``, when
    the factory returns one, lets the doctor measure the update size of its learning rate. The model is
    left holding the bundle's weights. ``BundleError`` (a ``ValueError``) when the model is not the
    bundle's."""
    load_weights(model, bundle)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    given = [to_device(item["batch"], device) for item in bundle["batches"]]
    window = [(as_batch(batch, f"micro-batch {i}"), item["rng"])
              for i, (batch, item) in enumerate(zip(given, bundle["batches"]))]
    live, found = bundle["live"], bundle["forensics"]
    kinds = [str(k) for k in live.get("kinds", [])]
    live_loss, live_norm = float(live.get("loss", math.nan)), float(live.get("total_norm", math.nan))
    recomputed = _recompute(model, window, loss_fn, device)
    came_back = reproduces(kinds, live_loss, live_norm, recomputed, len(window))
    origin, micro_batch = _first_nonfinite(model, window, loss_fn, device)
    samples, scores = list(found.get("samples") or []), [float(s) for s in found.get("scores") or []]
    layer = found.get("layer")
    common: dict[str, Any] = {"step": bundle["step"], "kinds": kinds, "samples": samples, "scores": scores,
                              "reproducible": came_back, "live": (live_loss, live_norm),
                              "replayed": (recomputed.loss, recomputed.total_norm), "origin": origin,
                              "micro_batch": micro_batch}

    if not came_back:
        reason = (f"recomputed from the same weights, batch and random-number state, the step does not raise "
                  f"{', '.join(kinds) or 'its events'} again: a fault of the moment (a flaky kernel, a bit flip, "
                  "nondeterminism), not the data or the model; skipping it was the right response")
        return StepDiagnosis(blame="transient", reason=reason, fix=None, layer=None, **common)
    if samples:
        named = ", ".join(f"{i!r} ({s:.3g})" for i, s in zip(samples, scores))
        reason = (f"the data: sample(s) {named} stand out from the rest of their batch (robust z of their loss "
                  "and gradient norm); leave them out of the resumed run")
        return StepDiagnosis(blame="data", reason=reason, fix=exclude_line(samples), layer=None, **common)
    if origin is not None:
        report = doctor(model, given[micro_batch or 0], loss_fn, jacobians=False, check_fixes=False, trained=True)
        first = next((f for f in report.findings if f.cause == "nonfinite"), None)
        reason = f"{origin.kind.upper()} starts in {origin.module!r} ({origin.phase} pass) and no sample carries it in"
        return StepDiagnosis(blame="nonfinite", reason=reason, fix=first.fix if first else None,
                             layer=origin.module, **common)
    with rng.replaying(window[0][1], device):
        report = doctor(model, given[0], loss_fn, optimizer=optimizer, jacobians=False, trained=True)
    layer = layer if layer is not None else report.start_layer
    if not kinds or report.healthy and layer is None:
        return StepDiagnosis(blame="none", reason="the step comes back and nothing in it is out of line",
                             fix=None, layer=None, report=report, **common)
    z = found.get("layer_z")
    where = (f"the gradient left its history first at {layer!r}" + (
        f" ({z:.3g} robust standard deviations above it)" if isinstance(z, (int, float)) and math.isfinite(z)
        else ""))
    fix, why, layer = _weights_fix(report, layer)
    reason = (f"the weights or the learning rate: the step comes back from the same weights and batch with no "
              f"sample out of line; {where}; {why}")
    return StepDiagnosis(blame="weights", reason=reason, fix=fix, layer=layer, report=report, **common)

"""Findings: what is wrong, the numbers that show it, and the change that fixes it, ranked by severity.

Each rule below reads the measurements of one cause and returns findings. A finding's ``fix`` is Python
that applies the fix, written against the names a user has at hand: ``gg`` (gradguard), ``nn``
(torch.nn), ``torch``, ``model``, ``batch`` (the ``(inputs, targets)`` given to the doctor) and
``optimizer``. The tests run each recommended fix with ``exec`` and diagnose again.

Severity: ``"error"`` when training is not expected to work as is (a flow that explodes or vanishes, NaN or
Inf at initialisation, updates larger than the weights), ``"warning"`` for a likely cause that has not (yet)
broken the flow, ``"info"`` for measurements worth knowing. Within a severity, findings are sorted by
``score``, how far the measurement is from healthy (in orders of magnitude where it is a ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradguard.explain.activation_stats import ActivationStats
from gradguard.explain.flow import DepthFlow, verdict_of
from gradguard.explain.init_audit import InitCheck, OffScaleLayer, RecurrentBound
from gradguard.explain.learning_rate import UPDATE_ERROR, UPDATE_WARNING, UpdateSize
from gradguard.explain.nonfinite import NonfiniteOrigin
from gradguard.explain.remedies import (
    REINITIALISES,
    Remedy,
    auto_init,
    chrono,
    lsuv,
    rescale_layer,
    saturating_classes,
    swap_saturating,
)
from gradguard.explain.time_flow import TimeFlow

__all__ = ["CAUSES", "DEAD_LIMIT", "SATURATED_LIMIT", "SEVERITIES", "Finding", "build_findings", "keep_trained",
           "rank"]

SEVERITIES = ("error", "warning", "info")
DEAD_LIMIT = 0.5  # more than half the units of a ReLU layer dead for the whole batch
SATURATED_LIMIT = 0.5  # more than half the units of a tanh/sigmoid layer saturated
HEALTHY_UPDATE = 1e-3  # the update/weight ratio a learning-rate fix aims at (see learning_rate.py)
PRESCRIBED = ("he", "xavier")  # the init checks whose ratio predicts the flow (init_explained_growth)

# What each cause is, in words: a finding's explanation names the cause its (checked) fix addresses.
CAUSES = {
    "init_scale": "the scale of the weights (their init)",
    "activation": "the saturating activations",
    "depth": "the depth itself: the weights match their formula, yet each layer's output variance drifts "
             "(LSUV sets it to 1 on this batch)",
    "recurrent": "the recurrent weights",
    "nonfinite": "a NaN or Inf",
}


@dataclass
class Finding:
    """One diagnosis.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        layer: the module it is about (None for the whole model).
        message: one sentence, with the numbers.
        fix: Python code that applies the fix (see the module docstring for the names it uses).
        evidence: the measurements behind it (JSON-serialisable).
        cause: a short key: ``"init_scale"``, ``"activation"``, ``"depth"``, ``"recurrent"``,
            ``"learning_rate"``, ``"nonfinite"``, ``"dead_units"``, ``"saturation"``, ``"jacobian"``.
        score: how far from healthy, for ranking within a severity.
        remedy: the fix as a function too, for flow findings (``remedies.py``); not in ``to_dict``.
    """

    severity: str
    layer: str | None
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)
    cause: str = ""
    score: float = 0.0
    remedy: Remedy | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "layer": self.layer, "message": self.message, "fix": self.fix,
                "evidence": self.evidence, "cause": self.cause, "score": self.score}


def rank(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; within each, the largest ``score`` first."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), -f.score))


def _orders(ratio: float) -> float:
    """How many orders of magnitude ``ratio`` is away from 1 (inf for non-finite or zero ratios)."""
    if not math.isfinite(ratio) or ratio <= 0:
        return math.inf
    return abs(math.log10(ratio))


def _init_fix(cells_present: bool) -> str:
    return auto_init(cells_present).code


def init_explained_growth(depth: DepthFlow, init_checks: list[InitCheck]) -> float:
    """The growth the init error alone predicts: ``prod_l std_l / prescribed_l`` over the counted layers.

    Each layer scales the backward signal in proportion to its weights' std, and the prescribed std gives a
    gain of 1 (Glorot & Bengio 2010; He et al. 2015), so the ratios multiply. A predicted growth past the
    verdict line on the measured side names the init as the cause even when no single layer is off by 2x
    (Xavier in a ReLU network: 1/sqrt(2) per layer).
    """
    ratio = {c.layer: c.ratio for c in init_checks if c.param == "weight" and c.scheme in PRESCRIBED}
    product = 1.0
    for layer in depth.layers:
        if layer.gain is not None and not layer.recurrent and layer.name in ratio:
            product *= ratio[layer.name]
    return product


def depth_findings(depth: DepthFlow, init_checks: list[InitCheck], model: nn.Module,
                   cells_present: bool, lone: OffScaleLayer | None = None) -> list[Finding]:
    """The flow's error finding. Its cause, in order: one layer off its peers' scale at the start
    (``init_audit.off_scale_layer``: rescale that layer alone); one layer off its formula where the growth
    jumps; weights off their formula (re-initialise); saturating activations; the depth itself (LSUV)."""
    if depth.verdict == "stable":
        return []
    flagged = [c for c in init_checks if c.flagged and c.scheme != "orthogonal"]
    explained = init_explained_growth(depth, init_checks)
    verb = "grows" if depth.verdict == "exploding" else "shrinks"
    start = next((layer for layer in depth.layers if layer.name == depth.start_layer), None)
    start_check = next((c for c in flagged if c.layer == depth.start_layer and c.param == "weight"
                        and c.scheme in PRESCRIBED), None)
    evidence: dict[str, Any] = {
        "total_growth": depth.total_growth,
        "growth_per_layer": depth.growth_per_layer,
        "counted_gains": depth.counted_gains,
        "start_layer": depth.start_layer,
        "start_gain": start.gain if start else None,
        "jump_gain": depth.jump_gain,
        "growth_explained_by_init": explained,
    }
    saturating = saturating_classes(model)
    remedy: Remedy
    if lone is not None and lone.check.layer == depth.start_layer:
        cause = "init_scale"  # one layer off the others' scale: rescale it alone, the other weights are kept
        check = lone.check
        why = (f"its weights' std is x{1.0 / lone.factor:.2g} that of the other layers ({check.std:.3g}; the "
               f"others sit at x{lone.peers:.2g} of {check.scheme}'s std for their activation)")
        remedy = rescale_layer(check.layer, lone.factor,
                               f"the other layers' scale (x{lone.peers:.2g} of {check.scheme}'s {check.prescribed:.3g})")
        evidence["off_scale_layer"] = {"layer": check.layer, "ratio_to_peers": 1.0 / lone.factor,
                                       "peers": lone.peers}
        evidence["mis_initialised_layers"] = [c.layer for c in flagged]
    elif depth.jump_gain is not None and start_check is not None:
        cause = "init_scale"  # one layer off its scale among well-scaled ones: rescale that layer alone
        why = (f"its weights' std is off by x{start_check.ratio:.2g} ({start_check.std:.3g} vs "
               f"{start_check.scheme} {start_check.prescribed:.3g} for {start_check.activation})")
        remedy = rescale_layer(start_check.layer, start_check.prescribed / start_check.std,
                               f"{start_check.scheme}'s std {start_check.prescribed:.3g}")
        evidence["mis_initialised_layers"] = [c.layer for c in flagged]
    elif flagged or verdict_of(explained) == depth.verdict:
        cause = "init_scale"
        off = [c for c in init_checks if c.scheme in PRESCRIBED] or flagged
        worst = max(off, key=lambda c: _orders(c.ratio))
        why = (f"the weights' std, off by x{worst.ratio:.2g} ({worst.layer!r}: {worst.std:.3g} vs "
               f"{worst.scheme} {worst.prescribed:.3g} for {worst.activation}), compounds to "
               f"x{explained:.3g} over the layers")
        remedy = auto_init(cells_present)
        evidence["mis_initialised_layers"] = [c.layer for c in flagged]
    elif depth.verdict == "vanishing" and saturating:
        cause = "activation"
        names = ", ".join(cls.__name__ for cls in saturating)
        why = f"the saturating activation(s) {names} pass at most 1 (tanh) or 1/4 (sigmoid) of the signal"
        remedy = swap_saturating(saturating, auto_init(cells_present))
    else:
        cause = "depth"
        why = "the weights match their prescribed scale, so the network's depth and structure compound it"
        remedy = lsuv()
    where = (f"x{depth.jump_gain:.3g} of it in one jump at {depth.start_layer!r}" if depth.jump_gain is not None
             else f"starting at {depth.start_layer!r}")
    rate = "" if depth.jump_gain is not None else \
        f" (x{depth.growth_per_layer:.3g} per layer over {depth.counted_gains} layer(s))"
    message = f"error signal {verb} x{depth.total_growth:.3g} from the last layer to the first{rate}, {where}: {why}"
    return [Finding("error", depth.start_layer, f"{depth.verdict} across depth: {message}", remedy.code, evidence,
                    cause, _orders(depth.total_growth), remedy)]


def time_findings(time: TimeFlow | None, bounds: list[RecurrentBound], cells_present: bool,
                  gated: bool = False) -> list[Finding]:
    if time is None or time.verdict == "stable":
        return []
    evidence = {"steps": time.steps, "total_growth": time.total_growth, "growth_per_step": time.growth_per_step,
                "dhT_dh0": time.dhT_dh0}
    above = [b for b in bounds if b.layer == time.module and b.exceeds]
    if time.verdict == "exploding":
        if above:
            why = (f"sigma_max({above[0].param}) = {above[0].spectral_norm:.3g} > {above[0].bound:.3g}, "
                   f"the bound of Pascanu et al. 2013 for {above[0].activation}")
        else:
            why = "the gates or inputs amplify the state"
        auto = auto_init(cells_present)
        orthogonal = Remedy(auto.code.replace(REINITIALISES, "  # orthogonal hidden-to-hidden weights (Saxe et al. "
                                                            "2014); re-initialises: discards trained weights"),
                            auto.apply, "recurrent")
        remedy: Remedy | None = orthogonal
        fix = orthogonal.code
        cause = "recurrent"
    else:
        why = "each step contracts the state"
        remedy = None
        if gated:
            remedy = chrono(time.module, time.steps)
            fix = remedy.code
        else:
            fix = ("# replace the recurrence by nn.LSTM or nn.GRU (Hochreiter & Schmidhuber 1997): gated units "
                   "keep an error signal over long spans; or shorten the sequences")
        cause = "recurrent"
    message = (f"{time.verdict} over time in {time.module}: ||dL/dh_t|| x{time.total_growth:.3g} from t=T to t=1 "
               f"over T={time.steps} steps, ||dh_T/dh_0|| = {time.dhT_dh0:.3g}; {why}")
    score = max(_orders(time.total_growth), _orders(time.dhT_dh0))
    # Vanishing seen only in dh_T/dh_0 while the error signal holds (a loss at every step): training works,
    # long-range dependencies get no gradient. A warning, not an error.
    severity = "warning" if time.verdict == "vanishing" and verdict_of(time.total_growth) == "stable" else "error"
    if severity == "warning":
        message += " (the error signal itself holds: only long-range dependencies lose their gradient)"
    return [Finding(severity, time.module, message, fix, evidence, cause, score, remedy)]


def init_findings(init_checks: list[InitCheck], cells_present: bool, flow_stable: bool) -> list[Finding]:
    """Weights off their prescription by more than 2x: a warning, or only info when the measured flow is
    stable anyway (normalisation layers or residual connections compensate, as in GPT-2's 0.02 init)."""
    flagged = [c for c in init_checks if c.flagged]
    if not flagged:
        return []
    worst = max(flagged, key=lambda c: _orders(c.ratio))
    def label(c: InitCheck) -> str:
        return repr(c.layer if c.param == "weight" else f"{c.layer}.{c.param}")

    listed = ", ".join(f"{label(c)} ({c.ratio:.2g}x)" for c in flagged[:4]) + (" ..." if len(flagged) > 4 else "")
    message = (f"{len(flagged)} weight(s) off their prescribed std by more than 2x: {listed}; e.g. "
               f"{worst.layer + '.' + worst.param!r} std {worst.std:.3g}, {worst.scheme} for {worst.activation} "
               f"prescribes {worst.prescribed:.3g}")
    evidence = {"layers": [c.to_dict() for c in flagged]}
    severity = "warning"
    if flow_stable:
        severity = "info"
        message += "; the measured gradient flow is stable, so something compensates (normalisation, residuals)"
    return [Finding(severity, worst.layer, message, _init_fix(cells_present), evidence, "init_scale",
                    _orders(worst.ratio))]


def recurrent_bound_findings(bounds: list[RecurrentBound]) -> list[Finding]:
    findings = []
    for b in bounds:
        if not b.exceeds:
            continue
        message = (f"{b.layer}.{b.param}: spectral norm {b.spectral_norm:.3g} > 1/gamma = {b.bound:.3g} "
                   f"({b.activation}): the necessary condition for exploding gradients over time holds "
                   "(Pascanu et al. 2013)")
        # nn.RNN/RNNCell: auto_ keeps Xavier input weights; a hand-written cell: every weight orthogonal.
        fix = (f'gg.init.auto_(model.get_submodule("{b.layer}"))' if b.param.startswith("weight_hh")
               else f'gg.init.orthogonal_(model.get_submodule("{b.layer}"))') + REINITIALISES
        findings.append(Finding("warning", b.layer, message, fix, b.to_dict(), "recurrent",
                                _orders(b.spectral_norm / b.bound)))
    return findings


def _layer_list(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def activation_findings(stats: list[ActivationStats], init_flagged: bool, cells_present: bool) -> list[Finding]:
    """One finding for dead ReLU layers, one for saturated tanh/sigmoid layers, each naming the worst."""
    findings = []
    dead = sorted((s for s in stats if s.dead is not None and s.dead > DEAD_LIMIT), key=lambda s: -(s.dead or 0.0))
    if dead:
        fix = _init_fix(cells_present) if init_flagged else "gg.activations.replace_(model, nn.ReLU, nn.LeakyReLU)"
        message = (f"{len(dead)} ReLU layer(s) with more than {DEAD_LIMIT:.0%} of their units at 0 for the whole "
                   f"batch (dead, they pass no gradient): {_layer_list([s.name for s in dead])}; "
                   f"worst {dead[0].dead:.0%}")
        findings.append(Finding("warning", dead[0].name, message, fix,
                                {"layers": {s.name: s.dead for s in dead}}, "dead_units", dead[0].dead or 0.0))
    saturated = sorted((s for s in stats if s.saturated is not None and s.saturated > SATURATED_LIMIT),
                       key=lambda s: -(s.saturated or 0.0))
    if saturated:
        fix = _init_fix(cells_present) if init_flagged else lsuv().code
        message = (f"{len(saturated)} tanh/sigmoid layer(s) with more than {SATURATED_LIMIT:.0%} of their units "
                   f"saturated (derivative < 5% of its maximum): {_layer_list([s.name for s in saturated])}; "
                   f"worst {saturated[0].saturated:.0%}")
        findings.append(Finding("warning", saturated[0].name, message, fix,
                                {"layers": {s.name: s.saturated for s in saturated}}, "saturation",
                                saturated[0].saturated or 0.0))
    return findings


def learning_rate_findings(updates: list[UpdateSize] | None, flow_verdict: str) -> list[Finding]:
    """Updates above 1e-2 of the weights: a warning, above 1 an error — unless the gradients themselves
    explode, in which case the step size is a symptom: a warning that says to fix the flow first."""
    if not updates:
        return []
    worst = max(updates, key=lambda u: u.update_ratio)
    if worst.update_ratio <= UPDATE_WARNING:
        return []
    large = [u for u in updates if u.update_ratio > UPDATE_WARNING]
    message = (f"one optimizer step changes {worst.layer!r} by {worst.update_ratio:.3g}x its norm (lr {worst.lr:.3g}; "
               f"{len(large)} layer(s) above {UPDATE_WARNING:g}; about 1e-3 is healthy)")
    evidence = {"layers": [u.to_dict() for u in large]}
    score = _orders(worst.update_ratio / HEALTHY_UPDATE)
    if flow_verdict == "exploding":
        message += ": a symptom of the exploding gradient, measure again once the flow is fixed"
        return [Finding("warning", worst.layer, message, "# fix the exploding gradient first, then re-run the doctor",
                        evidence, "learning_rate", score)]
    severity = "error" if worst.update_ratio > UPDATE_ERROR else "warning"
    factor = HEALTHY_UPDATE / worst.update_ratio if math.isfinite(worst.update_ratio) else 1e-3
    fix = f'for group in optimizer.param_groups: group["lr"] *= {factor:.2g}'
    return [Finding(severity, worst.layer, message, fix, evidence, "learning_rate", score)]


# Beyond the square root of float32's largest value (3.4e38): the product of two such numbers overflows.
OVERFLOW_SCALE = 1e18


def nonfinite_findings(origin: NonfiniteOrigin | None, init_flagged: bool, cells_present: bool) -> list[Finding]:
    """Where NaN/Inf starts; an Inf from finite but enormous inputs is an overflow of a growing signal."""
    if origin is None:
        return []
    where = "output" if origin.phase == "forward" else "gradient"
    message = f"{origin.kind.upper()} first appears in the {where} of {origin.module!r} ({origin.phase} pass"
    message += f", made by {origin.op})" if origin.op else ")"
    largest = max((max(abs(s.min), abs(s.max)) for s in origin.inputs if s.min == s.min), default=0.0)
    if not origin.inputs_finite:
        message += "; its inputs were already non-finite (an operation outside any module or the data)"
    if origin.inputs_finite and largest > OVERFLOW_SCALE:
        message += (f": its inputs reach {largest:.3g}, the signal grows layer after layer until float overflows")
        chosen = auto_init(cells_present) if init_flagged else lsuv()
        remedy: Remedy | None = chosen
        message += f"; the cause: {CAUSES[chosen.cause]}"
        fix = chosen.code
    else:
        remedy = None
        fix = (f"# make {origin.module!r} finite: add an epsilon to divisors, clamp before log/sqrt/exp; "
               "meanwhile skip bad steps with gg.Guard(model, optimizer, on_nonfinite='skip')")
    return [Finding("error", origin.module, message, fix, origin.to_dict(), "nonfinite", math.inf, remedy)]


def jacobian_findings(jacobian: dict[str, Any]) -> list[Finding]:
    sigma = jacobian.get("input_output")
    blocks = {name: value for name, value in jacobian.get("blocks", {}).items() if value is not None}
    if sigma is None and not blocks:
        return []
    parts = [] if sigma is None else [f"largest singular value of the input-output Jacobian: {sigma:.3g}"]
    worst = max(blocks.items(), key=lambda kv: kv[1], default=None)
    if worst is not None:
        parts.append(f"largest block Jacobian: {worst[0]!r} ({worst[1]:.3g}), over {jacobian.get('blocks_covered')}")
    score = _orders(sigma if sigma is not None else worst[1])  # type: ignore[index]
    return [Finding("info", worst[0] if worst else None, "; ".join(parts), "# no change needed", dict(jacobian),
                    "jacobian", score)]


def build_findings(*, depth: DepthFlow, time: TimeFlow | None, init_checks: list[InitCheck],
                   bounds: list[RecurrentBound], activations: list[ActivationStats],
                   updates: list[UpdateSize] | None, origin: NonfiniteOrigin | None,
                   jacobian: dict[str, Any], model: nn.Module, cells_present: bool,
                   time_gated: bool = False, lone: OffScaleLayer | None = None) -> list[Finding]:
    """Every rule's findings, ranked (see :func:`rank`). ``time_gated``: the time flow's module is a GRU/LSTM;
    ``lone``: the one weight off its peers' scale, if any (``init_audit.off_scale_layer``)."""
    init_flagged = any(c.flagged for c in init_checks)
    findings: list[Finding] = nonfinite_findings(origin, init_flagged, cells_present)
    if origin is None:  # with NaN in the pass the flow numbers say nothing more
        findings += depth_findings(depth, init_checks, model, cells_present, lone)
        findings += time_findings(time, bounds, cells_present, time_gated)
    flow_stable = depth.verdict == "stable" and (time is None or time.verdict == "stable")
    findings += init_findings(init_checks, cells_present, flow_stable and origin is None)
    findings += recurrent_bound_findings(bounds)
    findings += activation_findings(activations, init_flagged, cells_present)
    flow_verdict = "exploding" if "exploding" in (depth.verdict, time.verdict if time else "") else "stable"
    findings += learning_rate_findings(updates, flow_verdict)
    findings += jacobian_findings(jacobian)
    return rank(findings)


def keep_trained(findings: list[Finding]) -> None:
    """For trained weights (a replayed step): no fix that re-initialises (``gg.init.auto_``, LSUV,
    orthogonal, chrono) is offered, since it would discard what the model learned. Such a finding keeps its
    layer and its measurements; its fix becomes the change that keeps the weights: a smaller learning rate
    for that layer, or its gradient capped. A fix that keeps the weights (rescaling one layer, the learning
    rate) stays as it is."""
    for finding in findings:
        if "re-initialis" not in finding.fix:
            continue
        where = repr(finding.layer) if finding.layer is not None else "the model"
        finding.fix = (f"# the weights are trained: keep them; lower the learning rate of {where} (its own "
                       "parameter group) or cap its gradient: gg.Guard(model, optimizer, clip=gg.clip.LayerNorm("
                       "max_norm=...))")
        finding.remedy = None
        finding.message += " (trained weights: not re-initialised)"

"""The doctor's report: a verdict, ranked findings and the measurements behind them.

``print(report)`` is a short diagnosis; ``report.to_dict()`` is for programs and is stable:

```
{
  "verdict": "nonfinite" | "exploding" | "vanishing" | "stable",
  "start_layer": str | None,
  "healthy": bool,                     # no finding of severity "error"
  "loss": float | None, "total_grad_norm": float | None,
  "findings": [{"severity", "layer", "message", "fix", "evidence", "cause", "score"}, ...],   # ranked
  "depth_flow": {"layers": [{"name", "error_signal", "weight_grad", "weight_norm", "grad_to_weight",
                             "gain", "recurrent"}, ...],          # forward order
                 "input_error_signal", "growth_per_layer", "total_growth", "counted_gains",
                 "verdict", "start_layer", "jump_gain"},
  "time_flow": None | {"module", "steps", "grad_norm_per_step" (t = 1..T), "dhT_dh0",
                       "growth_per_step", "total_growth", "verdict"},
  "activations": [{"name", "kind", "mean", "std", "saturated", "dead"}, ...],
  "init_audit": [{"layer", "param", "activation", "scheme", "std", "prescribed", "ratio", "flagged",
                  "xavier", "he"}, ...],
  "recurrent_bounds": [{"layer", "param", "activation", "spectral_norm", "bound", "exceeds"}, ...],
  "jacobian": {"input_output": float | None, "blocks": {name: float | None},
               "blocks_covered": str | None},      # which blocks, e.g. "the 4 repeated GPT2Block of 'transformer.h'"
  "learning_rate": None | [{"layer", "lr", "sgd_ratio", "update_ratio"}, ...],
  "nonfinite": None | {"module", "phase", "kind", "inputs", "inputs_finite", "grad_outputs", "op", "path"},
  "notes": [str, ...],                 # what could not be measured, and why
  "attention": None | {"modules": [{"module", "kind", "heads", "calls", "max_logit", "entropy",
                                    "min_entropy", "uniform_entropy"}, ...],
                       "log_z": None | {"mean", "min", "max", "classes"}, "notes"},
}
```

Every float is finite or ``None``: NaN and Inf are written as ``None`` so the dict survives strict JSON.

One verdict, one story: the headline gives the verdict, and when ``healthy`` (no error finding) disagrees
with it (a vanishing flow that is only a warning; a stable flow with an error elsewhere), it says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradguard.explain.activation_stats import ActivationStats
from gradguard.explain.attention import AttentionReport
from gradguard.explain.findings import Finding
from gradguard.explain.flow import DepthFlow
from gradguard.explain.init_audit import InitCheck, RecurrentBound
from gradguard.explain.learning_rate import UpdateSize
from gradguard.explain.nonfinite import NonfiniteOrigin
from gradguard.explain.time_flow import TimeFlow

__all__ = ["DoctorReport", "json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf floats replaced by None, tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


@dataclass
class DoctorReport:
    """What ``gg.doctor`` found. See the module docstring for ``to_dict()``'s layout.

    Attributes:
        verdict: ``"nonfinite"`` (NaN or Inf in the forward or backward pass), else ``"exploding"``,
            ``"vanishing"`` or ``"stable"`` (over depth and, if recurrent, time).
        start_layer: the layer where the explosion/vanishing starts, or None.
        findings: ranked :class:`Finding` s.
        depth: the gradient flow across depth.
        time: the gradient flow across time of the first recurrent module, or None.
        activations, init_checks, recurrent_bounds, updates, nonfinite: the measurements.
        jacobian: ``{"input_output": sigma_max or None, "blocks": {name: sigma_max}}``.
        loss, total_grad_norm: of the doctor's pass.
        notes: what could not be measured and why.
        attention: largest attention logit and entropy per attention module, log Z of the output.
    """

    verdict: str
    start_layer: str | None
    findings: list[Finding]
    depth: DepthFlow
    time: TimeFlow | None
    activations: list[ActivationStats]
    init_checks: list[InitCheck]
    recurrent_bounds: list[RecurrentBound]
    jacobian: dict[str, Any]
    updates: list[UpdateSize] | None
    nonfinite: NonfiniteOrigin | None
    loss: float | None
    total_grad_norm: float | None
    notes: list[str] = field(default_factory=list)
    attention: AttentionReport | None = None

    @property
    def time_flow(self) -> dict[str, Any] | None:
        """Recurrent models: ``{"grad_norm_per_step": [...], "dhT_dh0": float, ...}``; else None."""
        return json_safe(self.time.to_dict()) if self.time is not None else None

    @property
    def healthy(self) -> bool:
        """True when no finding has severity ``"error"`` (the CLI's exit code 0)."""
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable (NaN/Inf as None)."""
        return json_safe({
            "verdict": self.verdict,
            "start_layer": self.start_layer,
            "healthy": self.healthy,
            "loss": self.loss,
            "total_grad_norm": self.total_grad_norm,
            "findings": [f.to_dict() for f in self.findings],
            "depth_flow": {**asdict(self.depth), "layers": [asdict(layer) for layer in self.depth.layers]},
            "time_flow": self.time.to_dict() if self.time is not None else None,
            "activations": [a.to_dict() for a in self.activations],
            "init_audit": [c.to_dict() for c in self.init_checks],
            "recurrent_bounds": [b.to_dict() for b in self.recurrent_bounds],
            "jacobian": self.jacobian,
            "learning_rate": [u.to_dict() for u in self.updates] if self.updates is not None else None,
            "nonfinite": self.nonfinite.to_dict() if self.nonfinite is not None else None,
            "notes": list(self.notes),
            "attention": self.attention.to_dict() if self.attention is not None else None,
        })

    def headline(self) -> str:
        """``"gradguard doctor: VERDICT (starts at LAYER)"``, and why when ``healthy`` says otherwise."""
        head = f"gradguard doctor: {self.verdict.upper()}"
        if self.start_layer is not None:
            head += f" (starts at {self.start_layer})"
        errors = [f for f in self.findings if f.severity == "error"]
        if self.verdict != "stable" and not errors:
            flow = next((f for f in self.findings if f.severity == "warning" and "dhT_dh0" in f.evidence), None)
            why = ("only over long spans: the error signal itself holds, so training works, but long-range "
                   "dependencies get no gradient" if flow is not None else "no finding is an error")
            head += f"; healthy: {why} (warning below)"
        elif self.verdict == "stable" and errors:
            causes = ", ".join(sorted({f.cause for f in errors}))
            head += f" flow; not healthy: {len(errors)} error finding(s) ({causes})"
        return head

    def summary_lines(self) -> list[str]:
        """The head of the diagnosis: verdict, flow over depth and time, loss and norms."""
        lines = [self.headline()]
        d = self.depth
        if self.nonfinite is not None:
            lines.append("  flow: not measured, the pass holds NaN/Inf (see the first finding)")
        elif d.counted_gains:
            how = (f"x{_fmt(d.jump_gain)} of it in one jump at {d.start_layer}" if d.jump_gain is not None
                   else f"x{_fmt(d.growth_per_layer)} per layer over {_layers(d.counted_gains)}")
            lines.append(f"  depth: error signal x{_fmt(d.total_growth)} from the last layer to the first "
                         f"({how}): {d.verdict}")
        if self.time is not None and self.nonfinite is None:
            t = self.time
            lines.append(f"  time:  {t.module}, T={t.steps}: ||dL/dh_t|| x{_fmt(t.total_growth)} from t=T to t=1, "
                         f"||dh_T/dh_0|| = {_fmt(t.dhT_dh0)}: {t.verdict}")
        if self.attention is not None and self.attention.modules:
            top = max(self.attention.modules, key=lambda m: m.max_logit)
            lines.append(f"  attention: {len(self.attention.modules)} module(s), largest logit {_fmt(top.max_logit)} "
                         f"({top.module}), smallest head entropy {_fmt(min(m.min_entropy for m in self.attention.modules))} nats")
        if self.attention is not None and self.attention.log_z is not None:
            lines.append(f"  output: mean log Z {_fmt(self.attention.log_z.mean)}")
        sigma = self.jacobian.get("input_output")
        lines.append(f"  loss {_fmt(self.loss)}, gradient norm {_fmt(self.total_grad_norm)}"
                     + (f", input-output Jacobian sigma_max {_fmt(sigma)}" if sigma is not None else ""))
        return lines

    def __str__(self) -> str:
        lines = self.summary_lines()
        if not self.findings:
            lines.append("no findings: gradients flow at initialisation")
        else:
            counts = {s: sum(f.severity == s for f in self.findings) for s in ("error", "warning", "info")}
            lines.append("")
            lines.append(f"findings: {counts['error']} error(s), {counts['warning']} warning(s), "
                         f"{counts['info']} info")
            for i, f in enumerate(self.findings, 1):
                lines.append(f"{i:>2}. [{f.severity}] {f.message}")
                if f.evidence.get("flow_after_fix") == "stable":
                    lines.append(f"    fix (checked on a copy of the model: the flow is then stable): {f.fix}")
                elif not f.fix.startswith("# no change"):
                    lines.append(f"    fix: {f.fix}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML page (plots embedded as PNG data URIs); returns its path."""
        from gradguard.explain.html import render_html

        path = Path(path)
        path.write_text(render_html(self), encoding="utf-8")
        return path

"""Attention and output-logit statistics: the two instabilities of Wortsman et al. 2023.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities",
arXiv 2309.14322) reproduce in small transformers at high learning rates the two instabilities seen at
scale:

* **attention-logit growth**: the logits ``z_ij = q_i . k_j * scale`` grow with the query and key
  weights, the softmax becomes one-hot (the attention entropy collapses, Zhai et al. 2023) and the loss
  diverges; fixed by qk-layernorm (``gg.qk_norm``);
* **output-logit divergence**: the softmax normaliser ``log Z = logsumexp(logits)`` of the output drifts
  far from 0; fixed by the z-loss ``1e-4 * log^2 Z`` (``gg.regularize.z_loss``).

:class:`AttentionRecorder` measures, during any forward pass run inside it, for every attention module:
the largest attention logit over the positions the mask allows, and the mean entropy of each head's
attention distribution (nats, averaged over queries and batch). It sees attention where it is computed:

* ``F.scaled_dot_product_attention`` (hand-written attention, Hugging Face's "sdpa" implementation):
  the logits are recomputed from ``q`` and ``k`` with the call's scale, causal flag and mask;
* ``nn.MultiheadAttention`` (through ``F.multi_head_attention_forward``): ``q`` and ``k`` are recomputed
  from the call's input projection;
* a softmax over the last dimension of a 4-d tensor inside a module whose class name contains
  "Attention" or "Attn" (Hugging Face's "eager" implementation): its input is the masked logits.

The module an attention belongs to is the innermost module running when it is computed. Everything is
recorded as device tensors under ``torch.no_grad``; :meth:`AttentionRecorder.stats` reads them.
:func:`output_log_z` gives ``log Z`` of a model's output logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradguard.batch import Batch, LossFn, as_batch, forward_loss
from gradguard.explain.findings import Finding
from gradguard.regularize import z_loss

__all__ = ["AttentionRecorder", "AttentionReport", "AttentionStats", "LogZStats", "attention_report", "output_log_z"]

#: an additive mask entry below this excludes the position (exp(-1e4) is 0 in every float format)
MASKED = -1e4

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, Tensor.softmax}


@dataclass
class AttentionStats:
    """One attention module over the forward passes recorded.

    Attributes:
        module: the module's name in the model (``"(model)"`` for the root).
        kind: how it was seen: ``"sdpa"``, ``"multihead"`` or ``"softmax"``.
        heads: number of heads.
        calls: attention computations recorded.
        max_logit: the largest attention logit over the allowed positions.
        entropy: per head, the mean entropy of the attention distributions (nats).
        min_entropy: the smallest of ``entropy``.
        uniform_entropy: the same mean for uniform attention over the allowed keys (the largest possible;
            under a causal mask it is ``mean_i log(i + 1)``, not ``log T``).
    """

    module: str
    kind: str
    heads: int
    calls: int
    max_logit: float
    entropy: list[float]
    min_entropy: float
    uniform_entropy: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LogZStats:
    """``log Z = logsumexp(logits, -1)`` over the output positions: mean, smallest and largest."""

    mean: float
    min: float
    max: float
    classes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_logits(output: Any) -> Tensor | None:
    """The logits in a model's output: the tensor itself, ``output.logits`` (Hugging Face), or the first
    tensor of a tuple; None when there is no floating tensor with at least 2 classes on its last dimension."""
    candidate = getattr(output, "logits", output)
    if isinstance(candidate, (tuple, list)):
        candidate = next((x for x in candidate if isinstance(x, Tensor)), None)
    if isinstance(candidate, Tensor) and candidate.is_floating_point() and candidate.dim() >= 1 \
            and candidate.shape[-1] >= 2:
        return candidate
    return None


def log_z_tensor(logits: Tensor) -> Tensor:
    """``logsumexp(logits, -1)`` in float32, detached, one value per output position (flattened)."""
    return torch.logsumexp(logits.detach().float(), dim=-1).flatten()


def output_log_z(output: Any) -> LogZStats | None:
    """``log Z`` of a model's output logits (see :func:`output_logits`), read to the host; None without logits."""
    logits = output_logits(output)
    if logits is None:
        return None
    values = log_z_tensor(logits)
    mean, low, high = torch.stack([values.mean(), values.min(), values.max()]).tolist()
    return LogZStats(mean, low, high, logits.shape[-1])


class _Accumulator:
    """Device running values of one module: max logit, per-head entropy sums, rows, uniform-entropy sum."""

    def __init__(self, kind: str, heads: int, device: torch.device):
        self.kind = kind
        self.heads = heads
        self.calls = 0
        self.max_logit = torch.full((), -math.inf, device=device)
        self.entropy_sum = torch.zeros(heads, device=device)
        self.rows = torch.zeros(heads, device=device)
        self.uniform_sum = torch.zeros((), device=device)
        self.uniform_rows = torch.zeros((), device=device)


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _additive(mask: Tensor, masked_when_true: bool) -> Tensor:
    """A bool mask (``masked_when_true``: True = excluded, else True = allowed) or a float mask, as float32
    to add to the logits (-inf where excluded)."""
    if mask.dtype == torch.bool:
        excluded = mask if masked_when_true else ~mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill(excluded, -math.inf)
    return mask.float()


class AttentionRecorder(TorchFunctionMode):
    """Context manager recording the attention statistics of the forward passes run inside it.

    Args:
        model: the model; its modules are hooked to know which one is running (hooks removed on exit).

    Example::

        with torch.no_grad(), AttentionRecorder(model) as recorder:
            model(inputs)
        for stats in recorder.stats():
            print(stats.module, stats.max_logit, stats.min_entropy)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.notes: list[str] = []
        self._names = {id(module): name for name, module in model.named_modules()}
        self._stack: list[nn.Module] = []
        self._handles: list[Any] = []
        self._records: dict[str, _Accumulator] = {}

    def __enter__(self) -> AttentionRecorder:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._push))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        super().__exit__(*exc)

    def _push(self, module: nn.Module, args: tuple) -> None:
        self._stack.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _current(self) -> tuple[str, nn.Module | None]:
        module = self._stack[-1] if self._stack else None
        name = self._names.get(id(module), "") if module is not None else ""
        return name or "(model)", module

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        try:
            if func is F.scaled_dot_product_attention:
                self._sdpa(_bind(_SDPA_ARGS, args, kwargs))
            elif func is F.multi_head_attention_forward:
                self._multihead(_bind(_MHA_ARGS, args, kwargs))
            elif func in _SOFTMAX_FUNCTIONS:
                self._softmax(args, kwargs)
        except Exception as error:  # a measurement must never break the user's forward pass
            note = f"attention in {self._current()[0]} not measured: {type(error).__name__}: {error}"
            if note not in self.notes:
                self.notes.append(note)
        return result

    # -- the three ways attention is computed ---------------------------------------------------------

    def _sdpa(self, call: dict[str, Any]) -> None:
        q, k = call["query"].detach().float(), call["key"].detach().float()
        if call.get("enable_gqa") and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = call.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        logits = q @ k.transpose(-2, -1) * scale
        additive = torch.zeros((), device=logits.device)
        if call.get("is_causal"):
            length, source = logits.shape[-2], logits.shape[-1]
            causal = torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
            additive = additive + _additive(causal, masked_when_true=False)
        if call.get("attn_mask") is not None:
            additive = additive + _additive(call["attn_mask"].detach(), masked_when_true=False)
        self._record("sdpa", logits, additive)

    def _multihead(self, call: dict[str, Any]) -> None:
        if call.get("bias_k") is not None or call.get("add_zero_attn") or call.get("static_k") is not None:
            raise ValueError("bias_k, add_zero_attn or static_k is not supported")
        query, key = call["query"].detach(), call["key"].detach()
        if query.dim() == 2:  # unbatched (L, E)
            query, key = query.unsqueeze(1), key.unsqueeze(1)
        heads, embed = int(call["num_heads"]), query.shape[-1]
        head_dim = embed // heads
        bias = call.get("in_proj_bias")
        b_q, b_k = (bias.chunk(3)[:2]) if bias is not None else (None, None)
        if call.get("use_separate_proj_weight"):
            w_q, w_k = call["q_proj_weight"], call["k_proj_weight"]
        else:
            w_q, w_k = call["in_proj_weight"].chunk(3)[:2]
        length, batch, source = query.shape[0], query.shape[1], key.shape[0]

        def split(x: Tensor, weight: Tensor, b: Tensor | None, n: int) -> Tensor:  # (n, N, E) -> (N, H, n, d)
            return F.linear(x.float(), weight.detach().float(), None if b is None else b.detach().float()) \
                .view(n, batch, heads, head_dim).permute(1, 2, 0, 3)

        logits = split(query, w_q, b_q, length) @ split(key, w_k, b_k, source).transpose(-2, -1)
        logits = logits / math.sqrt(head_dim)
        additive = torch.zeros((), device=logits.device)
        if call.get("attn_mask") is not None:
            mask = _additive(call["attn_mask"].detach(), masked_when_true=True)
            additive = additive + (mask.view(batch, heads, length, source) if mask.dim() == 3 else mask)
        if call.get("key_padding_mask") is not None:
            padding = _additive(call["key_padding_mask"].detach(), masked_when_true=True)
            additive = additive + padding.view(batch, 1, 1, source)
        self._record("multihead", logits, additive)

    def _softmax(self, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(x, Tensor) or x.dim() != 4 or dim not in (-1, 3):
            return
        _, module = self._current()
        label = type(module).__name__.lower() if module is not None else ""
        if "attention" not in label and "attn" not in label:
            return
        logits = x.detach().float()
        additive = torch.zeros((), device=logits.device).expand_as(logits).masked_fill(logits < MASKED, -math.inf)
        self._record("softmax", logits, additive)

    # -- statistics -------------------------------------------------------------------------------------

    def _record(self, kind: str, logits: Tensor, additive: Tensor) -> None:
        """Fold one attention computation (logits ``(..., heads, L, S)`` or ``(L, S)``) into its module's record."""
        with torch.no_grad():
            if logits.dim() < 3:
                logits = logits.unsqueeze(0)
            additive = additive.expand_as(logits)
            allowed = additive > MASKED
            heads = logits.shape[-3]
            masked_logits = torch.where(allowed, logits + additive, -math.inf)
            max_logit = torch.where(allowed, logits, -math.inf).amax()
            probs = torch.softmax(masked_logits, dim=-1)
            plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), 0.0)
            entropy = -plogp.sum(-1)  # (..., heads, L)
            rows = allowed.any(-1)  # a query with no allowed key has no distribution
            per_head = entropy.where(rows, 0.0).movedim(-2, -1).reshape(-1, heads)
            counts = rows.movedim(-2, -1).reshape(-1, heads).float()
            uniform = allowed.sum(-1).clamp_min(1).float().log().where(rows, 0.0)
            name, _ = self._current()
            key = name
            record = self._records.get(key)
            if record is not None and record.heads != heads:
                key = f"{name} ({heads} heads)"
                record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Accumulator(kind, heads, logits.device)
            record.calls += 1
            record.max_logit = torch.maximum(record.max_logit, max_logit)
            record.entropy_sum += per_head.sum(0)
            record.rows += counts.sum(0)
            record.uniform_sum += uniform.sum()
            record.uniform_rows += rows.sum()

    def device_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per module: ``(max_logit, min_entropy)`` as 0-d device tensors, without a host read."""
        out = {}
        for name, record in self._records.items():
            entropy = record.entropy_sum / record.rows.clamp_min(1)
            out[name] = (record.max_logit, entropy.min())
        return out

    def stats(self) -> list[AttentionStats]:
        """The recorded statistics, one per attention module in the order first seen (reads the host)."""
        result = []
        for name, record in self._records.items():
            entropy = (record.entropy_sum / record.rows.clamp_min(1)).tolist()
            uniform = float(record.uniform_sum / record.uniform_rows.clamp_min(1))
            result.append(AttentionStats(name, record.kind, record.heads, record.calls, float(record.max_logit),
                                         entropy, min(entropy), uniform))
        return result


# -- the doctor's findings ----------------------------------------------------------------------------------

#: the largest attention logit above which attention can be one-hot: exp(50) = 5e21 to one key against any key
#: 50 below it. At init (std 0.02 weights) the logits are near 0; a healthy trained model stays in the tens.
LOGIT_WARNING = 50.0
#: beyond this, bfloat16 resolves attention logits only in steps of 8 (and Wortsman et al. 2023 see
#: divergence with logits of 1e3-1e4): an error.
LOGIT_ERROR = 1e3
#: |mean log Z| above this: the output logits have drifted far from normalised. Uniform logits over V classes
#: give log Z = log V (at most 12 for a 160k vocabulary) and the z-loss pulls log Z to 0; a language model
#: trained at a sane learning rate stays near log V (the lab: about 5 for 96 characters), one at a diverging
#: learning rate passes 30 within tens of steps. An overfit classifier also gets there, slowly (a digits MLP
#: at training loss 1e-5: 25).
LOG_Z_WARNING = 30.0
#: steps each fix is tried for on a copy of the model and optimizer, on the doctor's batch
CHECK_STEPS = 20


@dataclass
class AttentionReport:
    """The doctor's attention and output-logit measurements, the findings and what the checks found."""

    modules: list[AttentionStats]
    log_z: LogZStats | None
    findings: list[Finding]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"modules": [m.to_dict() for m in self.modules],
                "log_z": self.log_z.to_dict() if self.log_z is not None else None, "notes": list(self.notes)}


def attention_findings(modules: list[AttentionStats], log_z: LogZStats | None) -> list[Finding]:
    """Attention-logit growth (the module with the largest logit) and output-logit divergence."""
    findings = []
    grown = [m for m in modules if math.isfinite(m.max_logit) and m.max_logit > LOGIT_WARNING]
    if grown:
        worst = max(grown, key=lambda m: m.max_logit)
        head = min(range(worst.heads), key=lambda h: worst.entropy[h])
        message = (f"attention-logit growth: the largest attention logit of {worst.module!r} is {worst.max_logit:.3g} "
                   f"(> {LOGIT_WARNING:g}: attention can be one-hot); its head {head} has a mean entropy of "
                   f"{worst.entropy[head]:.3g} nats, uniform attention would have {worst.uniform_entropy:.3g}"
                   + (f"; {len(grown)} attention module(s) above {LOGIT_WARNING:g}" if len(grown) > 1 else "")
                   + " (Wortsman et al. 2023: it comes with a too-high learning rate, qk-layernorm prevents it)")
        fix = ("# train with qk-layernorm: gg.qk_norm.QKLayerNorm(head_dim) applied to q and k before the "
               "attention (see gg.qk_norm), or lower the learning rate")
        evidence = {"modules": {m.module: {"max_logit": m.max_logit, "min_entropy": m.min_entropy,
                                           "uniform_entropy": m.uniform_entropy} for m in grown}}
        severity = "error" if worst.max_logit > LOGIT_ERROR else "warning"
        findings.append(Finding(severity, worst.module, message, fix, evidence, "attention_logits",
                                math.log10(worst.max_logit / LOGIT_WARNING)))
    if log_z is not None and math.isfinite(log_z.mean) and abs(log_z.mean) > LOG_Z_WARNING:
        message = (f"output logits far from normalised: log Z of the output softmax is {log_z.mean:.3g} on average "
                   f"(from {log_z.min:.3g} to {log_z.max:.3g}; log of the {log_z.classes} classes: "
                   f"{math.log(log_z.classes):.3g}); cross-entropy leaves it free to drift, and Wortsman et al. "
                   "2023 see this drift come before output-logit divergence at high learning rates (the z-loss "
                   "1e-4 log^2 Z keeps log Z near 0)")
        fix = "# in the training loop: loss = loss + gg.regularize.z_loss(logits)  (1e-4 * log^2 Z, Chowdhery et al. 2022)"
        findings.append(Finding("warning", None, message, fix, log_z.to_dict(), "output_logits",
                                math.log10(abs(log_z.mean) / LOG_Z_WARNING)))
    return findings


def _measure(model: nn.Module, batch: Batch) -> tuple[list[AttentionStats], LogZStats | None, list[str]]:
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        output = model(**batch.inputs) if batch.keyword else model(batch.inputs)
    return recorder.stats(), output_log_z(output), recorder.notes


def _trained_copy(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, loss_fn: LossFn | None,
                  lr_factor: float, z_coef: float) -> tuple[float, float | None]:
    """A deep copy of the model and its optimizer trained :data:`CHECK_STEPS` steps on ``batch`` (learning
    rates times ``lr_factor``, the z-loss added when ``z_coef``): its largest attention logit and mean log Z."""
    trial, trial_optimizer = copy.deepcopy((model, optimizer))
    for group in trial_optimizer.param_groups:
        group["lr"] = group["lr"] * lr_factor
    for _ in range(CHECK_STEPS):
        output, loss = forward_loss(trial, batch, loss_fn)
        logits = output_logits(output)
        if z_coef and logits is not None:
            loss = loss + z_loss(logits, z_coef)
        trial_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trial_optimizer.step()
    modules, log_z, _ = _measure(trial, batch)
    return max((m.max_logit for m in modules), default=math.nan), log_z.mean if log_z is not None else None


def _check_fixes(findings: list[Finding], model: nn.Module, batch: Batch, loss_fn: LossFn | None,
                 optimizer: torch.optim.Optimizer,
                 before_logit: float, before_log_z: float | None) -> None:
    """Train copies :data:`CHECK_STEPS` steps as they are, at a tenth of the learning rate, and with the
    z-loss; say in each finding what its fix changed on the copies."""
    logit_now, log_z_now = _trained_copy(model, optimizer, batch, loss_fn, 1.0, 0.0)
    for finding in findings:
        if finding.cause == "attention_logits":
            logit_low, _ = _trained_copy(model, optimizer, batch, loss_fn, 0.1, 0.0)
            finding.evidence["check"] = {"steps": CHECK_STEPS, "before": before_logit, "same_lr": logit_now,
                                         "lr_x0.1": logit_low}
            finding.message += (f". Checked on a copy, {CHECK_STEPS} steps on this batch: the largest logit goes from "
                                f"{before_logit:.3g} to {logit_now:.3g} at the current learning rate, to "
                                f"{logit_low:.3g} at a tenth of it")
            if logit_low < logit_now and logit_now > before_logit:
                finding.fix = 'for group in optimizer.param_groups: group["lr"] *= 0.1  # or qk-layernorm (gg.qk_norm)'
        elif finding.cause == "output_logits" and before_log_z is not None and log_z_now is not None:
            _, log_z_fixed = _trained_copy(model, optimizer, batch, loss_fn, 1.0, 1e-4)
            finding.evidence["check"] = {"steps": CHECK_STEPS, "before": before_log_z, "without": log_z_now,
                                         "with_z_loss": log_z_fixed}
            finding.message += (f". Checked on a copy, {CHECK_STEPS} steps on this batch: mean log Z goes from "
                                f"{before_log_z:.3g} to {log_z_now:.3g} without the z-loss, to "
                                f"{log_z_fixed:.3g} with it")


def attention_report(model: nn.Module, batch: Any, loss_fn: LossFn | None,
                     optimizer: torch.optim.Optimizer | None = None, check_fixes: bool = True) -> AttentionReport:
    """Measure attention and output logits on ``batch`` (one forward pass without gradients), find
    attention-logit growth and output-logit divergence, and, with an optimizer and ``check_fixes``, try
    the fixes on copies of the model and optimizer for :data:`CHECK_STEPS` steps. ``batch`` and ``loss_fn``
    follow ``gradguard.batch``: ``(inputs, targets)`` with ``loss_fn(output, targets)``, or a dict of keyword
    inputs whose output carries ``output.loss``."""
    split = as_batch(batch, "attention_report")
    modules, log_z, notes = _measure(model, split)
    findings = attention_findings(modules, log_z)
    if findings and check_fixes:
        if optimizer is None:
            notes.append("attention fixes not checked: no optimizer given to the doctor")
        else:
            try:
                before = max((m.max_logit for m in modules), default=math.nan)
                _check_fixes(findings, model, split, loss_fn, optimizer, before, log_z.mean if log_z else None)
            except Exception as error:  # a model or optimizer that cannot be deep-copied, a custom step
                notes.append(f"attention fixes not checked: {type(error).__name__}: {str(error)[:160]}")
    return AttentionReport(modules, log_z, findings, notes)

"""Init audit: each weight's std against the scheme its activation calls for, and recurrent spectral norms.

* Linear/Conv weights (followed by an activation module gradguard does not know: shown against Xavier,
  scheme ``"unknown"``, never flagged), and the input-to-hidden weights of recurrent modules: the measured std against
  ``gradguard.init.prescribed_std`` — He et al. 2015 (``gain / sqrt(fan_in)``) when a rectifier follows
  the layer in the forward order, Xavier, Glorot & Bengio 2010 (``sqrt(2 / (fan_in + fan_out))``),
  otherwise. Flagged when off by more than 2x either way: a 2x error in std is a 4x error in variance per
  layer, which compounds with depth.
* Hidden-to-hidden weights: std against an orthogonal matrix's ``1/sqrt(hidden)`` (Saxe et al. 2014), and
  the spectral norm against the bound of Pascanu et al. 2013: with ``|phi'| <= gamma``, the gradient
  through time can explode only if ``sigma_max(W_hh) > 1/gamma`` (``gamma = 1`` for tanh, ``1/4`` for
  sigmoid). Above the bound explosion is possible, not certain; below it it cannot happen. Checked for
  ``nn.RNN`` (tanh or relu, gamma = 1) and hand-written cells (the square ``hidden x hidden`` weights,
  gamma of the last activation module the cell runs, 1 when it runs none). Gated units (GRU, LSTM) get
  the std check only: their gates change the bound.
* Transformers are initialised another way: every weight ``N(0, 0.02)`` whatever its shape (GPT-2,
  Radford et al. 2019; BERT, Devlin et al. 2019; Hugging Face's ``config.initializer_range``), residual
  projections scaled down by ``1/sqrt(N)`` for ``N = 2 x blocks`` residual layers (GPT-2, section 2.3),
  normalisation layers keeping the signal in scale. In a model with such normalisation layers (or a
  Hugging Face config with ``initializer_range``), a weight that fails its He/Xavier check but sits within
  2x of that range, ``[initializer_range / sqrt(N), initializer_range]``, is checked as ``"fixed"``: on
  scale, not flagged.
* A Linear whose weight *is* an embedding's (a language model's tied output layer, ``lm_head``) is the
  embedding, not a layer with its own init: it is not audited (see :func:`tied_weights`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.activations import activation_kind, derivative_bound
from gradguard.init import RECURRENT_MODULES, WEIGHT_LAYERS, prescribed_std, recurrent_weight_blocks
from gradguard.trace import RecurrentCell

__all__ = ["INIT_TOLERANCE", "FixedStd", "InitCheck", "OffScaleLayer", "RecurrentBound", "audit_init",
           "audit_recurrent", "fixed_std_convention", "off_scale_layer", "tied_weights"]

INIT_TOLERANCE = 2.0
# An orthogonal W_hh sits exactly on the bound; float error must not flag it.
BOUND_RTOL = 1e-3


@dataclass
class InitCheck:
    """One weight's std against its prescription.

    Attributes:
        layer: module name; param: parameter name in it.
        activation: what follows the layer (``"relu"``, ``"tanh"``, ``"linear"``, ...).
        scheme: ``"he"``, ``"xavier"``, ``"orthogonal"``, ``"fixed"`` (the transformer convention, see the
            module docstring) or ``"unknown"``.
        std: measured std; prescribed: the scheme's std; ratio: ``std / prescribed``.
        flagged: ratio beyond ``INIT_TOLERANCE`` either way.
        xavier, he: the std each scheme would give this weight, for reference (He with ReLU's gain).
    """

    layer: str
    param: str
    activation: str
    scheme: str
    std: float
    prescribed: float
    ratio: float
    flagged: bool
    xavier: float
    he: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecurrentBound:
    """A hidden-to-hidden weight against Pascanu et al. 2013's bound ``sigma_max(W_hh) <= 1/gamma``."""

    layer: str
    param: str
    activation: str
    spectral_norm: float
    bound: float
    exceeds: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FixedStd:
    """The transformer convention of a model: ``N(0, std)`` weights, residual projections down to ``lowest``."""

    std: float
    lowest: float
    source: str  # where the std comes from, for the report


def fixed_std_convention(model: nn.Module, blocks: int) -> FixedStd | None:
    """The convention of a model with normalisation layers (module docstring), or None for other models.

    ``std`` is the Hugging Face config's ``initializer_range`` when there is one, else GPT-2's 0.02;
    ``blocks`` is the number of repeated blocks (2 residual layers each).
    """
    config_range = getattr(getattr(model, "config", None), "initializer_range", None)
    normalised = any("LayerNorm" in type(m).__name__ or "RMSNorm" in type(m).__name__ for m in model.modules())
    if isinstance(config_range, float) and config_range > 0:
        std, source = config_range, f"config.initializer_range = {config_range:g}"
    elif normalised:
        std, source = 0.02, "N(0, 0.02), the GPT-2/BERT convention of a normalised model"
    else:
        return None
    return FixedStd(std, std / math.sqrt(2 * max(blocks, 1)), source)


def tied_weights(order: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """``{layer: embedding}`` for each Linear/Conv whose weight is an ``nn.Embedding``'s weight (tied)."""
    embeddings = {id(m.weight): name for name, m in order if isinstance(m, nn.Embedding)}
    return {name: embeddings[id(m.weight)] for name, m in order
            if isinstance(m, WEIGHT_LAYERS) and id(m.weight) in embeddings}


def _check(layer: str, param: str, weight: Tensor, activation: nn.Module | None, gates: int = 1,
           orthogonal: bool = False, label: str | None = None, fixed: FixedStd | None = None) -> InitCheck:
    std = float(weight.detach().float().std())
    if orthogonal:
        scheme, prescribed = "orthogonal", 1.0 / math.sqrt(weight.shape[1])
    else:
        scheme, prescribed = prescribed_std(weight, activation, gates)
    ratio = std / prescribed
    if label is None:
        label = (activation_kind(activation) or type(activation).__name__) if activation is not None else "linear"
    flagged = not (1.0 / INIT_TOLERANCE <= ratio <= INIT_TOLERANCE)
    if activation is not None and activation_kind(activation) is None:
        # An activation no prescription knows (a custom module): shown against Xavier, never flagged.
        scheme, flagged = "unknown", False
    # For reference, both classic prescriptions for this shape (ReLU's gain for He, gain 1 for Xavier).
    _, xavier = prescribed_std(weight, None, gates)
    _, he = prescribed_std(weight, nn.ReLU(), gates)
    if flagged and fixed is not None and fixed.lowest / INIT_TOLERANCE <= std <= fixed.std * INIT_TOLERANCE:
        scheme, prescribed, ratio, flagged = "fixed", fixed.std, std / fixed.std, False
    return InitCheck(layer, param, label, scheme, std, prescribed, ratio, flagged, xavier, he)


def audit_init(order: list[tuple[str, nn.Module]], following: dict[str, nn.Module | None],
               cell_square_weights: set[int], fixed: FixedStd | None = None) -> list[InitCheck]:
    """Check every Linear/Conv and recurrent weight of the modules in ``order`` (forward order), each weight
    once, tied output layers left out; ``fixed``: the model's transformer convention, if any."""
    checks: list[InitCheck] = []
    tied = tied_weights(order)
    seen: set[int] = set()
    for name, module in order:
        if name in tied or any(id(p) in seen for p in module.parameters(recurse=False)):
            continue
        seen.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, RECURRENT_MODULES):
            # The nonlinearity inside: tanh/relu for nn.RNN, the gates' sigmoid/tanh for GRU/LSTM.
            inside = getattr(module, "nonlinearity", "gates")
            for param_name, weight, gates in recurrent_weight_blocks(module):
                hidden = param_name.startswith("weight_hh")
                if hidden and gates == 1:
                    checks.append(_check(name, param_name, weight, None, orthogonal=True, label=inside))
                else:  # Xavier per gate block: fan_out is one block's rows
                    checks.append(_check(name, param_name, weight, None, gates, label=inside))
        elif isinstance(module, WEIGHT_LAYERS):
            square = id(module.weight) in cell_square_weights
            checks.append(_check(name, "weight", module.weight, following.get(name), orthogonal=square, fixed=fixed))
    return checks


@dataclass
class OffScaleLayer:
    """One weight off the scale of its peers (:func:`off_scale_layer`).

    Attributes:
        check: its init check.
        peers: the median ``std / prescribed`` of the other weights (1 for a model exactly at its scheme).
        factor: ``peers / check.ratio``: what its weights are multiplied by to join the peers' scale.
    """

    check: InitCheck
    peers: float

    @property
    def factor(self) -> float:
        return self.peers / self.check.ratio


#: Fewest He/Xavier-checked weights for a median to outvote one off-scale weight.
MIN_WEIGHTS = 3


def _median(values: list[float]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def off_scale_layer(checks: list[InitCheck]) -> OffScaleLayer | None:
    """The one weight whose ``std / prescribed`` is more than ``INIT_TOLERANCE`` away from the median over
    all weights (in log), when exactly one is; None otherwise (fewer than ``MIN_WEIGHTS`` weights, none, or
    several: a scale error spread over the model is the init's, not one layer's).

    Against the peers rather than against the formula: a model initialised with another gain (Xavier with
    tanh's 5/3) or trained away from its init has every weight off its formula by about the same factor,
    and the one layer 20x off stands out from them by 20x whatever that factor is. Its fix rescales that
    layer alone to the median of the others, which keeps every other (possibly trained) weight."""
    prescribed = [c for c in checks if c.param == "weight" and c.scheme in ("he", "xavier") and c.ratio > 0
                  and math.isfinite(c.ratio)]
    if len(prescribed) < MIN_WEIGHTS:
        return None
    middle = _median([math.log(c.ratio) for c in prescribed])
    off = [c for c in prescribed if abs(math.log(c.ratio) - middle) > math.log(INIT_TOLERANCE)]
    if len(off) != 1:
        return None
    peers = math.exp(_median([math.log(c.ratio) for c in prescribed if c is not off[0]]))
    return OffScaleLayer(off[0], peers)


def _cell_gamma(cell: RecurrentCell, leaf_modules: list[nn.Module]) -> tuple[str, float]:
    kinds = [k for m in leaf_modules if (k := activation_kind(m)) is not None]
    kind = kinds[-1] if kinds else "linear"
    return kind, derivative_bound(kind)


def audit_recurrent(modules: list[tuple[str, nn.Module]], cells: list[RecurrentCell],
                    cell_leaves: dict[str, list[nn.Module]]) -> list[RecurrentBound]:
    """Spectral norm of each ``nn.RNN`` hidden weight and each hand-written cell's square weights."""
    bounds: list[RecurrentBound] = []
    for name, module in modules:
        if isinstance(module, (nn.RNN, nn.RNNCell)):
            kind = "tanh" if module.nonlinearity == "tanh" else "relu"
            for param_name, weight, _ in recurrent_weight_blocks(module):
                if param_name.startswith("weight_hh"):
                    sigma = float(torch.linalg.matrix_norm(weight.detach().float(), 2))
                    bound = 1.0 / derivative_bound(kind)
                    bounds.append(RecurrentBound(name, param_name, kind, sigma, bound, sigma > bound * (1 + BOUND_RTOL)))
    for cell in cells:
        if isinstance(cell.calls[0].module, RECURRENT_MODULES):
            continue
        kind, gamma = _cell_gamma(cell, cell_leaves.get(cell.name, []))
        sizes = {cell.calls[0].inputs[i].shape[-1] for i in cell.state_inputs}
        for param_name, param in cell.calls[0].module.named_parameters():
            if param.dim() == 2 and param.shape[0] == param.shape[1] and param.shape[0] in sizes:
                sigma = float(torch.linalg.matrix_norm(param.detach().float(), 2))
                bound = 1.0 / gamma
                bounds.append(RecurrentBound(cell.name, param_name, kind, sigma, bound,
                                             sigma > bound * (1 + BOUND_RTOL)))
    return bounds

"""Weight initialisation chosen for the activation that follows each layer: the fix at the source.

A layer ``y = W x`` followed by ``x' = phi(y)`` passes the error signal back as ``dL/dx = W^T (phi'(y) *
dL/dx')``. With ``fan_in`` inputs, ``fan_out`` outputs and i.i.d. zero-mean weights of variance ``Var(W)``,
one layer scales the second moment of the forward signal by ``fan_in Var(W) E[phi(y)^2] / Var(y)`` and of
the backward signal by ``fan_out Var(W) E[phi'(y)^2]``. Over ``L`` layers these factors compound to the
``L``-th power, which is the exploding or vanishing gradient at initialisation; the classic schemes choose
``Var(W)`` so that they are 1:

* Xavier, Glorot & Bengio 2010 (eq. 16, normal form): ``Var(W) = gain^2 * 2 / (fan_in + fan_out)``, for
  tanh, sigmoid and linear layers (gain 1, the paper's choice).
* He, He et al. 2015 (eq. 10): ``Var(W) = gain^2 / fan_in`` with ``gain^2 = 2 / (1 + a^2)`` for
  rectifiers of negative slope ``a``, because a ReLU zeroes half its inputs.
* Orthogonal, Saxe et al. 2014: ``W = gain * Q`` with ``Q`` orthogonal; all singular values equal
  ``gain``, so ``||W^T v|| = gain ||v||`` for every ``v`` — the right choice for recurrent weights, which
  multiply the error signal once per time step.
* LSUV, Mishkin & Matas 2016: orthogonal, then each layer rescaled in forward order until its output
  variance on a real batch is 1.
* Chrono, Tallec & Ollivier 2018: LSTM forget / GRU update gate biases ``log(U(1, T - 1))``, so that gated
  units keep their state (and the gradient) over spans up to ``T`` steps.

:func:`auto_` picks per layer: He for the rectifier family, Xavier for tanh/sigmoid/no activation, and for
recurrent modules Xavier input weights with orthogonal hidden-to-hidden weights. Biases are set to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from gradguard.activations import RECTIFIERS, activation_kind, negative_slope
from gradguard.trace import ForwardTrace, find_recurrent_cells, leaf_calls

__all__ = [
    "InitChoice",
    "auto_",
    "chrono_",
    "following_activations",
    "following_in_order",
    "he_",
    "lsuv_",
    "orthogonal_",
    "prescribed_init",
    "prescribed_std",
    "recurrent_weight_blocks",
    "xavier_",
]

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
RECURRENT_MODULES = (nn.RNNBase, nn.RNNCellBase)

# Modules that sit between a layer and its activation without changing which init the layer needs.
TRANSPARENT = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.RMSNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)

# Gate blocks stacked in a recurrent weight, in torch's order: RNN h; GRU r|z|n; LSTM i|f|g|o.
_GATES = {"RNN": 1, "RNNCell": 1, "GRU": 3, "GRUCell": 3, "LSTM": 4, "LSTMCell": 4}

InitChoice = str  # "he", "xavier", "orthogonal", "recurrent" (Xavier input, orthogonal hidden weights)


def fans(weight: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` as torch.nn.init computes them (dim 1 and dim 0 times the kernel size)."""
    if weight.dim() < 2:
        raise ValueError(f"fans: a weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def prescribed_init(activation: nn.Module | None) -> tuple[InitChoice, float]:
    """``("he", gain)`` for the rectifier family, ``("xavier", 1.0)`` for anything else (unknown too).

    He et al. 2015: ``gain = sqrt(2 / (1 + a^2))`` (``a`` the negative slope); SELU keeps gain 1 (LeCun
    normal, Klambauer et al. 2017).
    """
    kind = activation_kind(activation) if activation is not None else None
    if activation is not None and type(activation) in RECTIFIERS:
        if kind == "selu":
            return "he", 1.0
        return "he", math.sqrt(2.0 / (1.0 + negative_slope(activation) ** 2))
    return "xavier", 1.0


def prescribed_std(weight: Tensor, activation: nn.Module | None, gates: int = 1) -> tuple[InitChoice, float]:
    """The standard deviation the prescribed scheme gives ``weight`` (see :func:`prescribed_init`).

    ``gates``: number of gate blocks stacked along dim 0 (recurrent weights); each block is one layer.
    """
    choice, gain = prescribed_init(activation)
    fan_in, fan_out = fans(weight)
    fan_out //= gates
    if choice == "he":
        return choice, gain / math.sqrt(fan_in)
    return choice, gain * math.sqrt(2.0 / (fan_in + fan_out))


def recurrent_weight_blocks(module: nn.Module) -> Iterator[tuple[str, Tensor, int]]:
    """``(name, weight, gates)`` for each weight of an ``nn.RNN/GRU/LSTM`` or ``nn.*Cell`` (biases left out)."""
    gates = _GATES.get(type(module).__name__, 1)
    for name, param in module.named_parameters(recurse=False):
        if name.startswith(("weight_ih", "weight_hh")):
            yield name, param, gates


def _zero_biases(module: nn.Module) -> None:
    for name, param in module.named_parameters(recurse=False):
        if name.startswith("bias"):
            nn.init.zeros_(param)


def _per_gate(weight: Tensor, gates: int) -> list[Tensor]:
    # chunk() returns views, so initialising each block writes into the weight.
    return list(weight.data.chunk(gates, dim=0))


def _weight_layers(module: nn.Module) -> Iterator[nn.Module]:
    for m in module.modules():
        if isinstance(m, WEIGHT_LAYERS + RECURRENT_MODULES):
            yield m


@torch.no_grad()
def _init_layer(layer: nn.Module, scheme: str, gain: float, slope: float = 0.0) -> None:
    if isinstance(layer, RECURRENT_MODULES):
        blocks = [(n, w, g) for n, w, g in recurrent_weight_blocks(layer)]
    else:
        weight = layer.weight
        assert isinstance(weight, Tensor)
        blocks = [("weight", weight, 1)]
    for name, weight, gates in blocks:
        for block in _per_gate(weight, gates):
            if scheme == "xavier":
                nn.init.xavier_normal_(block, gain=gain)
            elif scheme == "he":
                # torch's kaiming_normal_ computes gain from (nonlinearity, a); pass the gain directly.
                block.normal_(0.0, gain / math.sqrt(fans(block)[0]))
            elif scheme == "orthogonal":
                nn.init.orthogonal_(block, gain=gain)
            elif scheme == "recurrent":
                if name.startswith("weight_hh"):
                    nn.init.orthogonal_(block, gain=gain)
                else:
                    nn.init.xavier_normal_(block)
            else:  # pragma: no cover - internal
                raise ValueError(f"unknown scheme {scheme!r}")
    if isinstance(layer, RECURRENT_MODULES):
        _zero_biases(layer)
    elif isinstance(bias := getattr(layer, "bias", None), Tensor):
        nn.init.zeros_(bias)


def _run_on(model: nn.Module, inputs: object) -> None:
    """Call ``model`` on example inputs: ``model(inputs)``; an ``(inputs, targets)`` pair gives
    ``model(inputs)``, a dict of keyword inputs ``model(**inputs)`` (the doctor's batch convention)."""
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)) and len(inputs) in (2, 3) and isinstance(inputs[0], Tensor):
        model(inputs[0])
    else:
        model(inputs)


def _check_module(module: object, fn: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")
    return module


def xavier_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Glorot & Bengio 2010: ``W ~ N(0, gain^2 * 2 / (fan_in + fan_out))`` for every Linear/Conv/recurrent
    weight in ``module`` (recurrent gate blocks each on their own); biases 0. Returns ``module``."""
    for layer in _weight_layers(_check_module(module, "xavier_")):
        _init_layer(layer, "xavier", gain)
    return module


def he_(module: nn.Module, negative_slope: float = 0.0) -> nn.Module:
    """He et al. 2015: ``W ~ N(0, 2 / ((1 + a^2) fan_in))``, ``a`` = ``negative_slope`` of the rectifier,
    for every Linear/Conv/recurrent weight in ``module``; biases 0. Returns ``module``."""
    gain = math.sqrt(2.0 / (1.0 + negative_slope**2))
    for layer in _weight_layers(_check_module(module, "he_")):
        _init_layer(layer, "he", gain)
    return module


def orthogonal_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Saxe et al. 2014: ``W = gain * Q``, ``Q`` (semi-)orthogonal, for every Linear/Conv/recurrent weight in
    ``module``, each recurrent gate block on its own; biases 0. Returns ``module``.

    A hidden-to-hidden weight initialised so has spectral norm ``gain``: at ``gain = 1`` it sits exactly on
    the bound of Pascanu et al. 2013 for tanh (``sigma_max(W_hh) <= 1/gamma`` with ``gamma = 1``).
    """
    for layer in _weight_layers(_check_module(module, "orthogonal_")):
        _init_layer(layer, "orthogonal", gain)
    return module


def following_activations(
    model: nn.Module, inputs: object = None
) -> dict[str, nn.Module | None]:
    """For each Linear/Conv layer, the activation module that follows it (None: no activation, linear).

    "Follows" means: the next leaf module to run, skipping dropout, normalisation, pooling and reshaping
    modules. Another weight layer, or the end of the model, means no activation. With ``inputs``, the order
    is the real execution order of ``model(inputs)`` (recorded with forward hooks); without, it is the
    registration order of the modules, which is the execution order of ``nn.Sequential``.
    """
    if inputs is not None:
        with torch.no_grad(), ForwardTrace(model, grad_norms=False) as trace:
            _run_on(model, inputs)
        seen: set[int] = set()
        order: list[tuple[str, nn.Module]] = []
        for call in leaf_calls(trace.calls):
            if id(call.module) not in seen:  # a module called again (weight sharing) keeps its first place
                seen.add(id(call.module))
                order.append((call.name, call.module))
    else:
        order = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    return following_in_order(order)


def following_in_order(order: list[tuple[str, nn.Module]]) -> dict[str, nn.Module | None]:
    """:func:`following_activations` for leaf modules already listed in execution order."""
    following: dict[str, nn.Module | None] = {}
    for i, (name, module) in enumerate(order):
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        following[name] = None
        for _, later in order[i + 1:]:
            if isinstance(later, TRANSPARENT):
                continue
            if not isinstance(later, WEIGHT_LAYERS + RECURRENT_MODULES) and \
                    next(later.parameters(recurse=False), None) is None:
                following[name] = later  # an activation, known (activation_kind) or not
            break
    return following


def _recurrent_cell_weights(model: nn.Module, inputs: object) -> set[int]:
    """ids of the square weights of hand-written recurrent cells found by running ``model(inputs)``."""
    with torch.no_grad(), ForwardTrace(model, grad_norms=False) as trace:
        _run_on(model, inputs)
    square: set[int] = set()
    for cell in find_recurrent_cells(trace.calls):
        if isinstance(cell.calls[0].module, RECURRENT_MODULES):
            continue  # nn.RNNCell and friends are handled by their class
        state_sizes = {cell.calls[0].inputs[i].shape[-1] for i in cell.state_inputs}
        for param in cell.calls[0].module.parameters():
            if param.dim() == 2 and param.shape[0] == param.shape[1] and param.shape[0] in state_sizes:
                square.add(id(param))
    return square


def auto_(model: nn.Module, inputs: object = None) -> dict[str, InitChoice]:
    """Initialise every layer for the activation that follows it; returns ``{layer name: scheme}``.

    * Linear/Conv followed by a rectifier: He et al. 2015 with the rectifier's gain.
    * Linear/Conv followed by tanh, sigmoid or nothing: Xavier (Glorot & Bengio 2010).
    * ``nn.RNN/GRU/LSTM`` and ``nn.*Cell``: Xavier input weights, orthogonal hidden weights (Saxe et al.
      2014), per gate block; biases 0.
    * Hand-written recurrent cells (found only when ``inputs`` is given, see ``gradguard.trace``): their square
      ``hidden x hidden`` weights orthogonal.

    Args:
        model: the model, edited in place.
        inputs: optional example inputs, ``model(inputs)`` is run once without gradients to record the
            execution order and find hand-written cells (an ``(inputs, targets)`` pair and a dict of keyword
            inputs also work). Without them, registration order is used.
    """
    _check_module(model, "auto_")
    following = following_activations(model, inputs)
    cell_weights = _recurrent_cell_weights(model, inputs) if inputs is not None else set()
    chosen: dict[str, InitChoice] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, RECURRENT_MODULES):
            _init_layer(layer, "recurrent", 1.0)
            chosen[name] = "recurrent"
        elif isinstance(layer, WEIGHT_LAYERS):
            if id(layer.weight) in cell_weights:
                _init_layer(layer, "orthogonal", 1.0)
                chosen[name] = "orthogonal"
                continue
            activation = following.get(name)
            scheme, gain = prescribed_init(activation)
            _init_layer(layer, scheme, gain)
            chosen[name] = scheme
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in cell_weights and param.dim() == 2 and not _owned_by_weight_layer(model, param):
                nn.init.orthogonal_(param)
    return chosen


def _owned_by_weight_layer(model: nn.Module, param: Tensor) -> bool:
    return any(isinstance(m, WEIGHT_LAYERS) and m.weight is param for m in model.modules())


@torch.no_grad()
def chrono_(module: nn.Module, max_steps: int, seed: int = 0) -> nn.Module:
    """Chrono initialisation of the gate biases of every LSTM/GRU in ``module``, Tallec & Ollivier 2018.

    A gate that keeps the state with probability ``sigma(b)`` keeps it for about ``1 / (1 - sigma(b))``
    steps; drawing ``b ~ log(U(1, max_steps - 1))`` spreads the memory spans of the units over ``1 ..
    max_steps``, so some of them carry the gradient across the whole sequence:

    * LSTM (gates ``i|f|g|o``): forget bias ``b_f ~ log(U(1, T - 1))``, input bias ``b_i = -b_f``;
    * GRU (gates ``r|z|n``, ``h' = (1 - z) n + z h``): update bias ``b_z ~ log(U(1, T - 1))``.

    The value goes into ``bias_ih``; the matching slice of ``bias_hh`` is set to 0. Other biases are left
    alone. Returns ``module``.
    """
    if max_steps < 3:
        raise ValueError(f"chrono_: max_steps must be >= 3 (the longest span to remember), got {max_steps}")
    generator = torch.Generator().manual_seed(seed)
    found = False
    for layer in module.modules():
        gated = isinstance(layer, (nn.LSTM, nn.LSTMCell, nn.GRU, nn.GRUCell))
        if not gated or not getattr(layer, "bias", True):
            continue
        found = True
        lstm = isinstance(layer, (nn.LSTM, nn.LSTMCell))
        for name, bias in layer.named_parameters(recurse=False):
            if not name.startswith(("bias_ih", "bias_hh")):
                continue
            blocks = bias.data.chunk(4 if lstm else 3)
            keep = blocks[1]  # LSTM forget gate f, GRU update gate z: both second in torch's order
            if name.startswith("bias_hh"):
                keep.zero_()
                if lstm:
                    blocks[0].zero_()
                continue
            spans = torch.empty(keep.shape, dtype=torch.float64).uniform_(1.0, max_steps - 1.0, generator=generator)
            keep.copy_(spans.log())
            if lstm:
                blocks[0].copy_(-spans.log())
    if not found:
        raise ValueError(f"chrono_: {type(module).__name__} holds no LSTM or GRU with biases")
    return module


@torch.no_grad()
def lsuv_(model: nn.Module, inputs: object, tol: float = 0.1, max_iters: int = 10) -> dict[str, float]:
    """Layer-sequential unit-variance init, Mishkin & Matas 2016 (Algorithm 1).

    Every Linear/Conv weight is first made orthogonal (Saxe et al. 2014); then, layer by layer in execution
    order, ``W <- W / sqrt(Var(B))`` where ``B`` is the layer's output on ``inputs``, until ``|Var(B) - 1| <
    tol`` or ``max_iters`` rescalings. Recurrent modules get :func:`auto_`'s treatment (orthogonal hidden
    weights) and are not rescaled. Biases are set to 0.

    Args:
        model: the model, edited in place.
        inputs: a batch of inputs as ``model(inputs)`` takes them; an ``(inputs, targets)`` pair and a dict of
            keyword inputs (``model(**inputs)``) also work.
        tol: tolerance on the output variance.
        max_iters: rescalings per layer at most.

    Returns:
        ``{layer name: output variance reached}``.
    """
    _check_module(model, "lsuv_")
    if tol <= 0:
        raise ValueError(f"lsuv_: tol must be > 0, got {tol}")
    if max_iters < 1:
        raise ValueError(f"lsuv_: max_iters must be >= 1, got {max_iters}")
    with ForwardTrace(model, grad_norms=False) as trace:
        _run_on(model, inputs)
    order: list[tuple[str, nn.Module]] = []
    for call in leaf_calls(trace.calls):
        if isinstance(call.module, WEIGHT_LAYERS) and all(call.module is not m for _, m in order):
            order.append((call.name, call.module))
    for module in model.modules():
        if isinstance(module, RECURRENT_MODULES):
            _init_layer(module, "recurrent", 1.0)
    reached: dict[str, float] = {}
    for _, layer in order:
        _init_layer(layer, "orthogonal", 1.0)
    for name, layer in order:
        captured: list[Tensor] = []
        handle = layer.register_forward_hook(lambda m, a, out, store=captured: store.append(out))
        try:
            for _ in range(max_iters):
                captured.clear()
                _run_on(model, inputs)
                variance = float(torch.cat([c.detach().float().flatten() for c in captured]).var())
                if not math.isfinite(variance) or variance == 0.0:
                    raise ValueError(f"lsuv_: layer {name!r} has output variance {variance} on these inputs")
                if abs(variance - 1.0) < tol:
                    break
                weight = layer.weight
                assert isinstance(weight, Tensor)
                weight.div_(math.sqrt(variance))
            captured.clear()
            _run_on(model, inputs)
            reached[name] = float(torch.cat([c.detach().float().flatten() for c in captured]).var())
        finally:
            handle.remove()
    return reached

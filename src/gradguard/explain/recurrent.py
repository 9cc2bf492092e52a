"""``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` stepped by hand with the module's own weights.

torch's fused recurrent kernels keep the hidden states ``h_1..h_T`` inside one autograd node, so the
gradient with respect to each ``h_t`` cannot be hooked. Unrolling the same equations (torch's
documentation of each module) step by step with the same parameters gives the same outputs, and one
tensor per step and layer on which ``dL/dh_t`` can be read and from which ``dh_T/dh_0`` can be
differentiated.

Supported: any number of layers, ``batch_first`` or not, batched or unbatched input, with or without
biases. Not supported (:func:`unroll_unsupported` says why): bidirectional modules, LSTM ``proj_size``,
packed sequences. Inter-layer dropout is not applied (the doctor measures the model as at evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["State", "initial_state", "run_unrolled", "unroll_unsupported", "unrolled_forward"]

# One tensor per layer (RNN, GRU), or per layer h then per layer c (LSTM): the recurrent state of a step.
State = list[Tensor]


def unroll_unsupported(module: nn.RNNBase, args: tuple) -> str | None:
    """Why ``module(*args)`` cannot be stepped by hand, or None when it can."""
    if module.bidirectional:
        return "bidirectional recurrent modules are not stepped by hand"
    if getattr(module, "proj_size", 0):
        return "LSTM with proj_size is not stepped by hand"
    if not args or not isinstance(args[0], Tensor):
        return "input is not a tensor (packed sequences are not stepped by hand)"
    if args[0].dim() not in (2, 3):
        return f"input must have 2 or 3 dimensions, got {args[0].dim()}"
    return None


def _step(mode: str, x: Tensor, h: Tensor, c: Tensor | None, weights: list[Tensor | None]) -> tuple:
    w_ih, w_hh, b_ih, b_hh = weights
    assert w_ih is not None and w_hh is not None
    gates_x = F.linear(x, w_ih, b_ih)
    gates_h = F.linear(h, w_hh, b_hh)
    if mode == "RNN_TANH":
        return torch.tanh(gates_x + gates_h), None
    if mode == "RNN_RELU":
        return torch.relu(gates_x + gates_h), None
    if mode == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, -1)
        h_r, h_z, h_n = gates_h.chunk(3, -1)
        reset = torch.sigmoid(x_r + h_r)
        update = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
        return (1 - update) * candidate + update * h, None
    if mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, -1)
        assert c is not None
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_next), c_next
    raise ValueError(f"recurrent: unknown mode {mode!r}")


def _layer_weights(module: nn.RNNBase, layer: int) -> list[Tensor | None]:
    names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
    return [getattr(module, n, None) if module.bias or n.startswith("weight") else None for n in names]


def _time_major(module: nn.RNNBase, x: Tensor) -> tuple[Tensor, bool]:
    """Input as (T, N, features); second value: whether it was unbatched."""
    if x.dim() == 2:
        return x.unsqueeze(1), True
    return (x.transpose(0, 1) if module.batch_first else x), False


def initial_state(module: nn.RNNBase, args: tuple, kwargs: dict) -> State:
    """The state the module starts from: its ``hx`` argument, or zeros as torch uses."""
    x, unbatched = _time_major(module, args[0])
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    layers, batch, hidden = module.num_layers, x.shape[1], module.hidden_size
    if hx is None:
        zeros = x.new_zeros(layers, batch, hidden)
        hx = (zeros, zeros) if module.mode == "LSTM" else zeros
    parts = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    if unbatched:
        parts = [p.unsqueeze(1) for p in parts]
    return [p[k] for p in parts for k in range(layers)]


def run_unrolled(module: nn.RNNBase, inputs: Tensor, state: State) -> tuple[Tensor, list[State]]:
    """Step ``module`` through ``inputs`` (time-major, ``(T, N, features)``) from ``state``.

    Returns:
        The output sequence ``(T, N, hidden)`` of the last layer, and the state after each step:
        ``states[t]`` is the state ``h_{t+1}`` as a list like ``state``.
    """
    layers, lstm = module.num_layers, module.mode == "LSTM"
    h = list(state[:layers])
    c = list(state[layers:]) if lstm else [None] * layers
    weights = [_layer_weights(module, k) for k in range(layers)]
    outputs: list[Tensor] = []
    states: list[State] = []
    for t in range(inputs.shape[0]):
        layer_input = inputs[t]
        for k in range(layers):
            h[k], c[k] = _step(module.mode, layer_input, h[k], c[k], weights[k])
            layer_input = h[k]
        outputs.append(layer_input)
        states.append(list(h) + (list(c) if lstm else []))  # type: ignore[arg-type]
    return torch.stack(outputs), states


def unrolled_forward(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[object, State, list[State]]:
    """``module(*args, **kwargs)`` computed step by step: (the module's output, ``h_0``, ``[h_1..h_T]``)."""
    x, unbatched = _time_major(module, args[0])
    state0 = initial_state(module, args, kwargs)
    output, states = run_unrolled(module, x, state0)
    layers = module.num_layers
    final = states[-1]
    h_n = torch.stack(final[:layers])
    c_n = torch.stack(final[layers:]) if module.mode == "LSTM" else None
    if unbatched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif module.batch_first:
        output = output.transpose(0, 1)
    hidden = (h_n, c_n) if c_n is not None else h_n
    return (output, hidden), state0, states

"""Gradient flow across time for recurrent models: ``||dL/dh_t||`` for each step and ``||dh_T/dh_0||``.

Pascanu et al. 2013 (eq. 5) write the gradient reaching step ``k`` from step ``t > k`` as a product of
step Jacobians, ``dh_t/dh_k = prod_{i=k+1..t} diag(phi'(a_i)) W_hh^T``, whose norm grows or shrinks
geometrically with ``t - k``. Two measurements follow from it:

* the error signal at each step, ``||dL/dh_t||`` for ``t = 1..T`` (the total gradient with respect to the
  state, through every later step), read with tensor hooks. Its log is fitted against ``t`` like the depth
  profile (``flow.py``): the *growth per step* going back in time and the total growth over the sequence;
* ``||dh_T/dh_0||``, the spectral norm of the Jacobian from the first state to the last, by power iteration
  with ``torch.func`` jvp/vjp (``jacobian.py``), for this batch's inputs. It is the worst direction, the
  one clipping has to catch (Pascanu et al. 2013, section 3).

Verdict over time: *exploding* when either the total growth of the error signal or ``||dh_T/dh_0||`` is
above 10, *vanishing* when either is below 1/10 and neither is above; *stable* otherwise (the same line as
across depth, ``flow.GROWTH_LIMIT``).

What is measured: the first recurrent module in forward order, ``nn.RNN/GRU/LSTM`` stepped by hand with its
own weights (``recurrent.py``) or a hand-written cell (``trace.find_recurrent_cells``). The state ``h_t``
is the hidden state of every layer (and the cell state ``c_t`` of an LSTM), or for a cell the tensors its
call passes to the next call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradguard.explain.flow import fit_growth, safe_exp, verdict_of
from gradguard.explain.jacobian import spectral_norm
from gradguard.explain.recurrent import State, run_unrolled, unroll_unsupported, unrolled_forward
from gradguard.trace import RecurrentCell, flat_tensors, norm32

__all__ = ["RecurrentRecorder", "TimeFlow", "cell_time_flow", "rnn_time_flow", "time_verdict"]

_TINY = 1e-30


@dataclass
class TimeFlow:
    """The gradient flow across time of one recurrent module.

    Attributes:
        module: its path in the model.
        steps: ``T``.
        grad_norm_per_step: ``||dL/dh_t||`` for ``t = 1..T`` (list index ``t - 1``).
        dhT_dh0: spectral norm of ``dh_T/dh_0``.
        growth_per_step: fitted factor by which ``||dL/dh_t||`` grows per step going back in time.
        total_growth: ``growth_per_step ** (T - 1)``.
        verdict: ``"exploding"``, ``"vanishing"`` or ``"stable"``.
    """

    module: str
    steps: int
    grad_norm_per_step: list[float]
    dhT_dh0: float
    growth_per_step: float
    total_growth: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "steps": self.steps,
            "grad_norm_per_step": self.grad_norm_per_step,
            "dhT_dh0": self.dhT_dh0,
            "growth_per_step": self.growth_per_step,
            "total_growth": self.total_growth,
            "verdict": self.verdict,
        }


def time_verdict(total_growth: float, dhT_dh0: float) -> str:
    by_signal, by_jacobian = verdict_of(total_growth), verdict_of(dhT_dh0)
    if "exploding" in (by_signal, by_jacobian):
        return "exploding"
    if "vanishing" in (by_signal, by_jacobian):
        return "vanishing"
    return "stable"


def _summarise(module: str, step_norms: list[float], dhT_dh0: float) -> TimeFlow:
    # Fit going back in time (t = T..1), so the slope is the growth per step of the backward signal.
    log_profile = [math.log(max(n, _TINY)) for n in reversed(step_norms)]
    slope = fit_growth(log_profile)
    growth = safe_exp(slope)
    total = safe_exp(slope * (len(step_norms) - 1)) if len(step_norms) > 1 else 1.0
    return TimeFlow(module, len(step_norms), step_norms, dhT_dh0, growth, total, time_verdict(total, dhT_dh0))


@dataclass
class UnrolledRun:
    """One call of an ``nn.RNN/GRU/LSTM``, stepped by hand: its inputs, ``h_0`` and ``h_1..h_T``."""

    name: str
    module: nn.RNNBase
    args: tuple
    kwargs: dict
    state0: State
    states: list[State]
    grad_norms: list[Tensor | None] = field(default_factory=list)


class RecurrentRecorder:
    """A ``ForwardTrace`` output rewriter that steps ``nn.RNN/GRU/LSTM`` by hand and hooks every ``h_t``.

    ``runs`` holds the calls stepped by hand; ``skipped`` maps a module name to why it could not be;
    ``notes`` says where stepping by hand differs from the module (inter-layer dropout).
    """

    def __init__(self) -> None:
        self.runs: list[UnrolledRun] = []
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []

    def __call__(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(module, nn.RNNBase):
            return None
        reason = unroll_unsupported(module, args)
        if reason is not None:
            self.skipped[name] = reason
            return None
        if module.dropout > 0 and module.training and module.num_layers > 1:
            self.notes.append(f"{name}: stepped by hand without its inter-layer dropout")
        new_output, state0, states = unrolled_forward(module, args, kwargs)
        run = UnrolledRun(name, module, args, kwargs, state0, states, [None] * len(states))
        for t, state in enumerate(states):
            for tensor in state:
                if tensor.requires_grad:
                    tensor.register_hook(self._accumulate(run, t))
        self.runs.append(run)
        return new_output

    @staticmethod
    def _accumulate(run: UnrolledRun, t: int):
        def hook(grad: Tensor | None) -> None:
            if grad is None:  # a state output nothing used
                return
            square = norm32(grad.detach()).square()
            previous = run.grad_norms[t]
            run.grad_norms[t] = square if previous is None else previous + square

        return hook


def _host_norms(squares_or_norms: list[Tensor | None], squared: bool) -> list[float]:
    present = [x for x in squares_or_norms if x is not None]
    values = torch.stack(present).tolist() if present else []
    it = iter(values)
    out = [next(it) if x is not None else 0.0 for x in squares_or_norms]
    return [math.sqrt(v) for v in out] if squared else out


def rnn_time_flow(run: UnrolledRun, iterations: int = 50) -> TimeFlow:
    """Time flow of an ``nn.RNN/GRU/LSTM`` call recorded by :class:`RecurrentRecorder`."""
    module = run.module
    x = run.args[0].detach()
    x = x.unsqueeze(1) if x.dim() == 2 else (x.transpose(0, 1) if module.batch_first else x)

    def final_state(*state0: Tensor) -> tuple[Tensor, ...]:
        return tuple(run_unrolled(module, x, list(state0))[1][-1])

    dhT_dh0 = spectral_norm(final_state, tuple(s.detach() for s in run.state0), iterations).value
    return _summarise(run.name, _host_norms(run.grad_norms, squared=True), dhT_dh0)


def _replay(cell: RecurrentCell, state0: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Run the cell's recorded calls again from ``state0``, other inputs fixed: ``h_T`` as a function of ``h_0``."""
    state = state0
    for call in cell.calls:
        leaves, spec = tree_flatten((call.args, call.kwargs))
        tensor_leaves = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        for position, value in zip(cell.state_inputs, state):
            leaves[tensor_leaves[position]] = value
        args, kwargs = tree_unflatten(leaves, spec)
        outputs = flat_tensors(call.module(*args, **kwargs))
        state = tuple(outputs[j] for j in cell.state_outputs)
    return state


def cell_time_flow(cell: RecurrentCell, iterations: int = 50) -> TimeFlow:
    """Time flow of a hand-written recurrent cell found in a trace (run after backward)."""
    per_step: list[Tensor | None] = []
    for call in cell.calls:
        norms = [call.output_grad_norms[j] for j in cell.state_outputs]
        present = [n for n in norms if n is not None]
        per_step.append(torch.linalg.vector_norm(torch.stack(present)) if present else None)
    state0 = tuple(cell.calls[0].inputs[i].detach() for i in cell.state_inputs)
    dhT_dh0 = spectral_norm(lambda *h: _replay(cell, h), state0, iterations).value
    return _summarise(cell.name, _host_norms(per_step, squared=False), dhT_dh0)


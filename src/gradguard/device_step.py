"""The device half of a guarded step, as one pure function: detect, decide, the history row.

Between the gradients' norms and the optimizer step, the Guard does nothing but small element-wise
arithmetic on a few short vectors (``[||g||, loss, ||g_layer|| ...]``, the event flags, one history row)::

    out = device_step(stats.total_norm, stats.finite, stats.norms, loss, state, weight_norm, clip_coef,
                      counts, update, constants, code_weights, responses, config)
    out.skip, out.coef        # the decision (gradguard.decide)
    out.codes[0]              # [skip, coef < 1, flag per kind] as one integer: the plain path's one host read
    out.row                   # the step's history row (gradguard.history.FIELDS)
    out.detector.state        # the detector's new state (Detector.commit keeps it)
    out.update_state          # the update size's new state (UpdateSize.keep keeps it)

Run eagerly, that is about 80 small kernels per step (``benchmarks/bench_guard.py --ops`` lists them):
each costs a few microseconds on a CPU and a kernel launch on a GPU, whatever the model's size. With
``gg.Guard(..., compile=True)`` the function goes through ``torch.compile`` (inductor), which fuses them
into a few kernels, once the detector's warm-up is over (the warm-up's median and MAD stay eager). It is
compiled at the first steady step (seconds; once per kind of step: with or without the weight-norm
sample, with or without a loss); a function that fails to compile (no C++ compiler, an unsupported
backend) warns once and runs eagerly, with the same results.

The function reads no tensor on the host and changes no input: it returns new tensors, which the Guard
keeps (so a failed compiled call can simply be run again eagerly).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard.decide import Responses, decide
from gradguard.detect import (
    LOSS,
    DetectorConstants,
    DetectorOutput,
    DetectorStep,
    DetectorTensors,
    detector_step,
    pack,
)
from gradguard.history import history_row
from gradguard.update_size import (
    UpdateMeasurement,
    UpdateSizeStep,
    UpdateSizeTensors,
    UpdateSizeVerdict,
    update_size_step,
)

__all__ = ["DeviceStep", "StepConfig", "StepOutput", "UpdateInputs", "device_step"]


@dataclass(frozen=True)
class StepConfig:
    """What one guarded step computes, fixed on the host (one object per kind of step)."""

    detector: DetectorStep
    ceiling: float  # GlobalNorm's max_norm (inf: none)
    record: bool  # build the history row here (False: a per-layer clip strategy changes it after the step)
    fused: bool  # the optimizer takes grad_scale: compute 1 / coef
    update: UpdateSizeStep | None = None  # the update size's step (None: no update-size signal)


class UpdateInputs(NamedTuple):
    """What the update-size signal reads at one step (``gradguard.update_size``), device tensors."""

    state: UpdateSizeTensors
    log_lr: Tensor  # 0-d: log of the learning rate of the step about to be taken
    measurement: UpdateMeasurement | None  # the last sampled step's update, or None


class StepOutput(NamedTuple):
    """What :func:`device_step` returns; all device tensors (None where the config asks for none)."""

    detector: DetectorOutput
    skip: Tensor  # 0-d bool: leave the parameters and the optimizer state as they are
    coef: Tensor  # 0-d: the factor for the gradients on a real step (1.0 on a skipped step)
    ceiling: Tensor  # 0-d float32: the total norm the step was allowed
    flags: Tensor  # bool [skip, coef < 1, flag per kind of STEP_KINDS]
    bits: Tensor  # the same as 0.0 / 1.0
    codes: Tensor  # [all bits as one integer, the flags' bits as one integer], exact in float32
    stepped: Tensor  # 0-d bool: not skip (what Guard.step returns)
    row: Tensor | None  # the history row
    update: UpdateSizeVerdict | None  # the update size's verdict (None: no update-size signal)
    update_state: UpdateSizeTensors | None  # its new state
    counts: Tensor | None  # [skipped, clipped] so far, this step included
    grad_scale: Tensor | None  # 1 / coef, float32, for a fused optimizer


def device_step(total_norm: Tensor, finite: Tensor, norms: Tensor, loss: Tensor | None, state: DetectorTensors,
                weight_norm: Tensor | None, clip_coef: Tensor | None, counts: Tensor | None,
                update: UpdateInputs | None, c: DetectorConstants, code_weights: Tensor, responses: Responses,
                config: StepConfig) -> StepOutput:
    """One guarded step's device arithmetic (the module docstring): :func:`gradguard.detect.detector_step`,
    :func:`gradguard.decide.decide`, :func:`gradguard.history.history_row`. Pure: no host read, inputs
    unchanged.

    Args:
        total_norm: the step's :class:`~gradguard.stats.GradStats` total norm (all-reduced when
            distributed).
        finite: the GradStats' finite flag.
        norms: the GradStats' per-layer norms.
        loss: the step's loss (summed over its micro-batches), or None.
        state: the detector's state (``Detector.begin``).
        weight_norm: the weights' norm on the steps the precursor samples it, else None.
        clip_coef: a scale clip strategy's coefficient (AutoClip, ZClip), or None.
        counts: ``[skipped, clipped]`` before this step (None: none yet).
        update: the update-size signal's inputs (None: off): its flags follow the detector's.
        c: the detector's constants.
        code_weights: the ``(2, 2 + len(STEP_KINDS))`` weights of the codes.
        responses: the action per kind of event.
        config: the kind of step.
    """
    u = pack(total_norm, loss, norms, c)
    detected = detector_step(u, state, weight_norm, c, config.detector)
    verdict, update_verdict, update_state = detected.verdict, None, None
    if update is not None and config.update is not None:
        update_state, update_verdict = update_size_step(update.state, update.log_lr, update.measurement,
                                                        config.update)
        update_flags = torch.stack([update_verdict.jump, update_verdict.raised])
    else:
        update_flags = c.zeros[:2].bool()  # (the constants' zeros have at least the two packed slots)
    verdict = verdict._replace(flags=torch.cat([verdict.flags, update_flags]))
    detected = detected._replace(verdict=verdict)
    decision = decide(total_norm, finite, verdict, clip_coef, responses, config.ceiling)
    flags = torch.cat([decision.skip.reshape(1), (decision.coef < 1.0).reshape(1), decision.flags])
    bits = flags.float()
    codes = code_weights @ bits
    row = new_counts = None
    if config.record:
        row, step_counts = history_row(u[LOSS], detected.verdict, total_norm, decision.coef, decision.ceiling,
                                       decision.skip, flags, bits, codes, None, update_verdict)
        new_counts = step_counts if counts is None else counts + step_counts
    grad_scale = decision.coef.float().reciprocal() if config.fused else None
    return StepOutput(detector=detected, skip=decision.skip, coef=decision.coef, ceiling=decision.ceiling,
                      flags=flags, bits=bits, codes=codes, stepped=decision.skip.logical_not(), row=row,
                      counts=new_counts, grad_scale=grad_scale, update=update_verdict, update_state=update_state)


class DeviceStep:
    """:func:`device_step`, eager or compiled.

    Args:
        compile: run the steps past the detector's warm-up through ``torch.compile`` (inductor,
            ``fullgraph=True``): a few fused kernels instead of ~80 small ones. False: always eager.
    """

    #: Compilations of ``device_step`` allowed per process (torch's default is 8 per function): one per kind
    #: of step (with or without the weight sample, a loss, a clip coefficient), per dtype and per number of
    #: layers, over every Guard of the process (they share the compiled code).
    RECOMPILE_LIMIT = 64

    def __init__(self, compile: bool = False):
        self.compile = compile
        self.compiled: Callable[..., StepOutput] | None = None
        self.compiled_calls = 0  # steps run by the compiled function
        self._kinds: set[tuple[Any, ...]] = set()  # the kinds of call this object has made compiled

    def __call__(self, *args: Any, steady: bool) -> StepOutput:
        """``device_step(*args)``; compiled when ``compile`` and ``steady`` (past every warm-up: one kind of step
        from then on)."""
        # a compiled region cannot run under a TorchDispatchMode (count_host_syncs, a profiler's): eager then
        if self.compile and steady and torch._C._len_torch_dispatch_stack() == 0:
            if self.compiled is None:
                self.compiled = torch.compile(device_step, fullgraph=True, dynamic=False)
            kind = _kind_of_call(*args)
            try:
                if kind in self._kinds:
                    out = self.compiled(*args)
                else:  # perhaps a new compilation: torch's limit of 8 per function is for one model's steps
                    with torch._dynamo.config.patch(recompile_limit=max(self.RECOMPILE_LIMIT,
                                                                        torch._dynamo.config.recompile_limit)):
                        out = self.compiled(*args)
                    self._kinds.add(kind)
            except Exception as error:  # no compiler, an unsupported backend, the recompile limit: run eagerly
                warnings.warn(f"gradguard: Guard(compile=True) could not compile its step ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly",
                              RuntimeWarning, stacklevel=3)
                self.compile = False
            else:
                self.compiled_calls += 1
                return out
        return device_step(*args)


def _kind_of_call(total_norm: Tensor, finite: Tensor, norms: Tensor, loss: Tensor | None, state: DetectorTensors,
                  weight_norm: Tensor | None, clip_coef: Tensor | None, counts: Tensor | None,
                  update: UpdateInputs | None, *rest: Any) -> tuple:
    """What tells two calls of :func:`device_step` (same arguments) apart for ``torch.compile``: the step's
    configuration, the norms' dtype, device and number, which optional inputs are given."""
    config = rest[-1]
    update_layers = None if update is None else update.state.layer_smoothed.shape
    return (config, total_norm.dtype, total_norm.device, norms.shape,
            loss is None, weight_norm is None, clip_coef is None, counts is None, update_layers)


def code_weights(n_kinds: int, device: torch.device) -> Tensor:
    """``W`` with ``W @ bits`` the two codes of ``bits = [skip, scale, flag per kind]``: row 0 the code the plain
    path reads (``2**i`` for bit ``i``), row 1 the flags' own code (``2**k`` for kind ``k``); exact in float32."""
    n = 2 + n_kinds
    weights = [[float(1 << i) for i in range(n)], [float(1 << (i - 2)) if i >= 2 else 0.0 for i in range(n)]]
    return torch.tensor(weights, device=device)


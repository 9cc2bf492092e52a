"""``gg.Guard(..., compile=True)`` on the stacks users run: a bad step past the warm-up, decided by the compiled step.

The stacks and faults of the real-stack matrix (``test_stacks_matrix.py``, whose helpers these runs reuse): a
``torch.compile``'d model in a plain loop (with fused AdamW, as nanoGPT trains), DDP and FSDP2 on 2 forked gloo
ranks, the Lightning callback and the Hugging Face Trainer callback (GPT-2 from a small config). Each run has a
short warm-up (:func:`short_detector`: steady, hence compiled, from step ``FIRST_STEADY``), a NaN gradient in
a known layer at step ``NAN_STEP`` and a NaN forward output at step ``FORWARD_STEP``, both past the warm-up.
The checks (:func:`check`): both steps skipped, the weights finite and unchanged by them, the event names the
poisoned layer by the user's name (no ``_orig_mod.``/``module.``), and every steady step really ran compiled
(``compiled_calls``; no "could not compile" fallback).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo.config
import torch._inductor.config
from test_stacks_matrix import (
    NET_GRAD_LAYER,
    Net,
    compile_backend,
    fsdp2_net,
    guarded_steps,
    hf_steps,
    lightning_steps,
    mse,
    net_batch,
    net_faults,
    run_distributed,
)
from torch import nn

import gradguard as gg

STEPS, NAN_STEP, FORWARD_STEP = 14, 10, 12
FAULTS_AT = {NAN_STEP: "grad", FORWARD_STEP: "forward"}
#: the first step past the short warm-up (the detector's 3 steps, the precursor's, the 6-step growth window)
FIRST_STEADY = 6


def short_detector() -> gg.detect.Detector:
    return gg.detect.Detector(warmup_steps=3, precursor=gg.precursor.Precursor(warmup_steps=3))


@pytest.fixture(autouse=True, scope="module")
def _one_compile_thread() -> Iterator[None]:
    # inductor's pool of compile workers costs more than it saves on a small CPU machine (test_stacks_matrix),
    # and forked DDP ranks must not inherit one
    with torch._inductor.config.patch(compile_threads=1):
        yield


@contextlib.contextmanager
def fallbacks() -> Iterator[list[str]]:
    """The "could not compile" warnings raised inside (the Guard's fallback to its eager step)."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught if "could not compile" in str(w.message))


def compile_options(**guard_options) -> dict:
    """The Guard options of these runs: compile=True, the short warm-up."""
    return {"compile": True, "detector": short_detector(), **guard_options}


def result(guard: gg.Guard, outcomes: dict[str, dict], fallback_messages: list[str]) -> dict:
    """What :func:`check` reads of one run (plain values: DDP ranks send it back)."""
    return {
        **outcomes,
        "compile": guard._step_fn.compile,
        "compiled_calls": guard._step_fn.compiled_calls,
        "fallbacks": fallback_messages,
        "skipped": [record["skipped"] for record in guard.history],
    }


def check(r: dict, layer: str) -> None:
    assert "error" not in r, r.get("error")
    assert not r["fallbacks"], r["fallbacks"]
    # every steady step ran compiled, the faulty ones included
    assert r["compile"] and r["compiled_calls"] == STEPS - FIRST_STEADY, (r["compile"], r["compiled_calls"])
    assert len(r["skipped"]) == STEPS and r["skipped"][NAN_STEP] and r["skipped"][FORWARD_STEP], r["skipped"]
    for fault in ("grad", "forward"):
        assert r[fault]["skipped"] and r[fault]["finite"] and r[fault]["unchanged"], (fault, r[fault])
    assert "nonfinite_grad" in r["grad"]["kinds"] and r["grad"]["grad_layers"] == [layer], r["grad"]
    assert "nonfinite_loss" in r["forward"]["kinds"], r["forward"]


# --- single-process stacks --------------------------------------------------------------------------


def test_compiled_model_with_fused_adamw() -> None:
    torch.manual_seed(0)
    net = Net()
    faults = net_faults(net)  # hooks before compiling: traced into the graph, switched by tensor values
    model = torch.compile(net, backend=compile_backend())
    with fallbacks() as messages:
        guard, outcomes = guarded_steps(model, faults, steps=STEPS, faults_at=FAULTS_AT, fused=True,
                                        **compile_options())
    assert guard.fused
    check(result(guard, outcomes, messages), NET_GRAD_LAYER)


def test_compiled_model_nan_weights_are_named_and_rolled_back_on_the_compiled_path() -> None:
    # NaN written into a known layer's weights after the warm-up: the flush names the parameter by the user's
    # name, the Guard rolls back to its only snapshot (step 0) and trains on, compiled throughout
    torch.manual_seed(0)
    net = Net()
    # the matrix's fault hooks (switched off here), as on every Net compiled in this process: compiled graphs of
    # Net.forward are shared, and one traced without the hooks would be reused by the runs that switch them on
    net_faults(net)
    model = torch.compile(net, backend=compile_backend())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=gg.RecoveryPolicy(snapshot_every=10**6),
                     **compile_options())
    with fallbacks() as messages:
        for step in range(30):
            x, y = net_batch(step)
            loss = mse(model(x), y)
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad(set_to_none=True)
            if step == 12:
                with torch.no_grad():
                    net.blocks[1].fc.weight[0, 0] = math.nan
        guard.close()
    events = [(e["kind"], e.get("layer"), e.get("to_step")) for r in guard.history for e in r["events"]
              if e["kind"] in ("nonfinite_param", "rollback")]
    assert events == [("nonfinite_param", NET_GRAD_LAYER + ".weight", None), ("rollback", None, 0)], events
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not messages and guard._step_fn.compile and guard._step_fn.compiled_calls >= 30 - FIRST_STEADY - 5


def test_lightning_callback() -> None:
    with fallbacks() as messages:
        guard, outcomes, _, _ = lightning_steps(STEPS, FAULTS_AT, **compile_options())
    check(result(guard, outcomes, messages), "net." + NET_GRAD_LAYER)


def test_hf_trainer_callback() -> None:
    with fallbacks() as messages:
        run = hf_steps("gpt2", STEPS, FAULTS_AT, **compile_options())
    check(result(run["guard"], run["outcomes"], messages), run["grad_layer"])


# --- DDP and FSDP2 on 2 gloo ranks --------------------------------------------------------------------


def compiled_ddp(rank: int) -> dict:
    torch.manual_seed(0)
    net = Net()
    faults = net_faults(net, nan_grad_here=rank == 1)  # the NaN gradient on rank 1 only
    model = nn.parallel.DistributedDataParallel(net)
    with fallbacks() as messages:
        guard, outcomes = guarded_steps(model, faults, rank, steps=STEPS, faults_at=FAULTS_AT, **compile_options())
    return {**result(guard, outcomes, messages), "weights": [p.detach().clone() for p in net.parameters()]}


def compiled_fsdp2(rank: int) -> dict:
    net = fsdp2_net()
    faults = net_faults(net, nan_grad_here=rank == 1)  # the NaN in rank 1's shard only
    with fallbacks() as messages:
        guard, outcomes = guarded_steps(net, faults, rank, steps=STEPS, faults_at=FAULTS_AT, **compile_options())
    return result(guard, outcomes, messages)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> list[dict]:
    return run_distributed((("ddp", compiled_ddp), ("fsdp2", compiled_fsdp2)), str(tmp_path_factory.mktemp("ranks")))


@pytest.mark.parametrize("stack", ["ddp", "fsdp2"])
def test_distributed(distributed: list[dict], stack: str) -> None:
    ranks = [rank[stack] for rank in distributed]
    for r in ranks:
        check(r, NET_GRAD_LAYER)
    # the same decisions on both ranks (the NaN was on rank 1 only)
    assert ranks[0]["skipped"] == ranks[1]["skipped"]
    if stack == "ddp":  # and so the same weights
        for a, b in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
            assert torch.equal(a, b)


# --- many Guards in one process -----------------------------------------------------------------------


def test_a_guard_compiles_its_steps_whatever_other_guards_compiled_before() -> None:
    """torch.compile keeps at most ``recompile_limit`` (8) graphs per function, and every Guard of a process (a
    test suite, a sweep, a notebook) adds its kinds of step (per model, configuration, dtype) to the same
    function's: the Guard after them fell back to eager. Here torch's limit is spent (1, by the first Guard) and
    a second Guard, with another number of layers (another graph), must still compile its steps."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for model in (Net(), nn.Sequential(nn.Linear(8, 1))):  # 9 steps: one kind of steady step (no weight sample)
            with fallbacks() as messages:
                guard, _ = guarded_steps(model, net_faults(Net()), steps=9, faults_at={}, **compile_options())  # no fault
            assert not messages
            assert guard._step_fn.compile and guard._step_fn.compiled_calls == 9 - FIRST_STEADY

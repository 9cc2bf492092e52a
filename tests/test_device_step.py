"""device_step: the guarded step's device arithmetic as one pure function; Guard(compile=True) runs it compiled."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import device_step as ds


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _run(compile: bool, fused: bool, steps: int = 45, clip: object = "global", dtype: torch.dtype = torch.float32,
         optimizer: str = "adamw", with_loss: bool = True, accumulation: int = 1) -> tuple[gg.Guard, nn.Module]:
    """A run with a NaN gradient (step 30), a loss x1e4 spike (step 36) and an LR-free healthy rest."""
    model = _model().to(dtype)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=fused)
    strategy = gg.clip.GlobalNorm(1.0) if clip == "global" else clip
    guard = gg.Guard(model, opt, clip=strategy, compile=compile, log_every=10, accumulation_steps=accumulation)
    data = torch.Generator().manual_seed(1)
    for i in range(steps * accumulation):
        x = torch.randn(32, 6, generator=data, dtype=dtype)
        step = i // accumulation
        loss = nn.functional.mse_loss(model(x), x[:, :1] - x[:, 1:2]) * (1e4 if step == 36 else 1.0)
        loss.backward()
        if step == 30:
            model[2].weight.grad[0, 0] = math.nan
        guard.step(loss if with_loss else None)
        if guard.sync_gradients:
            opt.zero_grad(set_to_none=True)
    guard.close()
    return guard, model


def _assert_same_records(a: object, b: object, where: str = "history") -> None:
    """Records equal: every decision, kind, name and count exactly, floats to 1e-5 relative (a compiled
    kernel may round the last bits differently), NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_records(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_records(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_compiled_guard_takes_the_same_decisions_as_the_eager_one(fused):
    eager, eager_model = _run(compile=False, fused=fused)
    compiled, compiled_model = _run(compile=True, fused=fused)
    # the steps past the warm-up (25) ran compiled: both kinds of step (with and without the weight sample)
    assert compiled._step_fn.compile and compiled._step_fn.compiled_calls == 45 - 25
    assert eager._step_fn.compiled_calls == 0
    kinds = {e["kind"]: e["step"] for r in compiled.history for e in r["events"]}
    assert kinds["nonfinite_grad"] == 30 and kinds["grad_spike"] == 36  # the faults were seen, compiled
    _assert_same_records(compiled.history, eager.history)
    assert compiled.summary() == eager.summary()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


CONFIGS = {  # the run's options; a clip strategy is made per run (they keep state)
    "no clip, no loss": dict(clip=lambda: None, with_loss=False),
    "AutoClip, accumulation 2": dict(clip=gg.clip.AutoClip, accumulation=2),
    "per-layer clip (in place)": dict(clip=lambda: gg.clip.LayerNorm(0.5)),
    "float64": dict(dtype=torch.float64),
    "fused SGD with momentum": dict(optimizer="sgd", fused=True),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_compiled_and_eager_steps_agree_across_configurations(config):
    options = dict(CONFIGS[config])
    fused = options.pop("fused", False)
    make_clip = options.pop("clip", lambda: "global")
    eager, eager_model = _run(compile=False, fused=fused, clip=make_clip(), **options)
    compiled, compiled_model = _run(compile=True, fused=fused, clip=make_clip(), **options)
    assert compiled._step_fn.compile and compiled._step_fn.compiled_calls > 0
    assert [r["step"] for r in compiled.history if r["skipped"]] == [30, 36] or not options.get("with_loss", True)
    _assert_same_records(compiled.history, eager.history)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _step_inputs(guard: gg.Guard, model: nn.Module) -> tuple:
    """The arguments the Guard passes to device_step at its next step (after 30 healthy steps)."""
    captured = {}
    step_fn = guard._step_fn

    def capture(*args, steady):
        captured["args"] = args
        return step_fn(*args, steady=steady)

    guard._step_fn = capture
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(7))
    nn.functional.mse_loss(model(x), x[:, :1]).backward()
    guard.step(nn.functional.mse_loss(model(x), x[:, :1]).detach())
    guard._step_fn = step_fn
    return captured["args"]


def test_device_step_is_pure_and_reads_nothing():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer)
    data = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = torch.randn(32, 6, generator=data)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    args = _step_inputs(guard, model)
    before = [t.clone() for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    with gg.count_host_syncs() as syncs:
        first = ds.device_step(*args)
        second = ds.device_step(*args)
    assert syncs.count == 0
    after = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    for a, b in zip(before, after):  # no input changed
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(torch.utils._pytree.tree_leaves(first), torch.utils._pytree.tree_leaves(second)):
        if isinstance(a, torch.Tensor):  # same inputs, same outputs
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_step_that_cannot_compile_warns_once_and_runs_eagerly(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler here")
        return fails

    monkeypatch.setattr(ds.torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, model = _run(compile=True, fused=False, steps=40)
    messages = [str(w.message) for w in caught if "could not compile" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler here" in messages[0]
    assert not guard._step_fn.compile and guard._step_fn.compiled_calls == 0
    eager, _ = _run(compile=False, fused=False, steps=40)
    _assert_same_records(guard.history, eager.history)


def test_a_dispatch_mode_runs_the_step_eagerly_without_turning_compile_off():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, compile=True)
    data = torch.Generator().manual_seed(1)
    for i in range(30):
        x = torch.randn(32, 6, generator=data)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        if i == 28:
            with gg.count_host_syncs():  # a TorchDispatchMode: no compiled region may run under it
                guard.step(loss)
        else:
            guard.step(loss)
        optimizer.zero_grad()
    assert guard._step_fn.compile and guard._step_fn.compiled_calls == 30 - 25 - 1


def test_compile_must_be_a_bool():
    model = _model()
    with pytest.raises(ValueError, match="compile must be True or False"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), compile="yes")


def test_is_finite_is_right_under_torch_compile():
    # x * 0 == 0, the former two-kernel idiom, is folded to True by torch.compile: NaN counted finite
    x = torch.tensor([1.0, -2.0, math.nan, math.inf, -math.inf])
    expected = [True, True, False, False, False]
    assert gg.stats.is_finite(x).tolist() == expected
    assert torch.compile(gg.stats.is_finite, fullgraph=True)(x).tolist() == expected

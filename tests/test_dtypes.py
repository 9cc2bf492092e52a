"""Gradient dtypes torch accepts: float64 stays float64 (bit-equal to torch), complex parameters are measured
and clipped as torch does, half precision is accumulated in float32."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import twin
from torch import nn

import gradguard as gg
from gradguard.clip import AGC, AutoClip, GlobalNorm, LayerNorm, Value, ZClip


def model_of(dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        real = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            real = torch.complex(real, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        p.grad = (real * scale).to(dtype)
    return model


DTYPES = [torch.float64, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("scale", [1.0, 1e100], ids=["1", "1e100"])
def test_norms_are_bit_equal_to_torch(dtype: torch.dtype, p: float, scale: float) -> None:
    if scale > 1e38 and dtype == torch.complex64:
        pytest.skip("complex64 cannot hold 1e100")
    model = model_of(dtype, scale)
    stats = gg.grad_stats(model, norm_type=p)
    expected = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()], norm_type=p)
    assert stats.total_norm.dtype == expected.dtype  # float64 for float64 and complex128
    if p == math.inf:  # aminmax / abs().amax(): the same exact maximum
        assert torch.equal(stats.total_norm, expected)
    else:
        assert torch.equal(stats.total_norm, expected), (stats.total_norm, expected)
    assert bool(stats.finite)
    per_layer = gg.grad_stats(model, groups="param", norm_type=p)
    for q, norm in zip(model.parameters(), per_layer.norms):
        torch.testing.assert_close(norm, torch.linalg.vector_norm(q.grad, p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e100], ids=["1", "1e100"])
def test_global_norm_clips_bit_equal_to_clip_grad_norm(dtype: torch.dtype, scale: float) -> None:
    if scale > 1e38 and dtype == torch.complex64:
        pytest.skip("complex64 cannot hold 1e100")
    ours = model_of(dtype, scale)
    theirs = twin(ours)
    result = GlobalNorm(1.0)(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    assert torch.equal(result.total_norm, expected)
    assert bool(result.clipped)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p.grad, q.grad)
    total = torch.nn.utils.get_total_norm([q.grad for q in ours.parameters()])
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def all_clippers() -> list[gg.clip.Clipper]:
    return [GlobalNorm(1.0), Value(0.5), LayerNorm(1.0), AGC(0.01), AutoClip(10.0, 10),
            ZClip(warmup_steps=2, max_grad_norm=1.0)]  # the cap: clipped within the warm-up too


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clipper", all_clippers(), ids=lambda c: type(c).__name__)
def test_every_clipper_takes_float64_and_complex_gradients(dtype: torch.dtype, clipper) -> None:
    clipped = []
    for seed in range(4):  # past ZClip's warm-up: its adaptive branch too
        model = model_of(dtype, scale=10.0 * (seed + 1), seed=seed)
        before = [p.grad.clone() for p in model.parameters()]
        result = clipper(model)
        clipped.append(bool(result.clipped))
        assert 0 < result.coef.item() <= 1
        assert bool(result.clipped) == (result.coef.item() < 1)
        for p, g in zip(model.parameters(), before):
            assert p.grad.dtype == dtype
            assert torch.isfinite(torch.view_as_real(p.grad) if dtype.is_complex else p.grad).all()
            assert p.grad.abs().max() <= g.abs().max()
    assert any(clipped)


def test_value_clamps_real_and_imaginary_parts_of_complex_gradients() -> None:
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.tensor([3 + 0.2j, -0.1 - 4j, 0.3 + 0.4j])
    result = Value(1.0)([p])
    assert torch.equal(p.grad, torch.tensor([1 + 0.2j, -0.1 - 1j, 0.3 + 0.4j]))
    assert result.coef.item() == pytest.approx(0.25)


def test_float64_clippers_keep_tiny_coefficients() -> None:
    # 1e100 gradients under ZClip/AutoClip: a float32 coefficient of 1e-100 would be 0 and zero the step.
    for clipper in (ZClip(warmup_steps=1), AutoClip(50.0, 4)):
        for seed in range(3):
            model = model_of(torch.float64, scale=1e100 if seed == 2 else 1.0, seed=seed)
            result = clipper(model)
        assert 0 < result.coef.item() < 1e-90, type(clipper).__name__
        assert all(p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64], ids=str)
def test_guard_clips_and_steps_instead_of_skipping(dtype: torch.dtype) -> None:
    # float64 gradients of 1e100 (finite: torch clips them) and complex gradients: a guarded step with
    # GlobalNorm(1) clips them and steps; it neither skips the step as non-finite nor crashes.
    scale = 1e100 if dtype == torch.float64 else 1e3
    model = model_of(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, clip=GlobalNorm(1.0), log_every=1)
    x = torch.randn(4, 6, dtype=dtype)
    for step in range(3):
        optimizer.zero_grad()
        loss = model(x).abs().sum()
        loss.backward()
        if step == 2:
            for p in model.parameters():
                p.grad.mul_(scale)
        before = [p.detach().clone() for p in model.parameters()]
        guard.step(loss.detach())
        guard.flush()
        record = guard.history[-1]
        assert not record["skipped"], record
        assert "nonfinite_grad" not in [e["kind"] for e in record["events"]], record
        moved = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
        assert 0 < moved.item() <= 0.1 * (1 + 1e-5), moved  # one SGD step with a gradient of norm <= 1
    assert record["clipped"] and record["total_norm"] > 1e3
    if dtype == torch.float64:  # recorded as the finite norm it is, not inf (the history follows the norms)
        assert 1e99 < record["total_norm"] < math.inf and record["clip_threshold"] == pytest.approx(1.0)
    assert all(torch.isfinite(torch.view_as_real(p) if p.is_complex() else p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_are_float32_accumulations_of_the_half_values(dtype: torch.dtype) -> None:
    # What holds: the norm equals the float32 norm of the same half values (torch's own clip_grad_norm_
    # returns a norm rounded to the half type, and overflows where float32 does not).
    model = model_of(dtype)
    stats = gg.grad_stats(model)
    assert stats.total_norm.dtype == torch.float32
    as_float32 = [p.grad.float() for p in model.parameters()]
    assert torch.equal(stats.total_norm, torch.nn.utils.get_total_norm(as_float32))
    theirs = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert theirs.dtype == dtype
    assert torch.equal(theirs, stats.total_norm.to(dtype)) or (theirs.float() - stats.total_norm).abs() <= 0.01 * theirs.float()

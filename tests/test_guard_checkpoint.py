"""A run stopped and resumed from state_dicts ends bitwise equal to one that never stopped (CPU)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradguard as gg

STEPS, STOP = 40, 23  # stop in the middle of a flush window (log_every=5)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(16, 6, generator=g)
    return x, torch.sin(x[:, :1]) + x[:, 1:2]


def _build(fused: bool, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.01 * s))
    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip(warmup_steps=5), scheduler=scheduler,
                     detector=gg.detect.Detector(warmup_steps=5), log_every=5, layer_every=3,
                     recovery=gg.RecoveryPolicy(snapshot_every=10, backoff_after=2, skip_window=20))
    return model, optimizer, scheduler, guard


def _train(model, optimizer, guard, steps: range) -> None:
    for i in steps:
        x, y = _batch(i)
        loss = nn.functional.mse_loss(model(x), y) * (1e3 if i == 18 else 1.0)  # a spike before the stop
        if i in (27, 28):  # NaN losses after the stop, in a row: the weights in doubt, an LR back-off
            loss = loss * math.nan
        loss.backward()
        if i in (12, 27, 30):  # non-finite gradients on both sides of the stop: skips
            model[0].bias.grad[0] = math.nan
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [False, True])
def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(fused):
    model, optimizer, _, guard = _build(fused, seed=0)
    _train(model, optimizer, guard, range(STEPS))
    guard.close()

    model_a, optimizer_a, scheduler_a, guard_a = _build(fused, seed=0)
    _train(model_a, optimizer_a, guard_a, range(STOP))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict(),
                "scheduler": scheduler_a.state_dict(), "guard": guard_a.state_dict()}, buffer)
    flushed_before_stop = guard_a.history
    del model_a, optimizer_a, scheduler_a, guard_a

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b, optimizer_b, scheduler_b, guard_b = _build(fused, seed=1)  # other init: all comes from the file
    model_b.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    scheduler_b.load_state_dict(checkpoint["scheduler"])
    guard_b.load_state_dict(checkpoint["guard"])
    _train(model_b, optimizer_b, guard_b, range(STOP, STEPS))
    guard_b.close()

    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert guard.summary() == guard_b.summary()
    assert guard.summary()["skipped"] == 5 and guard.summary()["lr_backoffs"] == 1  # 4 NaN, 1 loss spike
    assert optimizer.param_groups[0]["lr"] == optimizer_b.param_groups[0]["lr"]
    resumed = flushed_before_stop + guard_b.history
    assert [r["step"] for r in resumed] == list(range(STEPS))
    assert repr(resumed) == repr(guard.history)  # NaN-aware equality of every record

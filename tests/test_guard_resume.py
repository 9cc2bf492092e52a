"""Resume at any step (issue 17 point 8): everything the next step depends on is in guard.state_dict(),
right after a rollback included; load_state_dict refuses a state it cannot use before changing anything."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_guard_inputs import _same
from torch import nn

import gradguard as gg

STEPS = 45
NAN_AFTER = 33  # NaN written into the weights after this step: found at the flush after step 34, rolled back


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(64, 6, generator=g)
    return x, torch.sin(x[:, :1]) + x[:, 1:2]


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    # one snapshot, of the weights as training starts: the rollback goes back to a much higher loss
    guard = gg.Guard(model, optimizer, log_every=5, detector=gg.detect.Detector(warmup_steps=4, alpha=0.8),
                     recovery=gg.RecoveryPolicy(snapshot_every=None if seed < 0 else 1000))
    return model, optimizer, guard


def _train(model, optimizer, guard, steps: range) -> None:
    for i in steps:
        x, y = _batch(i)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
        if i == NAN_AFTER:
            with torch.no_grad():
                model[2].weight[0, 0] = math.nan


def _checkpoint(model, optimizer, guard) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "guard": guard.state_dict()},
               buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume(checkpoint: dict, model, optimizer, guard) -> None:
    """Load a :func:`_checkpoint` into new objects, as a resumed run does."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    guard.load_state_dict(checkpoint["guard"])


def test_a_run_checkpointed_at_any_step_and_resumed_is_bitwise_equal_right_after_a_rollback_included():
    """Regression: the pending loss-level reset of a rollback was not in state_dict(): a run resumed right
    after the rollback scored the restored weights' (higher) loss against the old level, skipped and rolled
    back again."""
    model, optimizer, guard = _build()
    _train(model, optimizer, guard, range(STEPS))
    guard.close()
    assert guard.summary()["rollbacks"] == 1
    differing = []
    for stop in range(1, STEPS):
        model_a, optimizer_a, guard_a = _build()
        _train(model_a, optimizer_a, guard_a, range(stop))
        checkpoint = _checkpoint(model_a, optimizer_a, guard_a)
        before_stop = guard_a.history
        model_b, optimizer_b, guard_b = _build(seed=1)
        _resume(checkpoint, model_b, optimizer_b, guard_b)
        _train(model_b, optimizer_b, guard_b, range(stop, STEPS))
        guard_b.close()
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
        if not (same and repr(before_stop + guard_b.history) == repr(guard.history)):
            differing.append(stop)
    assert differing == []


def _state_of(optimizer_kind=torch.optim.SGD):
    model, _, _ = _build()
    optimizer = optimizer_kind(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=5)
    for i in range(6):
        x, y = _batch(i)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    return guard, guard.state_dict()


def _refused(guard: gg.Guard, state: dict, message: str) -> None:
    before = guard.state_dict()
    with pytest.raises(ValueError, match=message):
        guard.load_state_dict(state)
    assert _same(before, guard.state_dict())


def test_a_snapshot_with_non_finite_weights_is_refused():
    """Regression: accepted; the run ended NaN at its first rollback, no exception."""
    guard, state = _state_of()
    state["recovery"]["snapshot"]["state"]["model"]["0.weight"][0, 0] = math.nan
    _refused(guard, state, "the snapshot holds NaN/Inf")


def test_a_detector_state_of_the_wrong_length_is_refused():
    """Regression: accepted; a raw error at the next step."""
    guard, state = _state_of()
    scores = state["detector"]["scores"]
    scores["seen"] = scores["seen"][:, :-1]  # in warm-up: the values seen so far, one row per step
    _refused(guard, state, r"the detector's seen has shape \(25, 3\), but 2 layers need 4 slots")


def test_an_adam_snapshot_in_an_sgd_guard_is_refused():
    """Regression: accepted; KeyError at the rollback."""
    guard, state = _state_of(torch.optim.SGD)
    _, adam_state = _state_of(torch.optim.Adam)
    state["recovery"]["snapshot"]["state"]["optimizer"] = adam_state["recovery"]["snapshot"]["state"]["optimizer"]
    _refused(guard, state, "the snapshot's optimizer group 0 is not of this optimizer")

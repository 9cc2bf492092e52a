"""Inputs refused at the door, with the argument named, before anything changes (issue 17 point 9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import Detector


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss(model: nn.Module, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 4, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach() if dtype is None else loss.detach().to(dtype)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sigma_floor": math.inf}, r"sigma_floor must be a finite number, got inf"),
    ({"z_thresh": math.nan}, r"z_thresh must be a finite number, got nan"),
    ({"z_thresh": "4"}, r"z_thresh must be a finite number, got '4'"),
    ({"alpha": None}, r"alpha must be a finite number, got None"),
    ({"growth_factor": math.inf}, r"growth_factor must be a finite number, got inf"),
    ({"warmup_sigma_floor": "0.5"}, r"warmup_sigma_floor must be a finite number >= 0, got '0.5'"),
    ({"warmup_loss_sigma_floor": math.inf}, r"warmup_loss_sigma_floor must be a finite number >= 0, got inf"),
    ({"warmup_window": 2}, r"warmup_window must be an int >= 3, got 2"),
])
def test_detector_thresholds_that_would_turn_detection_off_are_refused(kwargs, message):
    """Regression: Detector(sigma_floor=inf) was accepted and turned detection off (held-out loss 2.8e17,
    no event); a string failed only at the first step."""
    with pytest.raises(ValueError, match=message):
        Detector(**kwargs)


def test_a_recovery_policy_with_an_infinite_loss_threshold_is_refused():
    with pytest.raises(ValueError, match="snapshot_loss_z must be a finite number > 0, got inf"):
        gg.RecoveryPolicy(snapshot_loss_z=math.inf)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheduler": "cosine"}, r"scheduler must be an LR scheduler with step\(\).*got 'cosine'"),
    ({"scaler": object()}, r"scaler must be a torch.amp.GradScaler \(unscale_\(\) and update\(\)\)"),
    ({"process_group": "world"}, r"process_group must be a torch.distributed.ProcessGroup or None.*got 'world'"),
    ({"sinks": "run.jsonl"}, r"sinks must be a list of sinks, got the string 'run.jsonl'"),
])
def test_partners_of_the_step_are_checked_when_the_guard_is_made(kwargs, message):
    """Regression: scheduler="cosine" failed only at the first step; process_group="world" was ignored."""
    model = _model()
    with pytest.raises(ValueError, match=message):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_a_single_sink_not_in_a_list_is_taken_as_a_list_of_one():
    model = _model()
    seen: list = []
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_every=2,
                     sinks=gg.sinks.Callback(seen.append))
    for i in range(2):
        guard.step(_loss(model, i))
        guard.optimizer.zero_grad()
    assert [r["step"] for r in seen] == [0, 1]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_complex_or_integer_losses_are_refused_before_anything_changes(dtype):
    """Regression: a complex loss was accepted."""
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"loss must be a real floating-point tensor, got dtype {dtype}"):
        guard.step(_loss(model, 0, dtype))
    assert guard.step_count == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_second_step_on_the_same_gradients_is_refused(fused, accumulation):
    """Regression: guard.step() twice on the same gradients stepped the optimizer twice."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    guard = gg.Guard(model, optimizer, accumulation_steps=accumulation)
    for i in range(accumulation):
        guard.step(_loss(model, i))
    assert guard.step_count == 1
    before = [p.detach().clone() for p in model.parameters()]
    steps = int(optimizer.state[model[0].weight]["step"])
    with pytest.raises(RuntimeError, match="the gradients are those of the last guarded step"):
        for _ in range(accumulation):
            guard.step()
    assert guard.step_count == 1 and int(optimizer.state[model[0].weight]["step"]) == steps
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # zero_grad(set_to_none=False) then backward, or no zero_grad and another backward: fresh gradients
    optimizer.zero_grad(set_to_none=False)
    for i in range(accumulation):
        guard.step(_loss(model, 10 + i))
    for i in range(accumulation):
        guard.step(_loss(model, 20 + i))  # accumulated onto the last ones: new values, stepped
    optimizer.zero_grad()
    for i in range(accumulation):
        guard.step(_loss(model, 30 + i))
    assert guard.step_count == 4

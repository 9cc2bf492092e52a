"""The Guard's protective defaults: the clip it picks for a model, and the demo's guarded run learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import demo


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_guard_defaults_autoclip_recurrent_models_only() -> None:
    rnn = Recurrent()
    clip = gg.Guard(rnn, sgd(rnn)).clip
    assert type(clip) is gg.clip.AutoClip and clip.percentile == 5.0  # a vanilla recurrence: from step 0
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert gg.Guard(mlp, sgd(mlp)).clip is None
    assert gg.Guard(rnn, sgd(rnn), clip=None).clip is None  # None still means no clip
    zclip = gg.clip.ZClip()
    assert gg.Guard(rnn, sgd(rnn), clip=zclip).clip is zclip


def test_guard_refuses_an_unknown_clip_name() -> None:
    rnn = Recurrent()
    with pytest.raises(ValueError, match="Guard: clip must be a gradguard.clip strategy, \"default\" or None, got 'auto'"):
        gg.Guard(rnn, sgd(rnn), clip="auto")


def test_default_clip_bounds_the_steps_of_an_exploding_rnn() -> None:
    """A step whose gradient is 100x the norms seen so far is clipped to their 5th percentile (the detector's
    own spike clipping set to "log", to see the default clip alone)."""
    torch.manual_seed(0)
    rnn = Recurrent()
    guard = gg.Guard(rnn, torch.optim.SGD(rnn.parameters(), lr=0.0), on_spike="log", log_every=1)
    x, y = torch.randn(8, 5, 3), torch.randn(8, 1)
    for step in range(25):
        loss = nn.functional.mse_loss(rnn(x), y)
        loss.backward()
        if step == 24:
            for p in rnn.parameters():
                p.grad.mul_(100.0)
        guard.step(loss)
        rnn.zero_grad(set_to_none=True)
    first, last = guard.history[0], guard.history[-1]
    assert first["coef"] == pytest.approx(1.0)  # the same gradient every step: the 5th percentile is that norm
    assert last["clipped"] and last["coef"] == pytest.approx(0.01, rel=1e-3)


def test_the_demo_guarded_run_learns_and_the_unguarded_one_does_not(capsys) -> None:
    results = {r.name: r for r in demo.run_demo(steps=300, seed=0)}
    guarded, unguarded = results["gg.Guard(model, opt)"], results["unguarded"]
    assert guarded.final_loss < 0.1 * demo.CHANCE_LOSS and guarded.test_accuracy > 0.95
    assert unguarded.final_loss > 0.9 * demo.CHANCE_LOSS  # stuck at chance: the spikes throw it off
    assert "AutoClip(percentile=5.0" in capsys.readouterr().out

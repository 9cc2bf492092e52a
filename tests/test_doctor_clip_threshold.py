"""gg.suggest_clip_threshold: the average gradient norm of Pascanu et al. 2013."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


def test_threshold_is_the_average_global_norm_over_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    batches = [(torch.randn(4, 5), torch.randn(4, 1)) for _ in range(3)]
    norms = []
    for x, y in batches:
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
    for p in model.parameters():
        p.grad = None
    threshold = gg.suggest_clip_threshold(model, batches, nn.functional.mse_loss, steps=6)  # cycles twice
    assert threshold == pytest.approx(sum(norms) / 3, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    single = gg.suggest_clip_threshold(model, batches[0], nn.functional.mse_loss, steps=2)
    assert single == pytest.approx(norms[0], rel=1e-5)


def test_all_nonfinite_and_bad_steps() -> None:
    model = nn.Linear(2, 1)
    batch = (torch.full((2, 2), float("nan")), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="every gradient norm was NaN or Inf"):
        gg.suggest_clip_threshold(model, batch, nn.functional.mse_loss)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        gg.suggest_clip_threshold(model, batch, nn.functional.mse_loss, steps=0)

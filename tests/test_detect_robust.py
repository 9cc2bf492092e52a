"""The detector's and the clip strategies' statistics are robust to any single step (issue 17, items 1 and 10): a
zero or tiny gradient norm or a spike moves the level and spread by a bounded amount, and a step the Guard
skipped teaches ZClip nothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import Detector


def _stats(model: nn.Module, scale: float, noise: torch.Generator) -> gg.GradStats:
    for p in model.parameters():
        p.grad = scale * (1.0 + 0.1 * torch.randn(p.shape, generator=noise))
    return gg.grad_stats(model)


def _spikes_flagged(zero_at: int | None, low: float = 0.0) -> tuple[int, list[float]]:
    """60 steady steps (a zero-norm step at ``zero_at``, of scale ``low``), then five x1000 spikes 10 steps apart:
    how many spikes are flagged, and the spike threshold at each step."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    noise, detector = torch.Generator().manual_seed(0), Detector()
    flagged, thresholds = 0, []
    for step in range(120):
        spike = step >= 70 and step % 10 == 0
        scale = low if step == zero_at else 1000.0 if spike else 1.0
        verdict = detector.update(_stats(model, scale, noise), loss=torch.tensor(1.0))
        thresholds.append(float(verdict.spike_threshold))
        flagged += spike and bool(verdict.flag("grad_spike"))
    return flagged, thresholds


@pytest.mark.parametrize("low", [0.0, 1e-12, 1e-4])
def test_a_zero_or_tiny_gradient_step_does_not_blind_spike_detection(low: float) -> None:
    without, clean = _spikes_flagged(None)
    with_zero, thresholds = _spikes_flagged(40, low)
    assert without == 5
    assert with_zero == 5, f"a step of norm x{low} at step 40 hid {5 - with_zero} of 5 later x1000 spikes"
    # the threshold after the degenerate step stays within a bounded factor of the one without it
    assert max(abs(math.log(a / b)) for a, b in zip(thresholds[41:70], clean[41:70])) < math.log(3.0)


def test_no_single_step_moves_the_level_and_spread_by_more_than_a_bound() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    for value in (0.0, 1e-30, 1e-10, 1e10, 1e30):
        noise, detector = torch.Generator().manual_seed(1), Detector()
        for _ in range(40):
            detector.update(_stats(model, 1.0, noise))
        mean, std = detector.scores.mean.clone(), detector.scores.std().clone()
        detector.update(_stats(model, value, noise))
        # at most z_thresh * std learned, as a spike teaches its threshold: mean within (1 - alpha) * z * std
        shift = float((detector.scores.mean[0] - mean[0]).abs())
        assert shift <= (1 - detector.alpha) * detector.z_thresh * float(std[0]) + 1e-6, value
        growth = float(detector.scores.std()[0] / std[0])
        assert growth <= math.sqrt(detector.alpha * (1 + (1 - detector.alpha) * detector.z_thresh**2)) + 1e-6, value


@pytest.mark.parametrize("at", [10, 24, 40])  # in the warm-up, at its last step, after it
def test_a_step_the_guard_skips_teaches_zclip_nothing(at: int) -> None:
    """Guard + ZClip: a step skipped for its loss (an LR burst's wrecked weights: norm x300) leaves ZClip's
    statistics as they were (17.10: they learned mu 13 and sigma 57 and the pair ended 1e4x the clean loss)."""
    def run(skip_at: int | None) -> gg.clip.ZClip:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        zclip = gg.clip.ZClip(max_grad_norm=None)
        guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), clip=zclip)
        gen = torch.Generator().manual_seed(0)
        for step in range(max(at + 5, 30)):
            x = torch.randn(32, 4, generator=gen)
            loss = model(x).square().mean() + 1.0
            if step == skip_at:
                loss = loss * 300.0  # a loss spike, with gradients 300x: skipped
            loss.backward()
            guard.step(loss)
            guard.optimizer.zero_grad()
        assert guard.summary()["skipped"] == (skip_at is not None)
        return zclip

    plain, skipped = run(None), run(at)
    assert skipped._mean is not None and plain._mean is not None
    # the skipped step's norm is not in the statistics: they match a run whose step was a plain one to 2x
    assert float(skipped._mean) < 2 * float(plain._mean)
    assert float(skipped._var) < 4 * float(plain._var) + 1e-12


def test_forget_last_restores_zclip_and_autoclip_state_exactly() -> None:
    model = nn.Linear(4, 2)
    for clipper in (gg.clip.ZClip(warmup_steps=3), gg.clip.AutoClip(history=8)):
        for step in range(6):
            for p in model.parameters():
                p.grad = torch.full_like(p, 1.0 + 0.1 * step)
            before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in clipper.state_dict().items()}
            clipper.coefficient(gg.grad_stats(model))
            clipper.forget_last(torch.tensor(True))
            after = clipper.state_dict()
            for key, value in before.items():
                if isinstance(value, torch.Tensor) and isinstance(after[key], torch.Tensor):
                    assert torch.equal(value.nan_to_num(-1.0), after[key].nan_to_num(-1.0)), (clipper, step, key)
            clipper.coefficient(gg.grad_stats(model))  # then learn it for real
            clipper.forget_last(torch.tensor(False))

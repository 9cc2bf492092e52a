"""Detector: spikes, growth, non-finite values and the layer they point at, all on the device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import DETECTOR_KINDS, Detector, MovingZScore, nonfinite_layer


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def _stats_with(model: nn.Module, scales: tuple[float, float], noise: torch.Generator) -> gg.GradStats:
    """Gradients of a fixed direction, layer 0 scaled by scales[0] and layer 2 by scales[1], with noise."""
    for layer, scale in zip((model[0], model[2]), scales):
        for p in layer.parameters():
            p.grad = scale * (1.0 + 0.05 * torch.randn(p.shape, generator=noise))
    return gg.grad_stats(model)


def _flags(verdict) -> dict[str, bool]:
    return {kind: bool(verdict.flags[i]) for i, kind in enumerate(DETECTOR_KINDS)}


def test_moving_zscore_starts_from_the_warmup_reference_then_follows_the_ema():
    # a trend (1..6): the mean at the median of the last values, the variance at that of the successive
    # differences (all 1: (1.4826 / sqrt(2))^2 = 1.099), smaller than the plain one (35 / 12 = 2.92)
    trend = MovingZScore(alpha=0.9, warmup_steps=6, sigma_floor=0.0, warmup_sigma_floor=0.0)
    for x in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        trend.update(torch.tensor(x), torch.tensor(True))
    assert float(trend.mean) == pytest.approx(3.0)  # torch's median of an even count: the lower middle value
    assert float(trend.var) == pytest.approx((1.4826 / math.sqrt(2.0)) ** 2, rel=1e-5)
    # a steady warm-up (1, 2, 3): the plain variance (2/3) is the smaller one
    scorer = MovingZScore(alpha=0.9, warmup_steps=3, sigma_floor=0.0, warmup_sigma_floor=0.0)
    for x in (1.0, 2.0, 3.0):
        assert math.isnan(float(scorer.score(torch.tensor(x))))  # fewer than 3 values: no score yet
        scorer.update(torch.tensor(x), torch.tensor(True))
    var0 = 2.0 / 3.0
    assert float(scorer.mean) == pytest.approx(2.0)
    assert float(scorer.var) == pytest.approx(var0, rel=1e-5)
    assert float(scorer.score(torch.tensor(4.0))) == pytest.approx(2.0 / math.sqrt(var0), rel=1e-5)
    scorer.update(torch.tensor(4.0), torch.tensor(True))
    d = 4.0 - 2.0
    assert float(scorer.mean) == pytest.approx(2.0 + 0.1 * d)
    assert float(scorer.var) == pytest.approx(0.9 * (var0 + 0.1 * d * d), rel=1e-5)
    scorer.update(torch.tensor(math.nan), torch.tensor(False))  # callers never ask to learn a NaN
    assert float(scorer.mean) == pytest.approx(2.2)


def test_grad_spike_is_flagged_after_warmup_only_and_names_the_layer_that_moved():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector(warmup_steps=10)
    early = detector.update(_stats_with(model, (1.0, 1.0), noise))
    for _ in range(20):
        verdict = detector.update(_stats_with(model, (1.0, 1.0), noise))
        assert not any(_flags(verdict).values())
    assert not bool(early.flags.any())
    spike = detector.update(_stats_with(model, (1.0, 50.0), noise))
    assert _flags(spike)["grad_spike"] and not _flags(spike)["nonfinite_grad"]
    assert int(spike.layer) == 1  # "2", the layer whose norm jumped, not "0"
    assert float(spike.spike_threshold) < float(gg.grad_stats(model).total_norm)
    assert float(spike.grad_z) > detector.z_thresh


@pytest.mark.parametrize("position", [3, 5, 20])
def test_a_spike_during_warmup_is_flagged_from_the_fourth_step(position):
    """Regression (issue 10 point 2): the first warmup_steps steps were blind; a 1e4 spike there was learned."""
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector()  # warmup_steps=25
    for step in range(position):
        verdict = detector.update(_stats_with(model, (1.0, 1.0), noise), loss=torch.tensor(1.0 + 0.01 * step))
        assert not bool(verdict.flags.any()), step
    spike = detector.update(_stats_with(model, (1e4, 1e4), noise), loss=torch.tensor(1e4))
    assert _flags(spike)["grad_spike"] and _flags(spike)["loss_spike"]
    assert float(spike.spike_threshold) < 1e-2 * float(gg.grad_stats(model).total_norm)
    assert float(spike.grad_z) > detector.z_thresh
    after = detector.update(_stats_with(model, (1.0, 1.0), noise), loss=torch.tensor(1.0))
    assert not bool(after.flags.any())  # the spike was not learned as the new normal
    again = detector.update(_stats_with(model, (1e4, 1e4), noise), loss=torch.tensor(1e4))
    assert _flags(again)["grad_spike"] and _flags(again)["loss_spike"]


def test_warmup_does_not_flag_the_first_three_steps_nor_an_ordinary_early_drift():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector()
    for step, scale in enumerate((1.0, 1e3, 1e-3, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0)):
        verdict = detector.update(_stats_with(model, (scale, scale), noise))
        if step < 3:  # fewer than three norms: nothing to score against
            assert math.isnan(float(verdict.grad_z)) and not bool(verdict.flags.any())
    assert not _flags(verdict)["grad_spike"]


def test_nonfinite_gradient_and_loss_are_flagged_and_the_first_nonfinite_layer_is_named():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector()
    _stats_with(model, (1.0, 1.0), noise)
    model[2].bias.grad[0] = math.nan
    model[2].weight.grad[0, 0] = math.inf
    verdict = detector.update(gg.grad_stats(model), loss=torch.tensor(math.inf))
    flags = _flags(verdict)
    assert flags["nonfinite_grad"] and flags["nonfinite_loss"]
    assert not flags["grad_spike"] and not flags["growth"]
    assert int(verdict.layer) == 1
    assert detector.scores.calls == 1 and detector.scores._seen is not None
    assert math.isnan(float(detector.scores._seen[0, 0]))  # the non-finite norm was not learned


def test_loss_spike():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector(warmup_steps=10)
    losses = torch.Generator().manual_seed(1)
    for _ in range(30):
        loss = 1.0 + 0.05 * torch.rand((), generator=losses)
        assert not _flags(detector.update(_stats_with(model, (1.0, 1.0), noise), loss))["loss_spike"]
    verdict = detector.update(_stats_with(model, (1.0, 1.0), noise), torch.tensor(1e4))
    assert _flags(verdict)["loss_spike"] and not _flags(verdict)["grad_spike"]


def test_sustained_growth_is_flagged_before_the_norm_is_a_spike():
    model, noise = _model(), torch.Generator().manual_seed(0)
    detector = Detector(warmup_steps=10, growth_window=5, growth_factor=1.2, z_thresh=100.0)
    for _ in range(15):
        verdict = detector.update(_stats_with(model, (1.0, 1.0), noise))
        assert not _flags(verdict)["growth"]
    seen = []
    for k in range(1, 9):
        verdict = detector.update(_stats_with(model, (1.3**k, 1.3**k), noise))
        seen.append(_flags(verdict)["growth"])
    # a window of 5 steps needs at least 4 rising steps (and a 5th one, unless noise made it rise)
    assert seen[:3] == [False] * 3 and seen[4:] == [True] * 4
    assert float(verdict.growth_rate) == pytest.approx(1.3, rel=0.05)


def test_noisy_flat_norms_raise_no_growth():
    model, noise = _model(), torch.Generator().manual_seed(0)
    detector = Detector(warmup_steps=10)  # default window (6 steps) and factor (1.5 per step)
    sizes = torch.Generator().manual_seed(2)
    for _ in range(200):
        scale = float(torch.exp(0.3 * torch.randn((), generator=sizes)))
        assert not _flags(detector.update(_stats_with(model, (scale, scale), noise)))["growth"]


def test_detector_makes_no_host_sync():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector(warmup_steps=3)
    stats = [_stats_with(model, (1.0, float(s)), noise) for s in (1, 1, 1, 1, 100)]
    with gg.count_host_syncs() as syncs:
        for s in stats:
            detector.update(s, loss=torch.tensor(1.0))
    assert syncs.count == 0


def test_state_dict_resumes_the_same_verdicts():
    model, noise = _model(), torch.Generator().manual_seed(0)
    stats = [_stats_with(model, (1.0, 1.2**k), noise) for k in range(40)]
    a = Detector(warmup_steps=5)
    for s in stats[:20]:
        a.update(s)
    b = Detector(warmup_steps=5)
    b.load_state_dict(a.state_dict())
    for s in stats[20:]:
        va, vb = a.update(s), b.update(s)
        assert torch.equal(va.flags, vb.flags) and torch.equal(va.grad_z, vb.grad_z)


def test_nonfinite_layer_finds_the_first_bad_weight():
    model = _model()
    named = list(model.named_parameters())
    assert int(nonfinite_layer(named)) == -1
    with torch.no_grad():
        model[2].bias[1] = math.nan
    assert named[int(nonfinite_layer(named))][0] == "2.bias"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"z_thresh": -1.0}, "z_thresh"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"growth_window": 1}, "growth_window"),
        ({"growth_factor": 0.9}, "growth_factor"),
        ({"sigma_floor": -0.1}, "sigma_floor"),
    ],
)
def test_bad_detector_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        Detector(**kwargs)


def test_a_warmup_without_a_finite_norm_starts_from_the_first_finite_one():
    model, noise, detector = _model(), torch.Generator().manual_seed(0), Detector(warmup_steps=3)
    for _ in range(3):
        _stats_with(model, (1.0, 1.0), noise)
        model[0].bias.grad[0] = math.nan
        assert _flags(detector.update(gg.grad_stats(model)))["nonfinite_grad"]
    first = detector.update(_stats_with(model, (1.0, 1.0), noise))  # nothing learned yet: no spike
    assert not bool(first.flags.any()) and math.isnan(float(first.grad_z))
    for _ in range(10):
        verdict = detector.update(_stats_with(model, (1.0, 1.0), noise))
        assert not bool(verdict.flags.any()) and math.isfinite(float(verdict.grad_z))
    assert _flags(detector.update(_stats_with(model, (1.0, 100.0), noise)))["grad_spike"]

"""decide(): the Guard's decision as a pure function of device tensors (no optimizer, no gradients), and the
records that say what was done (one action per step, a skip wins over a clip)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.decide import ACTIONS, Responses, decide
from gradguard.detect import STEP_KINDS, Verdict, kinds_of


def _verdict(*kinds: str, threshold: float = 2.0, level: float = 1.0) -> Verdict:
    flags = torch.tensor([k in kinds for k in STEP_KINDS])
    zero = torch.zeros(())
    return Verdict(flags=flags, grad_z=zero, loss_z=zero, spike_threshold=torch.tensor(threshold),
                   norm_level=torch.tensor(level), growth_rate=torch.ones(()), layer=torch.zeros((), dtype=torch.long),
                   precursor_signal=torch.zeros((), dtype=torch.long), precursor_factor=torch.ones(()))


def _actions(decision) -> dict[str, str]:
    return {k: ACTIONS[a - 1] for k, a in zip(STEP_KINDS, decision.actions.tolist()) if a}


def _decide(*kinds: str, total: float = 10.0, clip_coef: float | None = None, **options):
    responses = Responses.resolve(**options)
    finite = torch.tensor(math.isfinite(total))
    coef = None if clip_coef is None else torch.tensor(clip_coef)
    return decide(torch.tensor(total), finite, _verdict(*kinds), coef, responses)


def test_a_quiet_step_steps_unclipped():
    decision = _decide()
    assert not bool(decision.skip) and float(decision.coef) == 1.0 and _actions(decision) == {}


def test_a_clipped_spike_is_scaled_to_the_detector_threshold():
    decision = _decide("grad_spike", total=10.0)
    assert not bool(decision.skip)
    assert float(decision.coef) == pytest.approx(2.0 / (10.0 + 1e-6))
    assert _actions(decision) == {"grad_spike": "clip"}


def test_growth_is_clipped_to_the_norm_level_and_the_least_limit_wins():
    decision = _decide("grad_spike", "growth", total=10.0)
    assert float(decision.coef) == pytest.approx(1.0 / (10.0 + 1e-6))  # level 1 < threshold 2
    decision = _decide("grad_spike", total=10.0, clip_coef=0.05)
    assert float(decision.coef) == pytest.approx(0.05)  # the clip strategy's own coefficient is lower


def test_a_skip_wins_over_a_clip_coef_one_and_every_event_says_skip():
    decision = _decide("grad_spike", "loss_spike", total=10.0, clip_coef=0.1)
    assert bool(decision.skip) and float(decision.coef) == 1.0
    assert _actions(decision) == {"grad_spike": "skip", "loss_spike": "skip"}


def test_log_responses_change_nothing_and_nonfinite_gradients_skip():
    decision = _decide("grad_spike", "loss_spike", on_spike="log", on_loss_spike="log")
    assert not bool(decision.skip) and float(decision.coef) == 1.0
    assert _actions(decision) == {"grad_spike": "log", "loss_spike": "log"}
    decision = _decide("nonfinite_grad", total=math.nan, clip_coef=1.0)
    assert bool(decision.skip) and float(decision.coef) == 1.0
    assert _actions(decision) == {"nonfinite_grad": "skip"}
    decision = _decide("nonfinite_grad", total=math.inf, responses={"nonfinite_grad": "rollback"})
    assert bool(decision.skip) and _actions(decision) == {"nonfinite_grad": "rollback"}


def test_a_nan_threshold_sets_no_limit():
    responses = Responses.resolve()
    verdict = _verdict("grad_spike", threshold=math.nan)
    decision = decide(torch.tensor(10.0), torch.tensor(True), verdict, None, responses)
    assert float(decision.coef) == 1.0


def test_kinds_of_decodes_the_flag_bits_in_step_kinds_order():
    assert kinds_of(0) == []
    assert kinds_of(0b10101) == ["nonfinite_grad", "grad_spike", "growth"]
    assert kinds_of(sum(1 << i for i in range(len(STEP_KINDS)))) == list(STEP_KINDS)


def test_a_step_skipped_for_a_loss_spike_is_recorded_as_skipped_not_clipped():
    """Regression (issue 10 point 5): the gradient spike of a step skipped for its loss spike was recorded
    with action "clip" and a coef < 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, detector=gg.detect.Detector(warmup_steps=5), log_every=50)
    for i in range(12):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 6, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1]) * (30.0 if i == 10 else 1.0)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    guard.close()
    spike = guard.history[10]
    assert {e["kind"] for e in spike["events"]} == {"grad_spike", "loss_spike"}
    assert spike["skipped"] and spike["action"] == "skip"
    assert spike["coef"] == 1.0 and not spike["clipped"]
    assert [e["action"] for e in spike["events"]] == ["skip", "skip"]
    for r in guard.history:
        assert r["action"] == ("skip" if r["skipped"] else "clip" if r["clipped"] else "step")
        assert not (r["skipped"] and r["clipped"]) and (r["coef"] == 1.0 or not r["skipped"])

"""LR back-off earned and undone (issue 17 point 3): harmless skips (a NaN batch on a healthy run, a
GradScaler overflow) never cut the LR; a cut the weights earned grows back after healthy real steps,
counted across interleaved skips. benchmarks/lr_ratchet.py runs the 1000-step versions."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.recover import Action, EscalationCounts, Evidence, escalate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lr_ratchet  # noqa: E402


@pytest.mark.parametrize("kind", ["nan_every_10th", "fp16_scaler"])
def test_harmless_skips_never_ratchet_the_lr_down(kind):
    """Regression: one NaN-gradient batch in 10 (loss healthy) cut the LR 0.05 -> 4.8e-8 in 1000 steps;
    fp16 with GradScaler(growth_interval=5) cut it to 0.003 while the scaler alone kept 0.05."""
    result = lr_ratchet.run(kind, steps=300)
    assert result["skipped"] >= 25  # the faults happened and were skipped
    assert result["lr_backoffs"] == 0 and result["rollbacks"] == 0 and result["lr_ratio"] == 1.0
    # and they do not stop snapshots (before: the snapshot of step 0 was the only one, the whole run long)
    assert result["snapshot_step"] >= 300 - 50


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def test_an_earned_cut_is_undone_after_healthy_real_steps_counted_across_skips():
    """Regression: every back-off reset the count of real steps, and skips kept calling for back-offs, so a
    cut was never undone on a run with regular harmless skips."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, optimizer, recovery=gg.RecoveryPolicy(lr_recover_after=30))
    lrs = []
    for i in range(200):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
        loss = nn.functional.mse_loss(model(x), x[:, :1].sin())
        if 40 <= i < 45:
            loss = loss * math.nan  # five NaN losses in a row: the weights in doubt, a back-off
        loss.backward()
        if i >= 45 and i % 7 == 0:
            model[0].weight.grad[0, 0] = math.nan  # a harmless skip every 7th step from then on
        guard.step(loss)
        optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
    guard.close()
    assert guard.summary()["lr_backoffs"] == 1 and lrs[44] == pytest.approx(0.025)
    recovered = [r["step"] for r in guard.history for e in r["events"] if e["kind"] == "lr_recover"]
    assert len(recovered) == 1 and recovered[0] < 45 + 40  # 30 real steps, with ~5 skips among them
    assert lrs[-1] == 0.05


def test_escalate_is_a_pure_rule_of_counts_and_evidence():
    policy = gg.RecoveryPolicy(backoff_after=2, rollback_after=3, skip_window=10, lr_recover_after=4,
                               max_skip_streak=5)
    quiet = EscalationCounts(suspect=0, skip_streak=0, last_backoff=None, lr_scale=1.0, real_steps_at_scale=0)
    assert escalate(policy, quiet, Evidence(step=3, skipped=True, sound=True)) is Action.NONE
    assert escalate(policy, quiet._replace(suspect=1), Evidence(3, True, False)) is Action.LR_BACKOFF
    assert escalate(policy, quiet._replace(suspect=1, last_backoff=0), Evidence(3, True, False)) is Action.NONE
    assert escalate(policy, quiet._replace(suspect=2), Evidence(3, True, False)) is Action.ROLLBACK
    assert escalate(policy, quiet._replace(skip_streak=4), Evidence(3, True, True)) is Action.STALL
    cut = quiet._replace(lr_scale=0.5, real_steps_at_scale=3)
    assert escalate(policy, cut, Evidence(3, False, True)) is Action.LR_RECOVER
    assert escalate(policy, quiet._replace(real_steps_at_scale=3), Evidence(3, False, True)) is Action.NONE


def test_recovery_names_its_state_through_a_back_off_and_a_rollback():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=gg.RecoveryPolicy(
        lr_recover_after=10, snapshot_every=5, snapshot_clean_steps=3))
    seen = []
    for i in range(60):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
        loss = nn.functional.mse_loss(model(x), x[:, :1].sin())
        if 10 <= i < 15:
            loss = loss * math.nan
        loss.backward()
        if i == 33:  # a spike (clipped: a real step with an event), then NaN weights: the update is blamed, a cut
            for p in model.parameters():
                p.grad.mul_(1e3)
        guard.step(loss)
        optimizer.zero_grad()
        if i == 33:
            with torch.no_grad():
                model[0].bias.fill_(math.nan)
        seen.append(guard.recovery.phase.value)
    order = [state for k, state in enumerate(seen) if k == 0 or seen[k - 1] != state]
    # the rollback's restored state proves healthy with the LR still cut: backing off until it grows back
    # (before: "healthy" at a cut LR, which its docstring says is the user's)
    assert order == ["healthy", "backing_off", "recovered", "healthy", "rolling_back", "backing_off", "recovered",
                     "healthy"]
    events = [e for r in guard.history for e in r["events"] if e["kind"] in ("lr_backoff", "rollback")]
    assert [e["state"] for e in events] == ["backing_off", "rolling_back"]
    assert guard.state_dict()["recovery"]["state"] == "healthy"


def test_diverged_is_final():
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.05), responses={"nonfinite_grad": "raise"})
    x = torch.randn(16, 6)
    loss = nn.functional.mse_loss(model(x), x[:, :1]) * math.nan
    loss.backward()
    with pytest.raises(gg.TrainingDiverged):
        guard.step(loss)
    assert guard.recovery.phase.value == "diverged"
    with pytest.raises(RuntimeError, match="no transition out of 'diverged' \\(on 'lr_backoff'\\)"):
        guard.recovery._enter(gg.recover.Trigger.LR_BACKOFF)

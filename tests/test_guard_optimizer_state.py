"""The optimizer state is part of "good": NaN/Inf there is found at the flush, never enters a snapshot,
and is rolled back like NaN weights; parameters the optimizer holds outside the model are measured,
checked and restored with it (issue 17 point 4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        self.main = nn.Linear(16, 1)
        self.idle = nn.Linear(16, 1)  # gets a gradient only now and then

    def forward(self, x: torch.Tensor, use_idle: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = self.main(h)
        return out + self.idle(h) if use_idle else out


def _loss(model: _TwoHeads, i: int, use_idle: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=g)
    loss = nn.functional.mse_loss(model(x, use_idle), torch.sin(x[:, :1]))
    loss.backward()
    return loss


def _all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    tensors = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values()
                                           if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_in_an_idle_heads_adam_state_is_rolled_back_and_never_snapshotted(fused, value):
    """Regression: NaN in Adam's exp_avg_sq of an idle head entered a "good" snapshot (8 rollbacks to the
    poisoned step, then TrainingDiverged with NaN in the optimizer); Inf there was never noticed."""
    model = _TwoHeads()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    policy = gg.RecoveryPolicy(snapshot_every=5, snapshot_clean_steps=3)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=policy)
    for i in range(12):
        guard.step(_loss(model, i, use_idle=i == 0))  # the idle head has Adam state from step 0
        optimizer.zero_grad(set_to_none=True)
    optimizer.state[model.idle.weight]["exp_avg_sq"][0, 3] = value  # idle: no gradient touches it
    for i in range(12, 40):
        guard.step(_loss(model, i))
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    rollbacks = [e for r in guard.history for e in r["events"] if e["kind"] == "nonfinite_param"]
    assert len(rollbacks) == 1 and rollbacks[0]["layer"] == "idle.weight (optimizer state 'exp_avg_sq')"
    assert guard.summary()["rollbacks"] == 1 and guard.recovery.snapshot.step is not None
    assert _all_finite(model, optimizer)
    snapshot = guard.recovery.snapshot.load()
    assert all(bool(torch.isfinite(v).all()) for s in snapshot["optimizer"]["state"].values()
               for v in s.values() if v.is_floating_point())


def test_nan_in_an_idle_heads_state_never_ends_in_training_diverged_with_nan_in_the_optimizer():
    """Regression: the poisoned state was snapshotted while the head was idle; once the head got gradients
    again every rollback restored the NaN, and TrainingDiverged left NaN in the optimizer state."""
    model = _TwoHeads()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=gg.RecoveryPolicy(max_rollbacks=2, snapshot_every=5,
                                                                                snapshot_clean_steps=3))
    try:
        for i in range(60):
            guard.step(_loss(model, i, use_idle=i < 2 or i >= 35))
            optimizer.zero_grad(set_to_none=True)
            if i == 12:
                optimizer.state[model.idle.bias]["exp_avg_sq"].fill_(math.nan)
    except gg.TrainingDiverged:
        pass
    assert _all_finite(model, optimizer)


def test_a_snapshot_candidate_with_nan_in_its_optimizer_state_is_never_kept():
    """The candidate is captured as the last step before a flush begins; its optimizer state went NaN (an
    idle head) while the live state was put right by that very step: the flush keeps no such snapshot."""
    model = _TwoHeads()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=gg.RecoveryPolicy(snapshot_every=5,
                                                                                snapshot_clean_steps=2))
    for i in range(9):
        guard.step(_loss(model, i, use_idle=i == 0))
        optimizer.zero_grad(set_to_none=True)
    state = optimizer.state[model.idle.weight]["exp_avg"]
    state.fill_(math.nan)
    guard.recovery.start(guard.step_count, before_flush=True)  # the candidate, as step 9 will take it
    state.zero_()
    before = guard.recovery.snapshot.step
    guard.recovery.start = lambda *args, **kwargs: None  # type: ignore[method-assign]
    guard.step(_loss(model, 9))
    assert before == 4 and guard.recovery.snapshot.step == 4  # not 9: the candidate was refused


class _UncertaintyWeighted(nn.Module):
    """Kendall et al. 2018's learned task weights, held by the optimizer but not by the model."""

    def __init__(self) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(()))


def test_a_parameter_held_by_the_optimizer_outside_the_model_is_measured_checked_and_restored():
    """Regression: a learnable loss weight outside the model stayed NaN through 8 rollbacks, no exception."""
    model = _TwoHeads()
    weighting = _UncertaintyWeighted()
    optimizer = torch.optim.SGD(list(model.parameters()) + list(weighting.parameters()), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=5, layer_every=1)
    for i in range(30):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(16, 6, generator=g)
        mse = nn.functional.mse_loss(model(x, False), torch.sin(x[:, :1]))
        loss = torch.exp(-weighting.log_var) * mse + weighting.log_var
        loss.backward()
        if i == 12:
            weighting.log_var.grad.fill_(math.nan)  # measured: skipped, named
        guard.step(loss)
        optimizer.zero_grad()
        if i == 21:
            with torch.no_grad():
                weighting.log_var.fill_(math.nan)  # checked at step 22's NaN loss: rolled back, restored
    guard.close()
    events = {r["step"]: r["events"] for r in guard.history}
    assert [(e["kind"], e["layer"]) for e in events[12]] == [("nonfinite_grad", "optimizer[0][6]")]
    assert any(e["kind"] == "nonfinite_param" and e["layer"] == "optimizer[0][6]" for e in events[22])
    assert guard.summary()["rollbacks"] == 1 and math.isfinite(float(weighting.log_var))
    assert "optimizer[0][6]" in guard.history[0]["layer_norms"]

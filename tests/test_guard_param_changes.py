"""Parameters that change mid-run (issue 17 point 7): add_param_group (gradual unfreezing) and modules
added after the Guard is built are noticed by a host-side check, measured from then on and in the next
snapshot; a rollback after the change leaves model and optimizer consistent."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 1)
        self.extra: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        return out if self.extra is None else out + self.extra(h)


def _step(guard: gg.Guard, model: _Net, i: int, nan_in: nn.Parameter | None = None) -> None:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
    loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
    loss.backward()
    if nan_in is not None:
        nan_in.grad[0] = math.nan
    guard.step(loss)
    guard.optimizer.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_after_add_param_group_a_rollback_is_consistent(fused):
    """Regression: after add_param_group (gradual unfreezing) a rollback raised a raw ValueError with the
    model restored and the optimizer not."""
    model = _Net()
    model.body.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, optimizer, log_every=5, recovery=gg.RecoveryPolicy(snapshot_every=5,
                                                                                snapshot_clean_steps=3))
    for i in range(12):
        _step(guard, model, i)
    model.body.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.body.parameters()), "lr": 1e-3})  # unfreeze
    _step(guard, model, 12)
    with torch.no_grad():
        model.body.weight[0, 0] = math.nan  # before any snapshot after the change: found at the flush after 14
    for i in range(13, 25):
        _step(guard, model, i)
    guard.close()
    rollbacks = [e for r in guard.history for e in r["events"] if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] == 12  # the state as the new parameters came in
    assert [e["kind"] for e in guard.history[12]["events"]][:1] == ["params_changed"]
    assert len(optimizer.param_groups) == 2 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(bool(torch.isfinite(v).all()) for s in optimizer.state.values() for v in s.values())
    assert optimizer.state[model.body.weight]  # the unfrozen weights train on after the rollback


def test_a_module_added_after_the_guard_is_built_is_measured():
    """Regression: a module added after the Guard was built was never measured, so its NaN gradient
    reached the weights."""
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=5, layer_every=1)
    for i in range(6):
        _step(guard, model, i)
    torch.manual_seed(1)
    model.extra = nn.Linear(16, 1)
    optimizer.add_param_group({"params": list(model.extra.parameters())})
    for i in range(6, 9):
        _step(guard, model, i)
    before = model.extra.weight.detach().clone()
    _step(guard, model, 9, nan_in=model.extra.weight)
    assert guard.last_step_skipped and torch.equal(model.extra.weight, before)
    guard.close()
    assert [(e["kind"], e["layer"]) for e in guard.history[9]["events"]] == [("nonfinite_grad", "extra")]
    assert "extra" in guard.history[8]["layer_norms"]


def test_a_group_added_during_an_lr_cut_takes_the_cut_and_grows_back_to_its_own_lr():
    """Regression: a group added with add_param_group while the LR was cut came in at its full LR and each
    growth of the scale raised it further: 2x its own LR once the cut was undone."""
    model = _Net()
    model.head.requires_grad_(False)
    optimizer = torch.optim.SGD(model.body.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, recovery=gg.RecoveryPolicy(lr_recover_after=20))
    for i in range(60):
        _step(guard, model, i)
    for i in range(60, 66):  # NaN losses in a row: the weights in doubt, a back-off
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
        loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1])) * math.nan
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    assert guard.recovery.lr_scale == 0.5 and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    model.head.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.head.parameters()), "lr": 0.2})  # unfreeze the head
    _step(guard, model, 66)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)  # the cut in force applies to it
    for i in range(67, 120):
        _step(guard, model, i)
    assert guard.recovery.lr_scale == 1.0
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2])

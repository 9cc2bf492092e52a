"""Fault injection on a real regression task (sklearn's diabetes data, a small ReLU MLP).

Faults, all in one run: NaN/Inf gradients at six random steps, one batch whose inputs are scaled by 1e4,
and a learning rate 100x too high for 20 steps. Without the Guard the run ends with NaN weights; with the
default Guard it ends finite, with a final training loss within 10% of the same run without faults.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import gradguard as gg

STEPS = 400
BATCH_FAULT = STEPS // 3  # inputs x 1e4
LR_FAULT = range(STEPS // 2, STEPS // 2 + 20)  # learning rate x 100
GRAD_FAULTS = sorted(np.random.default_rng(2).choice(np.arange(20, STEPS - 20), size=6, replace=False).tolist())


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32)[:, None]
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
}


def _train(data, optimizer_name: str, guarded: bool, faults: bool) -> tuple[float, nn.Module, gg.Guard | None]:
    x_all, y_all = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    guard = gg.Guard(model, optimizer) if guarded else None
    batches = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        index = torch.randint(0, len(x_all), (32,), generator=batches)
        x, y = x_all[index], y_all[index]
        if faults and step == BATCH_FAULT:
            x = x * 1e4
        if faults and step == LR_FAULT.start:
            for group in optimizer.param_groups:
                group["lr"] *= 100
        if faults and step == LR_FAULT.stop:
            for group in optimizer.param_groups:
                group["lr"] /= 100
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if faults and step in GRAD_FAULTS:
            model[0].weight.grad[3, 5] = math.nan if step % 2 else math.inf
        if guard is not None:
            guard.step(loss)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if guard is not None:
        guard.close()
    with torch.no_grad():
        final_loss = nn.functional.mse_loss(model(x_all), y_all).item()
    return final_loss, model, guard


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_default_guard_survives_the_faults_and_ends_near_the_clean_run(data, optimizer_name):
    clean_loss, _, _ = _train(data, optimizer_name, guarded=False, faults=False)
    unguarded_loss, unguarded, _ = _train(data, optimizer_name, guarded=False, faults=True)
    guarded_loss, guarded, guard = _train(data, optimizer_name, guarded=True, faults=True)

    assert not math.isfinite(unguarded_loss)
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())

    assert all(torch.isfinite(p).all() for p in guarded.parameters())
    assert abs(guarded_loss - clean_loss) <= 0.10 * clean_loss, (guarded_loss, clean_loss)
    assert guard is not None
    summary = guard.summary()
    assert summary["skipped"] >= len(GRAD_FAULTS) + 1  # every bad gradient and the 1e4 batch
    # the 100x learning rate is caught at its first step, before it moves anything (gradguard.update_size), and
    # each of its steps is skipped: nothing to roll back
    by_step = {r["step"]: r for r in guard.history}
    assert all(by_step[s]["skipped"] and "update_jump" in {e["kind"] for e in by_step[s]["events"]}
               for s in LR_FAULT)
    assert not by_step[LR_FAULT.start - 1]["skipped"] and summary["rollbacks"] == 0
    kinds = {e["kind"] for r in guard.history for e in r["events"]}
    assert {"nonfinite_grad", "update_jump"} <= kinds


def test_the_guard_leaves_a_healthy_run_unchanged(data):
    clean_loss, clean, _ = _train(data, "adam", guarded=False, faults=False)
    guarded_loss, guarded, guard = _train(data, "adam", guarded=True, faults=False)
    assert guard is not None and guard.summary()["skipped"] == 0
    for a, b in zip(clean.parameters(), guarded.parameters()):
        assert torch.equal(a, b)

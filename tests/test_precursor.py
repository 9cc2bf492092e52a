"""gg.precursor.Precursor: flags a climb of the gradient norm off its floor, not noise nor slow drift; no host
sync per step."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg


def run(norms: list[float], **options) -> gg.precursor.Precursor:
    precursor = gg.precursor.Precursor(**options)
    for value in norms:
        precursor.update(torch.tensor(value))
    return precursor


def noisy(steps: int, seed: int = 0, level: float = 1.0, sigma: float = 0.3) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (level * torch.exp(sigma * torch.randn(steps, generator=generator))).tolist()


def test_noise_and_slow_drift_raise_nothing() -> None:
    for seed in range(3):
        assert run(noisy(500, seed)).first_warning() is None
    drift = [v * 2.0 ** (step / 200) for step, v in enumerate(noisy(800))]  # doubling every 200 steps
    assert run(drift).first_warning() is None
    falling = [v * 10.0 ** (-step / 100) for step, v in enumerate(noisy(300))]
    assert run(falling).first_warning() is None


def test_a_climb_is_flagged_while_it_climbs() -> None:
    norms = noisy(100)
    climb = [v * 10.0 ** (step / 20) for step, v in enumerate(noisy(40, seed=1))]  # x10 in 20 steps
    precursor = gg.precursor.Precursor()
    raised = [bool(precursor.update(torch.tensor(v))) for v in norms + climb]
    assert precursor.first_warning() is not None and 100 < precursor.first_warning() < 125
    assert float(precursor.signal()) > math.log(4.0) and bool(precursor.above)
    assert raised.index(True) == precursor.first_warning() and sum(raised) == 1  # one warning per climb


def test_warm_up_and_nonfinite_norms_are_not_learned() -> None:
    early = [100.0, 50.0, 10.0, 1.0] + [1.0] * 16  # the first steps move the norm on their own
    assert run(early + noisy(100)).first_warning() is None
    precursor = run(noisy(100))
    smoothed = precursor.smoothed.clone()
    precursor.update(torch.tensor(math.nan))
    precursor.update(torch.tensor(math.inf))
    assert torch.equal(precursor.smoothed, smoothed)
    assert precursor.first_warning() is None


def test_update_reads_nothing_on_the_host() -> None:
    precursor = run(noisy(30))
    norms = torch.tensor(noisy(20))
    with gg.count_host_syncs() as counter:
        for value in norms:
            precursor.update(value)
    assert counter.count == 0, counter.reads


def test_state_dict_round_trip_and_errors() -> None:
    norms = noisy(150)
    whole = run(norms + [v * 10.0 ** (s / 20) for s, v in enumerate(noisy(40, 1))])
    half = run(norms)
    resumed = gg.precursor.Precursor()
    resumed.load_state_dict(half.state_dict())
    for s, v in enumerate(noisy(40, 1)):
        resumed.update(torch.tensor(v * 10.0 ** (s / 20)))
    assert resumed.first_warning() == whole.first_warning()
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"steps": 3})
    for bad in ({"ratio": 1.0}, {"alpha": 1.0}, {"warmup_steps": 0}, {"rate": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gg.precursor.Precursor(**bad)


def _climbing_run(responses: dict[str, str] | None = None) -> gg.Guard:
    """A linear model whose loss (and so gradient) is scaled up x10 over 20 steps after 80 steady ones."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    guard = gg.Guard(model, optimizer, on_spike="log", on_loss_spike="log",
                     responses={"growth": "log", **(responses or {})}, log_every=10)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for step in range(110):
        scale = 1.0 if step < 80 else 10.0 ** ((step - 80) / 20)
        loss = torch.nn.functional.mse_loss(model(x), y) * scale
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.flush()
    return guard


def test_the_guard_raises_a_precursor_event_once_per_climb_logged_by_default() -> None:
    guard = _climbing_run()
    events = [e for record in guard.history for e in record["events"] if e["kind"] == "precursor"]
    assert len(events) == 1 and 80 < events[0]["step"] < 110
    assert events[0]["action"] == "log" and events[0]["total_norm"] > 0
    record = next(r for r in guard.history if r["step"] == events[0]["step"])
    assert not record["skipped"]
    skipping = _climbing_run({"precursor": "skip"})
    assert next(r for r in skipping.history if r["step"] == events[0]["step"])["skipped"]
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"responses\['precursor'\]"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), responses={"precursor": "clip"})

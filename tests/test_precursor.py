"""gg.precursor.Precursor: flags a climb of the gradient norm off its floor, not noise nor slow drift, and weights
that grow several-fold between two samples; no host sync per step."""

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
    for bad in ({"ratio": 1.0}, {"alpha": 1.0}, {"warmup_steps": 0}, {"rate": -1.0}, {"weight_ratio": 1.0},
                {"weight_every": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gg.precursor.Precursor(**bad)


def run_with_weights(norms: list[float], weights: list[float], **options) -> tuple[gg.precursor.Precursor, list[bool]]:
    """Feed the gradient norms, and the weight norm ``weights[step]`` on the steps the precursor samples it."""
    precursor = gg.precursor.Precursor(**options)
    raised = []
    for step, value in enumerate(norms):
        weight = torch.tensor(weights[step]) if precursor.wants_weights() else None
        raised.append(bool(precursor.update(torch.tensor(value), weight)))
    return precursor, raised


def test_weights_growing_past_weight_ratio_between_samples_warn_at_the_sample() -> None:
    norms = noisy(100)  # a quiet gradient norm: only the weights can warn
    steady = [10.0 * 1.03 ** (step / 10) for step in range(100)]  # 3% per sample: a healthy drift
    assert run_with_weights(norms, steady)[0].first_warning() is None
    fast = [10.0 * (3.0 ** (step / 10) if step < 40 else 3.0 ** 4) for step in range(100)]  # x3 per 10 steps
    precursor, raised = run_with_weights(norms, fast)
    assert precursor.first_warning() == 10  # the first sample that can compare, inside the gradient warm-up
    assert raised.index(True) == 10 and sum(raised) == 1  # once per climb, while it lasts
    assert not bool(precursor.above)  # the growth stopped at step 40: the signal fell back
    assert run_with_weights(norms, fast, weight_ratio=None)[0].first_warning() is None
    assert run_with_weights(norms, fast, weight_ratio=4.0)[0].first_warning() is None
    assert run_with_weights(norms, fast, weight_every=20)[0].first_warning() == 20  # x9 in 20 steps


def test_weight_norm_is_the_global_norm_and_the_weight_signal_reads_nothing_on_the_host() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    expected = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(gg.precursor.weight_norm(model.parameters()), expected)
    with pytest.raises(ValueError, match="params is empty"):
        gg.precursor.weight_norm([])
    precursor, _ = run_with_weights(noisy(30), [1.0] * 30)
    norms = torch.tensor(noisy(20))
    with gg.count_host_syncs() as counter:
        for value in norms:
            weights = gg.precursor.weight_norm(model.parameters()) if precursor.wants_weights() else None
            precursor.update(value, weights)
    assert counter.count == 0, counter.reads


def test_state_dict_keeps_the_last_weight_sample() -> None:
    norms, weights = noisy(60), [10.0] * 30 + [40.0] * 30
    whole, _ = run_with_weights(norms, weights)
    half, _ = run_with_weights(norms[:25], weights)
    resumed = gg.precursor.Precursor()
    resumed.load_state_dict(half.state_dict())
    for step in range(25, 60):
        resumed.update(torch.tensor(norms[step]), torch.tensor(weights[step]) if resumed.wants_weights() else None)
    assert resumed.first_warning() == whole.first_warning() == 30


def test_the_guard_warns_when_the_weights_grow_fast() -> None:
    """Adam at a learning rate far above the weights' scale multiplies them within ten steps: warned at step 10."""
    def first_precursor(lr: float) -> int | None:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 1)
        torch.nn.init.normal_(model.weight, std=0.01)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        guard = gg.Guard(model, optimizer, responses={"growth": "log"}, on_spike="log", on_loss_spike="log")
        x, y = torch.randn(64, 16), torch.randn(64, 1)
        for _ in range(30):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad(set_to_none=True)
        guard.flush()
        steps = [e["step"] for r in guard.history for e in r["events"] if e["kind"] == "precursor"]
        return steps[0] if steps else None

    assert first_precursor(1.0) == 10
    assert first_precursor(1e-3) is None


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


def test_the_precursor_event_says_which_signal_how_far_which_layer_and_what_to_do() -> None:
    """Deliverable 4 of issue 19: a warning you can act on names its signal (it did not: only total_norm)."""
    # the weights grow several-fold within ten steps: the weight-growth signal, at the sample
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.weight, std=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    guard = gg.Guard(model, optimizer, responses={"growth": "log"}, on_spike="log", on_loss_spike="log")
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.flush()
    grown = next(e for r in guard.history for e in r["events"] if e["kind"] == "precursor")
    assert grown["step"] == 10 and grown["signal"] == "weight_growth"
    assert grown["factor"] > 2.5 and "learning rate is too large" in grown["advice"]
    assert grown["layer"] in ("0", "2") and grown["layer"] in grown["advice"]
    # the gradient norm climbs x10 over 20 steps: the gradient-norm climb, with its layer and its factor
    climbing = _climbing_run()
    climb = next(e for r in climbing.history for e in r["events"] if e["kind"] == "precursor")
    assert climb["signal"] == "grad_climb" and climb["factor"] > 4.0
    assert climb["layer"] is not None and climb["layer"] in climb["advice"] and "roll back" in climb["advice"]


def test_a_history_saved_before_the_precursor_columns_loads_with_them_unknown() -> None:
    history = gg.history.History(capacity=4, layer_every=0)
    history.record(3, torch.arange(len(gg.history.FIELDS), dtype=torch.float32), 0.1, ["w"], None)
    state = history.state_dict()
    state["rows"] = state["rows"][:, :-2]  # the rows of a state saved before the two columns existed
    resumed = gg.history.History(capacity=4, layer_every=0)
    resumed.load_state_dict(state)
    (row,), _ = resumed.drain()
    assert row["update_layer_ratio"] == len(gg.history.FIELDS) - 3
    assert math.isnan(row["precursor_signal"]) and math.isnan(row["precursor_factor"])

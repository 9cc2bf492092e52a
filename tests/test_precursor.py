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


def _growing(rates: list[float], start: float = 10.0) -> list[float]:
    """A weight norm per step whose log grows by ``rates[k]`` over the k-th sample interval of 10 steps."""
    norms, log = [], math.log(start)
    for rate in rates:
        for _ in range(10):
            norms.append(math.exp(log))
            log += rate / 10
    return norms


def test_weights_whose_growth_speeds_up_warn_and_a_steady_or_slowing_growth_does_not() -> None:
    """Issue 19: an LR raised slowly was warned by no signal (the weights grow ~1.05-1.3x per 10 steps, below
    weight_ratio, but their growth speeds up for ~100 steps before the loss turns)."""
    norms = noisy(200)  # a quiet gradient norm: only the weights can warn
    slowing = _growing([0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.03, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01,
                        0.005, 0.005, 0.005, 0.005, 0.005])
    assert run_with_weights(norms, slowing)[0].first_warning() is None
    steady = _growing([0.05] * 20)
    assert run_with_weights(norms, steady)[0].first_warning() is None
    # a warm-up: the growth speeds up over the first 5 samples, then slows down: not learned as a floor
    warm_up = _growing([0.005, 0.02, 0.04, 0.06, 0.08, 0.06, 0.05, 0.04, 0.04, 0.03] + [0.03] * 10)
    assert run_with_weights(norms, warm_up)[0].first_warning() is None
    # slowest 0.02 per sample at samples 6-9, then +0.01 per sample against a floor rising 0.003 per sample: past it
    # by 0.035 at the 14th sample (growth 0.07, floor 0.035)
    speeding = _growing([0.05, 0.04, 0.03, 0.03, 0.02, 0.02, 0.02, 0.02, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08,
                         0.09, 0.1, 0.12, 0.14, 0.16])
    precursor, raised = run_with_weights(norms, speeding, weight_ratio=None)
    assert precursor.first_warning() == 140 and raised.index(True) == 140 and sum(raised) == 1
    assert run_with_weights(norms, speeding, acceleration=None, weight_ratio=None)[0].first_warning() is None
    # at 0.05 the floor rises 0.005 per sample: past it by 0.055 at the 18th sample (growth 0.12, floor 0.065)
    assert run_with_weights(norms, speeding, acceleration=0.05, weight_ratio=None)[0].first_warning() == 180
    for bad in ({"acceleration": 0.0}, {"acceleration": math.inf}, {"acceleration_after": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gg.precursor.Precursor(**bad)


def test_a_precursor_state_saved_before_the_acceleration_loads_and_starts_it_afresh() -> None:
    norms, weights = noisy(60), _growing([0.05] * 6)
    saved = run_with_weights(norms, weights)[0].state_dict()
    for name in ("samples", "growth_floor", "accelerating"):
        del saved["state"][name]
    resumed = gg.precursor.Precursor()
    resumed.load_state_dict(saved)
    assert int(resumed.state.samples) == 0 and not bool(resumed.state.accelerating)
    with pytest.raises(ValueError, match="expected"):
        resumed.load_state_dict({"steps": 1, "state": {"smoothed": torch.tensor(0.0)}})


def test_the_guard_names_the_weight_acceleration_in_its_event() -> None:
    """An MLP under SGD whose LR is raised x1.03 a step: the Guard's precursor event says weight_acceleration."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.03**step)
    guard = gg.Guard(model, optimizer, scheduler=scheduler)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    for step in range(150):
        loss = torch.nn.functional.mse_loss(model(x[step % 8 * 32:][:32]), y[step % 8 * 32:][:32])
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.flush()
    events = [e for r in guard.history for e in r["events"] if e["kind"] == "precursor"]
    assert events and events[0]["signal"] == "weight_acceleration", events
    assert events[0]["factor"] > math.exp(0.03) and "sped up" in events[0]["advice"]


def test_a_rollback_is_no_growth_the_warning_comes_down_and_can_rise_again() -> None:
    """A rollback put back weights 100x smaller: learned as a growth, the fall set the slowest growth at -4.6 per
    sample, every later sample was past it, and the warning stayed up (no other signal could raise again)."""
    norms = noisy(300)
    steady = _growing([0.02] * 30)
    precursor = gg.precursor.Precursor(weight_ratio=None)
    raised = []
    for step in range(300):
        weight = steady[step] / (100.0 if step >= 100 else 1.0)  # the weights at step 100: restored, 100x smaller
        if step == 100:
            precursor.weights_replaced()
        raised.append(bool(precursor.update(torch.tensor(norms[step]),
                                            torch.tensor(weight) if precursor.wants_weights() else None)))
    assert precursor.first_warning() is None and not any(raised)
    assert not bool(precursor.above)


def test_the_guard_tells_the_precursor_when_a_rollback_replaced_the_weights(monkeypatch) -> None:
    replaced = []
    monkeypatch.setattr(gg.precursor.Precursor, "weights_replaced", lambda self: replaced.append(True))
    _climbing_run({"precursor": "rollback"})
    assert replaced  # the climb's warning rolled back: the Guard said so before the next step

"""Guard: skip semantics, host reads per step, fused folding, GradScaler, accumulation, sinks, options."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from torch import nn

import gradguard as gg


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=g)
    return x, x[:, :1] * 2.0 - x[:, 1:2]


def _backward(model: nn.Module, i: int, nan: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Forward and backward of batch ``i``; ``scale`` multiplies the loss (a spike), ``nan`` poisons a grad."""
    x, y = _batch(i)
    loss = nn.functional.mse_loss(model(x), y) * scale
    loss.backward()
    if nan:
        model[0].weight.grad[0, 0] = math.nan
    return loss


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def _assert_same_state(a, b) -> None:
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    sa, sb = a[1]["state"], b[1]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), name


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_nonfinite_step_is_skipped_params_optimizer_and_scheduler_unchanged(name):
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    guard = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(1.0), scheduler=scheduler, log_every=4)
    for i in range(3):
        _backward(model, i)
        assert bool(guard.step())
        optimizer.zero_grad()
    before, lr_before, epoch_before = _state(model, optimizer), optimizer.param_groups[0]["lr"], scheduler.last_epoch
    _backward(model, 3, nan=True)
    stepped = guard.step()
    optimizer.zero_grad()
    assert not bool(stepped) and guard.last_step_skipped
    _assert_same_state(before, _state(model, optimizer))
    assert optimizer.param_groups[0]["lr"] == lr_before and scheduler.last_epoch == epoch_before
    _backward(model, 4)
    assert bool(guard.step()) and not guard.last_step_skipped
    assert scheduler.last_epoch == epoch_before + 1
    guard.close()
    assert guard.summary() == {"steps": 5, "skipped": 1, "clipped": guard.summary()["clipped"], "rollbacks": 0,
                               "lr_backoffs": 0, "dropped_records": 0}
    record = guard.history[3]
    assert record["skipped"] and [e["kind"] for e in record["events"]] == ["nonfinite_grad"]
    assert record["events"][0]["layer"] == "0"


def _guard_reads(name: str, steps: int, **guard_kwargs) -> tuple[list[int], list[int]]:
    """Host reads of each guard.step, and of the same bare optimizer.step on a twin, per step."""
    model, twin = _model(), _model()
    optimizer, twin_optimizer = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](twin.parameters())
    guard = gg.Guard(model, optimizer, **guard_kwargs)
    guard_reads, bare_reads = [], []
    for i in range(steps):
        fault = dict(nan=(i == 30), scale=100.0 if i == 35 else 1.0)
        loss = _backward(model, i, **fault)
        _backward(twin, i)
        with gg.count_host_syncs() as syncs:
            guard.step(loss)
        guard_reads.append(syncs.count)
        with gg.count_host_syncs() as syncs:
            twin_optimizer.step()
        bare_reads.append(syncs.count)
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
    return guard_reads, bare_reads


@pytest.mark.parametrize("name", ["adamw_fused", "adam_fused", "sgd_fused"])
@pytest.mark.parametrize("clip", [None, "global", "zclip"])
def test_fused_optimizers_make_no_host_read_at_all(name, clip):
    clipper = {None: None, "global": gg.clip.GlobalNorm(0.5), "zclip": gg.clip.ZClip(warmup_steps=5)}[clip]
    reads, bare = _guard_reads(name, 40, clip=clipper, log_every=10, layer_every=5)
    # but the flush (every 10th step): one copy of the history to the host, never .item()-ed. Fused SGD with
    # momentum reads the skip flag once, before its first real step (see test_fused_sgd_first_step_skipped_...)
    first = 1 if name == "sgd_fused" else 0
    assert reads == [first] + [0] * 8 + [1] + ([0] * 9 + [1]) * 3
    assert bare == [0] * 40


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_plain_optimizers_make_one_host_read_per_step(name):
    reads, bare = _guard_reads(name, 40, clip=gg.clip.ZClip(warmup_steps=5), log_every=10)
    # Adam's own reads (its CPU step counters) are the optimizer's, not the Guard's; skipped steps (30: NaN,
    # 35: loss spike) do not call the optimizer at all.
    extra = [r - (0 if i in (30, 35) else b) for i, (r, b) in enumerate(zip(reads, bare))]
    assert extra == [2 if i % 10 == 9 else 1 for i in range(40)]  # + the flush's one copy every 10th step


def test_fused_scheduler_costs_one_read():
    model = _model()
    optimizer = OPTIMIZERS["adamw_fused"](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.99)
    guard = gg.Guard(model, optimizer, scheduler=scheduler)
    for i in range(5):
        loss = _backward(model, i)
        with gg.count_host_syncs() as syncs:
            guard.step(loss)
        optimizer.zero_grad()
        assert syncs.count == 1


def _clip_grad_norm_run(fused: bool, steps: int = 12) -> list[torch.Tensor]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    for i in range(steps):
        _backward(model, i)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _guarded_run(fused: bool, steps: int = 12) -> tuple[list[torch.Tensor], gg.Guard]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(0.3), on_spike="log", responses={"growth": "log"})
    for i in range(steps):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], guard


def test_plain_path_equals_clip_grad_norm_then_step_bitwise():
    expected = _clip_grad_norm_run(fused=False)
    got, guard = _guarded_run(fused=False)
    assert guard.summary()["clipped"] > 0
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_fused_path_folds_the_coefficient_into_grad_scale():
    expected = _clip_grad_norm_run(fused=True)
    got, guard = _guarded_run(fused=True)
    assert guard.summary()["clipped"] > 0
    for a, b in zip(expected, got):  # g / (1 / coef) vs g * coef: equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_path_clips_inside_the_kernel():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(1e-3))
    _backward(model, 0)
    before = [p.grad.clone() for p in model.parameters()]
    coef = 1e-3 / (gg.grad_stats(model).total_norm + 1e-6)
    guard.step()
    # torch's fused kernels write grad / grad_scale back as they read it: .grad ends clipped, no extra pass
    for g, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, g * coef)


def test_grad_scaler_unscales_first_skips_inf_and_backs_off_the_scale():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    twin = _model()
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, scaler=scaler, on_spike="log", responses={"growth": "log"})
    for i in range(4):
        x, y = _batch(i)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        nn.functional.mse_loss(twin(x), y).backward()
        if i == 2:
            model[2].bias.grad.fill_(math.inf)
        guard.step()
        if i != 2:
            twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
        if i == 2:
            assert guard.last_step_skipped and scaler.get_scale() == 2.0**9
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)  # unscaled before stepping: the same updates as without a scaler
    assert guard.summary()["skipped"] == 1


def test_gradient_accumulation_acts_on_boundaries_only():
    model, twin = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, accumulation_steps=3, on_spike="log", responses={"growth": "log"})
    boundaries = []
    for i in range(9):
        _backward(model, i)
        (loss := _backward(twin, i))
        guard.step(loss)
        boundaries.append(guard.sync_gradients)
        if guard.sync_gradients:
            optimizer.zero_grad()
        if i % 3 == 2:
            twin_optimizer.step()
            twin_optimizer.zero_grad()
    assert boundaries == [False, False, True] * 3
    assert guard.summary()["steps"] == 3
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    guard.close()
    assert [r["step"] for r in guard.history] == [0, 1, 2]


def test_lr_backoff_after_n_suspect_skips_in_a_window():
    """Skips whose loss does not vouch for the weights (here NaN losses, in a row) cut the LR; isolated
    NaN gradients with a healthy loss (step 1) do not."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, log_every=5,
                     recovery=gg.RecoveryPolicy(backoff_after=2, skip_window=10, lr_backoff=0.25))
    for i in range(10):
        loss = _backward(model, i, nan=i in (1, 5, 6))
        guard.step(loss * math.nan if i in (5, 6) else loss)
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    guard.close()
    assert guard.summary()["lr_backoffs"] == 1
    events = guard.history[6]["events"]
    assert [e["kind"] for e in events] == ["nonfinite_grad", "nonfinite_loss", "lr_backoff"]
    assert events[2]["lr_before"] == pytest.approx(0.1) and events[2]["lr_after"] == pytest.approx(0.025)


def _run_into_nan_weights(fused: bool, spike_at_12: bool) -> tuple[gg.Guard, list[torch.Tensor], dict]:
    """Train 13 steps (the snapshot of step 9 kept at the flush after it), write NaN into a weight after step 12
    (with ``spike_at_12``: step 12 a real step with an event, its gradients x1000, clipped), then go on until the
    Guard has rolled back: at step 13's NaN loss on the plain path, at the flush after step 14 on the fused one."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    # snapshot_loss_z=3: this test is about the restore, not the gate on the loss; these 16-row batches' losses vary by
    # some 25% (log sd ~0.25), so with the default (1 sigma) which flush keeps its snapshot is up to step 9's batch
    guard = gg.Guard(model, optimizer, log_every=5,
                     recovery=gg.RecoveryPolicy(snapshot_every=5, rollback_lr_factor=0.5, snapshot_loss_z=3.0))
    for i in range(9):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    # the snapshot taken at the flush after step 9 holds the state as step 9 began (step 9 ran on it)
    good = [p.detach().clone() for p in model.parameters()]
    good_optimizer = copy.deepcopy(optimizer.state_dict()["state"])
    for i in range(9, 13):
        loss = _backward(model, i)
        if spike_at_12 and i == 12:
            for p in model.parameters():
                p.grad.mul_(1e3)
        guard.step(loss)
        optimizer.zero_grad()
    with torch.no_grad():
        model[2].weight.fill_(math.nan)  # a bit flip, a bad write: the gradients did not show it
    for i in range(13, 15 if fused else 14):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    if not fused:
        guard.flush()  # the records of steps 10-13, with the rollback's events
    for a, b in zip(good, model.parameters()):
        assert torch.equal(a, b)
    for k, v in good_optimizer.items():
        assert torch.equal(v["exp_avg"], optimizer.state_dict()["state"][k]["exp_avg"])
    assert guard.summary()["rollbacks"] == 1
    # both paths put it at step 13, the first NaN loss (the fused path finds it at the flush, in the records)
    by_step = {r["step"]: r["events"] for r in guard.history}
    assert [e["kind"] for e in by_step[13]][-2:] == ["nonfinite_param", "rollback"]
    assert by_step[13][-2]["layer"] == "2.weight"
    return guard, good, good_optimizer


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_weights_roll_back_to_the_last_snapshot_the_lr_kept_when_no_update_is_to_blame(fused):
    """NaN in weights that only quiet steps moved came from outside the optimizer step: the rollback keeps the LR
    (a cut would not have kept the NaN out). Plain path: the NaN loss of step 13 has the weights checked, and the
    rollback comes at once, not at the flush (before: 10 NaN losses counted against the LR, then a rollback)."""
    guard, _, _ = _run_into_nan_weights(fused, spike_at_12=False)
    assert guard.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert guard.history[-1]["step"] == (14 if fused else 13)  # plain: at once, not at the flush after step 14


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_weights_after_an_update_with_an_event_cut_the_lr(fused):
    """The last real step before the NaN had an event (a clipped spike): the update may be to blame, the
    rollback cuts the LR by ``rollback_lr_factor``."""
    guard, _, _ = _run_into_nan_weights(fused, spike_at_12=True)
    assert "grad_spike" in [e["kind"] for r in guard.history if r["step"] == 12 for e in r["events"]]
    assert guard.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_rollback_from_disk_snapshot(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=2,
                     recovery=gg.RecoveryPolicy(snapshot_every=2, snapshot_clean_steps=2,
                                                snapshot_dir=str(tmp_path)))
    for i in range(3):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    good = [p.detach().clone() for p in model.parameters()]  # the snapshot of step 3, kept at the next flush
    for i in range(3, 5):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    assert (tmp_path / "gradguard_snapshot.step3.pt").exists() and guard.recovery.snapshot.step == 3
    optimizer.zero_grad()
    with torch.no_grad():
        model[0].bias.fill_(math.inf)
    guard.step(_backward(model, 5))
    for a, b in zip(good, model.parameters()):
        assert torch.equal(a, b)


def test_training_diverged_when_the_rollback_budget_is_spent():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=2, recovery=gg.RecoveryPolicy(max_rollbacks=1, snapshot_every=2))
    with pytest.raises(gg.TrainingDiverged) as info:
        for i in range(20):
            with torch.no_grad():
                if i >= 4:
                    model[2].bias.fill_(math.nan)  # every snapshot restored goes bad again
            guard.step(_backward(model, i))
            optimizer.zero_grad()
    error = info.value
    assert "rollback budget is spent (1 of max_rollbacks=1)" in str(error)
    assert "nonfinite_param in '2.bias'" in str(error)
    # the NaN loss of step 4 has the weights checked: a rollback; step 5's NaN again, and the budget is spent
    assert error.summary["rollbacks"] == 1 and error.step == 5
    assert guard.summary()["rollbacks"] == 1


def test_raise_response_stops_at_once():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, on_nonfinite="raise")
    guard.step(_backward(model, 0))
    optimizer.zero_grad()
    with pytest.raises(gg.TrainingDiverged, match="nonfinite_grad event at step 1"):
        guard.step(_backward(model, 1, nan=True))


def test_many_skips_whose_loss_spiked_roll_back():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, recovery=gg.RecoveryPolicy(rollback_after=5, backoff_after=100))
    for i in range(10):
        guard.step(_backward(model, i, scale=1e4 if i >= 5 else 1.0))
        optimizer.zero_grad()
    assert guard.summary()["rollbacks"] == 1 and guard.summary()["skipped"] == 5


def test_skips_of_nan_gradients_with_a_healthy_loss_do_not_roll_back():
    """Skipping works there (the weights gave a healthy loss at each step): a rollback would only throw away
    the progress since the snapshot."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, recovery=gg.RecoveryPolicy(rollback_after=5, backoff_after=100))
    for i in range(20):
        guard.step(_backward(model, i, nan=i >= 5))
        optimizer.zero_grad()
    assert guard.summary()["rollbacks"] == 0 and guard.summary()["skipped"] == 15


def test_spike_clip_response_clips_to_the_detector_threshold():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, detector=gg.detect.Detector(warmup_steps=10), log_every=50,
                     on_loss_spike="log")
    for i in range(30):
        guard.step(_backward(model, i, scale=30.0 if i == 25 else 1.0))
        optimizer.zero_grad()
    guard.close()
    spike = guard.history[25]
    assert [e["kind"] for e in spike["events"]] == ["grad_spike", "loss_spike"]
    assert spike["events"][0]["threshold"] == pytest.approx(spike["total_norm"] * spike["coef"], rel=1e-4)
    assert spike["clipped"] and spike["coef"] < 1.0
    assert spike["clip_threshold"] == pytest.approx(spike["total_norm"] * spike["coef"], rel=1e-5)
    assert not guard.history[24]["clipped"]


def test_record_format_and_layer_norms():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(0.5), log_every=4, layer_every=3)
    for i in range(7):
        guard.step(_backward(model, i))
        optimizer.zero_grad()
    assert len(guard.history) == 4  # flushed at step 4 only
    guard.close()
    records = guard.history
    assert [r["step"] for r in records] == list(range(7))
    keys = {"step", "loss", "total_norm", "coef", "clip_threshold", "skipped", "clipped", "lr", "events"}
    for r in records:
        assert keys <= r.keys()
        assert ("layer_norms" in r) == (r["step"] % 3 == 0)
        assert isinstance(r["skipped"], bool) and isinstance(r["lr"], float)
    stats_norms = records[0]["layer_norms"]
    assert set(stats_norms) == {"0", "2"}
    assert math.sqrt(sum(v * v for v in stats_norms.values())) == pytest.approx(records[0]["total_norm"], rel=1e-5)
    unclipped = [r for r in records if not r["clipped"]]
    assert all(r["clip_threshold"] == pytest.approx(0.5) for r in unclipped)


def test_sinks_jsonl_logging_callback(tmp_path, caplog):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    path = tmp_path / "run" / "guard.jsonl"
    sinks = [gg.sinks.JSONL(path), gg.sinks.Logging("gradguard.test"), gg.sinks.Callback(seen.append)]
    assert all(isinstance(s, gg.sinks.Sink) for s in sinks)
    with caplog.at_level(logging.INFO, logger="gradguard.test"):
        with gg.Guard(model, optimizer, sinks=sinks, log_every=3) as guard:
            for i in range(5):
                guard.step(_backward(model, i, nan=i == 1))
                optimizer.zero_grad()
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and len(seen) == 5
    assert "NaN" in lines[1]  # json writes NaN as Python's json does
    assert math.isnan(json.loads(lines[1])["total_norm"])
    assert json.loads(lines[4])["step"] == 4
    assert any("nonfinite_grad" in m for m in caplog.messages)
    assert any("1 skipped" in m for m in caplog.messages)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"on_spike": "explode"}, "on_spike"),
        ({"on_nonfinite": "clip"}, "on_nonfinite"),
        ({"responses": {"growth": "maybe"}}, r"responses\['growth'\]"),
        ({"responses": {"loss_explosion": "skip"}}, "unknown event kind 'loss_explosion'"),
        ({"responses": {"nonfinite_param": "skip"}}, r"responses\['nonfinite_param'\]"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"log_every": 0}, "log_every"),
        ({"clip": "global"}, "clip"),
        ({"sinks": [object()]}, r"sinks\[0\]"),
        ({"recovery": {"max_rollbacks": 1}}, "recovery"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(kwargs, option):
    model = _model()
    with pytest.raises(ValueError, match=option):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=1e-3), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"lr_backoff": -0.5}, "lr_backoff"),
        ({"rollback_lr_factor": 2.0}, "rollback_lr_factor"),
        ({"backoff_after": 0}, "backoff_after"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"lr_recover_after": 0}, "lr_recover_after"),
        ({"snapshot_clean_steps": -1}, "snapshot_clean_steps"),
        ({"snapshot_loss_z": 0.0}, "snapshot_loss_z"),
    ],
)
def test_bad_recovery_policy_raises_value_error_naming_the_field(kwargs, option):
    with pytest.raises(ValueError, match=f"RecoveryPolicy: {option}"):
        gg.RecoveryPolicy(**kwargs)


def test_growth_clip_response_holds_the_norm_at_its_moving_average():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients alone drive the norms
    detector = gg.detect.Detector(warmup_steps=5, growth_window=3, growth_factor=1.3, z_thresh=50.0)
    guard = gg.Guard(model, optimizer, detector=detector, on_loss_spike="log", log_every=100)
    for i in range(20):
        guard.step(_backward(model, 0, scale=1.0 if i < 12 else 1.6 ** (i - 11)))
        optimizer.zero_grad()
    guard.close()
    growing = [r for r in guard.history if any(e["kind"] == "growth" for e in r["events"])]
    assert [r["step"] for r in growing] == list(range(14, 20))  # 3 rising steps fill the window
    for r in growing:
        assert r["clipped"] and r["total_norm"] * r["coef"] < guard.history[0]["total_norm"] * 1.5
        assert r["events"][-1]["rate"] == pytest.approx(1.6, rel=1e-3)


def test_grad_scaler_with_a_fused_optimizer_makes_no_host_read():
    model, twin = _model(), _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = gg.Guard(model, optimizer, scaler=scaler, on_spike="log", responses={"growth": "log"}, log_every=100)
    for i in range(5):
        x, y = _batch(i)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        nn.functional.mse_loss(twin(x), y).backward()
        if i == 3:
            model[0].bias.grad[0] = math.nan
        with gg.count_host_syncs() as syncs:
            guard.step()
        assert syncs.count == 0
        if i != 3:
            twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**7 and guard.summary()["skipped"] == 1
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_the_first_snapshot_holds_weights_loaded_after_the_guard_was_made():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=3)
    pretrained = {k: torch.full_like(v, 0.01) for k, v in model.state_dict().items()}
    model.load_state_dict(pretrained)  # e.g. fine-tuning: weights arrive after the Guard
    guard.step(_backward(model, 0))
    optimizer.zero_grad()
    with torch.no_grad():
        model[0].weight.fill_(math.nan)
    guard.step(_backward(model, 1))  # its NaN loss has the weights checked: a rollback to the first snapshot
    optimizer.zero_grad()
    assert guard.summary()["rollbacks"] == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, pretrained[name])


def test_fused_sgd_first_step_skipped_keeps_momentum_buffers_valid():
    # torch's fused SGD would leave its momentum buffers uninitialised when found_inf skips its first step
    def run(fused: bool) -> list[torch.Tensor]:
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=fused)
        guard = gg.Guard(model, optimizer)
        for i in range(4):
            guard.step(_backward(model, i, nan=i == 0))
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(fused=False), run(fused=True)):
        torch.testing.assert_close(a, b)


def test_fused_host_decisions_are_taken_at_the_flush():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, optimizer, on_nonfinite="raise", log_every=4)
    guard.step(_backward(model, 0))
    optimizer.zero_grad()
    guard.step(_backward(model, 1, nan=True))  # skipped on the device; no read, so no raise yet
    optimizer.zero_grad()
    guard.step(_backward(model, 2))
    optimizer.zero_grad()
    with pytest.raises(gg.TrainingDiverged, match="nonfinite_grad event at step 1"):
        guard.step(_backward(model, 3))  # the flush after step 3 reads the rows and raises
    assert [r["step"] for r in guard.history] == [0, 1, 2, 3]  # published before raising


def test_per_kind_response_override_rolls_back_on_a_gradient_spike():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, detector=gg.detect.Detector(warmup_steps=5),
                     responses={"grad_spike": "rollback", "loss_spike": "log"}, log_every=5,
                     recovery=gg.RecoveryPolicy(snapshot_every=5, snapshot_clean_steps=5, snapshot_loss_z=3.0))
    for i in range(13):
        guard.step(_backward(model, i, scale=1e3 if i == 12 else 1.0))
        optimizer.zero_grad()
    assert guard.summary()["rollbacks"] == 1 and guard.summary()["skipped"] == 1
    guard.close()
    kinds = [e["kind"] for e in guard.history[12]["events"]]
    assert kinds == ["grad_spike", "loss_spike", "rollback"]  # the loss spike is only logged
    # the last snapshot kept: step 9's (its batch is a hard one, loss z 1.7, within snapshot_loss_z=3; with the
    # default 1 whether the toy's noisy batches at steps 4 and 9 count as "at the level" would decide it)
    assert guard.history[12]["events"][2]["to_step"] == 9

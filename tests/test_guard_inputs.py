"""Bad input is refused before anything changes, naming what is wrong (issue 9 point 13), and a Guard state
is checked against this model and optimizer before it is loaded (issue 10 point 4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.clip import Clipper, ClipResult


def _model(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 1))


def _loss(model: nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 6, generator=g)
    return nn.functional.mse_loss(model(x), x[:, :1])


def _trained_guard(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 7, **options) -> gg.Guard:
    guard = gg.Guard(model, optimizer, log_every=5, clip=gg.clip.ZClip(warmup_steps=3), **options)
    for i in range(steps):
        loss = _loss(model, i)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    return guard


def _same(a, b) -> bool:
    """Nested equality, tensors by value (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---------------------------------------------------------------- step() input


def test_a_loss_that_is_not_a_scalar_is_refused_before_anything_changes():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer)
    x = torch.randn(8, 6)
    per_sample = ((model(x) - x[:, :1]) ** 2).squeeze(1)
    per_sample.mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"loss must be a scalar .* shape \(8,\)"):
        guard.step(per_sample)
    with pytest.raises(ValueError, match="loss must be a scalar tensor or None, got float"):
        guard.step(0.5)  # type: ignore[arg-type]
    assert guard.step_count == 0 and guard.summary()["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    guard.step(per_sample.mean())  # a scalar of shape () or (1,) is fine
    assert guard.step_count == 1


@pytest.mark.parametrize("case", ["no_backward", "all_frozen"])
def test_a_step_without_any_gradient_says_so_and_counts_nothing(case):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, accumulation_steps=2)
    if case == "all_frozen":
        model.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"no parameter of the model has a gradient: call loss.backward\(\)"):
        guard.step(torch.tensor(1.0))
        guard.step(torch.tensor(1.0))  # the accumulation boundary
    assert guard.step_count == 0 and guard.history == [] and guard.summary()["skipped"] == 0
    assert guard.recovery.snapshot.step is None  # nothing was started either


def test_an_optimizer_holding_none_of_the_models_parameters_is_refused():
    model, other = _model(), _model()
    with pytest.raises(ValueError, match="optimizer holds none of the model's 4 parameters"):
        gg.Guard(model, torch.optim.SGD(other.parameters(), lr=0.1))
    # holding some of them (e.g. a frozen part, or a second optimizer for the rest) is fine
    gg.Guard(model, torch.optim.SGD(model[0].parameters(), lr=0.1))


def test_a_meta_device_model_is_refused():
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"meta device \('weight', 'bias'\).*to_empty"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


class _BadNorm(Clipper):
    norm_type = -1.0

    def clip_(self, stats: gg.GradStats) -> ClipResult:  # pragma: no cover - never reached
        raise AssertionError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": "layer"}, r"groups must be one of \('module', 'param'\), got 'layer'"),
        ({"clip": _BadNorm()}, r"clip.norm_type must be a number > 0 or inf, got -1.0"),
        ({"optimizer_step": 3}, "optimizer_step must be callable"),
    ],
)
def test_construction_options_are_checked_naming_the_argument(kwargs, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_a_jsonl_sink_whose_path_cannot_be_written_fails_when_made(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"JSONL: cannot write path .*a_file/run.jsonl"):
        gg.sinks.JSONL(blocker / "run.jsonl")
    with pytest.raises(ValueError, match="JSONL: cannot write path"):
        gg.sinks.JSONL(tmp_path)  # a folder, not a file
    sink = gg.sinks.JSONL(tmp_path / "new" / "run.jsonl")  # a missing folder is made
    sink.close()
    assert (tmp_path / "new" / "run.jsonl").exists()


def test_the_optimizer_step_is_looked_up_at_step_time(recwarn):
    """A scheduler made after the Guard wraps optimizer.step: calling the method captured when the Guard was
    made skipped that wrapper, and torch warned "lr_scheduler.step() before optimizer.step()"."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # wraps optimizer.step
    for i in range(3):
        loss = _loss(model, i)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
        scheduler.step()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)], [str(w.message) for w in recwarn]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# ---------------------------------------------------------------- load_state_dict


def test_a_state_from_another_model_is_refused_naming_the_difference_and_changes_nothing():
    model_a = _model(width=16)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    state = _trained_guard(model_a, opt_a).state_dict()

    model_b = _model(width=12)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    guard_b = _trained_guard(model_b, opt_b, steps=3)
    before = guard_b.state_dict()
    with pytest.raises(ValueError, match=r"parameter '0.weight' is \[16, 6\] float32 in the state, \[12, 6\]"):
        guard_b.load_state_dict(state)
    assert _same(guard_b.state_dict(), before)

    model_c = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 1))
    guard_c = gg.Guard(model_c, torch.optim.AdamW(model_c.parameters()), log_every=5, clip=gg.clip.ZClip())
    with pytest.raises(ValueError, match=r"another model: parameters only in the state: \[\], only in this model: "
                                         r"\['3.bias', '3.weight'\]"):
        guard_c.load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("recovery"), r"missing \['recovery'\]"),
        (lambda s: s.update(format="gradguard.Guard/1"), "state format 'gradguard.Guard/1'"),
        (lambda s: s["fingerprint"].update(optimizer="SGD"), "optimizer differs: state has 'SGD'"),
        (lambda s: s["fingerprint"].update(clip="GlobalNorm"), "clip differs"),
        (lambda s: s["fingerprint"].update(log_every=10), "log_every differs"),
        (lambda s: s["recovery"]["snapshot"]["state"]["model"].pop("2.bias"), "snapshot's model state"),
    ],
)
def test_a_partial_or_foreign_state_changes_nothing(change, message):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = _trained_guard(model, optimizer).state_dict()
    change(state)
    twin = _model()
    guard = _trained_guard(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), steps=3)
    before = guard.state_dict()
    with pytest.raises(ValueError, match=message):
        guard.load_state_dict(state)
    assert _same(guard.state_dict(), before)


def test_a_state_that_fails_while_applied_is_rolled_back():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = _trained_guard(model, optimizer).state_dict()
    state["recovery"]["suspect"] = ["not a step"]  # passes the checks, fails when applied (after the detector)
    twin = _model()
    guard = _trained_guard(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), steps=3)
    before = guard.state_dict()
    with pytest.raises(ValueError, match="nothing was changed"):
        guard.load_state_dict(state)
    assert _same(guard.state_dict(), before)


def test_a_matching_state_loads_and_the_run_continues():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = _trained_guard(model, optimizer)
    state = copy.deepcopy(guard.state_dict())
    twin = _model()
    twin_guard = _trained_guard(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), steps=2)
    twin_guard.load_state_dict(state)
    assert _same(twin_guard.state_dict(), guard.state_dict()) and twin_guard.step_count == 7

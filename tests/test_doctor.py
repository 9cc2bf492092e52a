"""The doctor across depth: the issue's checks on deep MLPs, the recommended fixes, the report's shapes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.explain import doctor
from gradguard.explain.report import DoctorReport

WIDTH = 48
IN, OUT = 16, 10


def mlp(depth: int, activation: type[nn.Module], init) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(IN if i == 0 else WIDTH, OUT if i == depth - 1 else WIDTH)
        init(linear)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def xavier(layer: nn.Linear) -> None:
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)


def he(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)


def standard_normal(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, 0.0, 1.0)
    nn.init.zeros_(layer.bias)


def partially_normal(first_bad: int):
    """Xavier for layers before ``first_bad``, N(0, 1) from it on."""
    count = {"i": 0}

    def init(layer: nn.Linear) -> None:
        (standard_normal if count["i"] >= first_bad else xavier)(layer)
        count["i"] += 1

    return init


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, IN, generator=generator), torch.randint(0, OUT, (64,), generator=generator)


def diagnose(model: nn.Module, batch, **kwargs) -> DoctorReport:
    return doctor(model, batch, nn.functional.cross_entropy, jacobians=False, **kwargs)


def apply_fix(fix: str, model: nn.Module, batch, optimizer=None) -> None:
    """Run a finding's fix exactly as the report prints it."""
    exec(fix, {"gg": gg, "nn": nn, "torch": torch, "model": model, "batch": batch, "optimizer": optimizer})


def test_relu_mlp_30_layers_xavier_vanishes_and_he_is_stable(batch) -> None:
    xavier_report = diagnose(mlp(30, nn.ReLU, xavier), batch)
    assert xavier_report.verdict == "vanishing"
    # Glorot & Bengio / He et al.: 1/sqrt(2) per layer for the error signal's norm with Xavier under ReLU.
    assert 0.6 < xavier_report.depth.growth_per_layer < 0.8
    assert xavier_report.depth.total_growth < 1e-3
    # The forward face: activation variance halves per layer, so std at layer 28 is ~2^-7 of layer 0's.
    stds = [a.std for a in xavier_report.activations if a.kind == "Linear"]
    assert stds[-2] / stds[0] < 2.0 ** -5

    he_report = diagnose(mlp(30, nn.ReLU, he), batch)
    assert he_report.verdict == "stable"
    assert he_report.start_layer is None
    assert not [f for f in he_report.findings if f.severity == "error"]


def test_error_signal_moves_while_weight_gradients_stay_level(batch) -> None:
    """Glorot & Bengio 2010 eqs. 13-14: in a deep linear net with a gain c per layer, the forward signal
    grows as c^l and the error signal as c^(L-l), so the weight gradients (their product) stay level."""

    def scaled(layer: nn.Linear) -> None:
        nn.init.normal_(layer.weight, 0.0, 1.5 / layer.in_features**0.5)
        nn.init.zeros_(layer.bias)

    report = diagnose(mlp(20, nn.Identity, scaled), batch)
    hidden = report.depth.layers[1:-1]  # equal widths: the geometric law holds exactly in expectation
    signal_ratio = hidden[0].error_signal / hidden[-1].error_signal
    weight_ratio = hidden[0].weight_grad / hidden[-1].weight_grad
    assert signal_ratio > 1.5 ** 17 / 10  # ~1.5 per layer over 17 layers
    assert 1 / 3 < weight_ratio < 3
    assert report.verdict == "exploding"


def test_tanh_mlp_20_layers_standard_normal_explodes_from_the_first_layer(batch) -> None:
    report = diagnose(mlp(20, nn.Tanh, standard_normal), batch)
    assert report.verdict == "exploding"
    assert report.start_layer == "0"
    assert report.findings[0].severity == "error"
    assert report.findings[0].layer == "0"
    assert report.findings[0].cause == "init_scale"


def test_explosion_starting_mid_network_is_located_there(batch) -> None:
    """Layers 0-9 Xavier, 10-19 N(0, 1): the first bad Linear is module '20' of the Sequential."""
    report = diagnose(mlp(20, nn.Tanh, partially_normal(first_bad=10)), batch)
    assert report.verdict == "exploding"
    assert report.start_layer == "20"


@pytest.mark.parametrize(
    "depth, activation, init",
    [(20, nn.Tanh, standard_normal), (30, nn.ReLU, xavier), (20, nn.Sigmoid, xavier)],
    ids=["tanh-normal", "relu-xavier", "sigmoid-xavier"],
)
def test_each_recommended_fix_turns_the_verdict_stable(batch, depth, activation, init) -> None:
    torch.manual_seed(0)
    model = mlp(depth, activation, init)
    report = diagnose(model, batch)
    assert report.verdict != "stable"
    top = report.findings[0]
    assert top.severity == "error"
    apply_fix(top.fix, model, batch)
    fixed = diagnose(model, batch)
    assert fixed.verdict == "stable", (top.fix, str(fixed))


def test_fix_for_sigmoid_swaps_the_activation(batch) -> None:
    report = diagnose(mlp(20, nn.Sigmoid, xavier), batch)
    assert report.verdict == "vanishing"
    assert report.findings[0].cause == "activation"
    assert "replace_(model, nn.Sigmoid, nn.ReLU)" in report.findings[0].fix


def test_lsuv_fix_is_recommended_when_init_is_not_the_cause_and_it_works(batch) -> None:
    """ReLU MLP He-initialised but with a 4x gain per layer put in the activation: init audit passes."""

    class Scaled(nn.ReLU):  # a rectifier (He applies) whose output is 4x larger: the flow explodes
        def forward(self, x):
            return 4 * super().forward(x)

    model = mlp(12, Scaled, he)
    report = diagnose(model, batch)
    assert report.verdict == "exploding"
    top = report.findings[0]
    assert top.cause == "depth" and top.fix.startswith("gg.init.lsuv_(model, batch)")
    assert "discards trained ones" in top.fix  # a re-initialisation says so (issue 9.8)
    apply_fix(top.fix, model, batch)
    assert diagnose(model, batch).verdict == "stable"


def test_saturation_and_dead_units_are_measured(batch) -> None:
    saturated = diagnose(mlp(8, nn.Tanh, standard_normal), batch)
    tanh_stats = [a for a in saturated.activations if a.kind == "tanh"]
    assert tanh_stats and all(a.saturated > 0.5 for a in tanh_stats[1:])
    assert any(f.cause == "saturation" for f in saturated.findings)

    model = mlp(4, nn.ReLU, he)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit of the first ReLU is negative for every sample
    dead = diagnose(model, batch)
    assert dead.activations[1].kind == "relu" and dead.activations[1].dead == 1.0
    assert any(f.cause == "dead_units" for f in dead.findings)


def test_init_audit_uses_the_activation_that_follows_in_forward_order(batch) -> None:
    """Registration order says tanh follows fc1; the forward runs ReLU after it: He is the prescription."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tanh = nn.Tanh()  # registered first, runs last
            self.fc1 = nn.Linear(IN, WIDTH)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(WIDTH, OUT)

        def forward(self, x):
            return self.tanh(self.fc2(self.relu(self.fc1(x))))

    report = diagnose(Net(), batch)
    checks = {c.layer: c for c in report.init_checks}
    assert checks["fc1"].activation == "relu" and checks["fc1"].scheme == "he"
    assert checks["fc2"].activation == "tanh" and checks["fc2"].scheme == "xavier"


def test_learning_rate_update_is_measured_and_undone(batch) -> None:
    model = mlp(4, nn.ReLU, he)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    report = diagnose(model, batch, optimizer=optimizer)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer.state_dict()["state"] == {}
    assert report.updates is not None
    for update in report.updates:  # SGD's first step is exactly lr * g (momentum buffer starts at g)
        assert update.update_ratio == pytest.approx(update.sgd_ratio, rel=1e-4)
    top = next(f for f in report.findings if f.cause == "learning_rate")
    assert top.severity == "error"
    apply_fix(top.fix, model, batch, optimizer)
    again = diagnose(model, batch, optimizer=optimizer)
    assert not any(f.cause == "learning_rate" for f in again.findings)


def test_doctor_leaves_gradients_and_mode_as_they_were(batch) -> None:
    model = mlp(3, nn.ReLU, he)
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    diagnose(model, batch)
    assert not model.training
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())


def test_jacobian_spectral_norms_match_the_dense_jacobian() -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(1, 6)
    report = doctor(model, (x, torch.randn(1, 3)), nn.functional.mse_loss, jacobian_iterations=200)
    dense = torch.autograd.functional.jacobian(model, x).reshape(3, 6)
    exact_weight_norm = float(torch.linalg.matrix_norm(model[0].weight.detach(), 2))
    # Power iteration approaches sigma_max from below and stops when a step changes it by < 1e-4.
    assert report.jacobian["input_output"] == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)), rel=5e-3)
    assert report.jacobian["input_output"] <= float(torch.linalg.matrix_norm(dense, 2)) * (1 + 1e-6)
    assert report.jacobian["blocks"]["0"] == pytest.approx(exact_weight_norm, rel=5e-3)


def test_report_prints_a_short_diagnosis_and_dict_is_strict_json(batch) -> None:
    report = doctor(mlp(20, nn.Tanh, standard_normal), batch, nn.functional.cross_entropy, jacobian_iterations=5)
    text = str(report)
    assert text.startswith("gradguard doctor: EXPLODING (starts at 0)")
    assert "the flow is then stable): gg.init.auto_(model)" in text
    assert len(text.splitlines()) < 20
    data = report.to_dict()
    json.dumps(data, allow_nan=False)  # raises on NaN/Inf
    assert data["verdict"] == "exploding" and data["start_layer"] == "0" and data["healthy"] is False
    assert len(data["depth_flow"]["layers"]) == 20
    assert {"name", "error_signal", "weight_grad", "grad_to_weight", "gain"} <= set(data["depth_flow"]["layers"][0])
    assert data["time_flow"] is None
    assert [f["severity"] for f in data["findings"]] == sorted(
        (f["severity"] for f in data["findings"]), key=("error", "warning", "info").index)


def test_bad_arguments_name_what_is_wrong(batch) -> None:
    model = mlp(2, nn.ReLU, he)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        doctor("model", batch, nn.functional.cross_entropy)
    with pytest.raises(ValueError, match=r"doctor: a batch must be \(inputs, targets\)"):
        doctor(model, batch[0], nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        doctor(model, batch, "mse")
    with pytest.raises(TypeError, match="doctor: the loss must be a scalar tensor"):
        doctor(model, batch, lambda out, y: out)
    with pytest.raises(ValueError, match=r"an \(inputs, targets\) batch needs a loss_fn"):
        doctor(model, batch)


def test_fixes_are_checked_on_a_copy_and_the_one_that_works_is_reported(batch) -> None:
    """ReLU applied with torch.relu in forward: no activation module, so the init audit prescribes Xavier
    and auto_ alone would leave the flow vanishing; the doctor finds on a copy that LSUV works, and then
    names the cause LSUV addresses, not the init it first blamed (issue 9.9: one story)."""

    class FunctionalReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(IN if i == 0 else WIDTH, WIDTH) for i in range(20))
            self.head = nn.Linear(WIDTH, OUT)

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    model = FunctionalReLU()
    before = [p.detach().clone() for p in model.parameters()]
    report = diagnose(model, batch)
    assert report.verdict == "vanishing"
    top = report.findings[0]
    assert top.fix.startswith("gg.init.lsuv_(model, batch)") and top.evidence["flow_after_fix"] == "stable"
    assert top.cause == "depth" and "the cause it addresses is the depth itself" in top.message
    assert "gg.init.auto_(model) leaves the flow vanishing" in top.message
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # only the copy was touched
    apply_fix(top.fix, model, batch)
    assert diagnose(model, batch).verdict == "stable"


def test_a_fix_that_does_not_reach_stable_says_what_the_flow_becomes() -> None:
    """tanh RNN with W_hh of spectral radius 3 over 40 steps: orthogonal init stops the explosion, and the
    plain RNN then vanishes over that span; the finding says so instead of promising a stable flow."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 16, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Model()
    with torch.no_grad():
        w = model.rnn.weight_hh_l0
        w.mul_(3.0 / torch.linalg.eigvals(w).abs().max())
    batch = (torch.randn(4, 40, 4), torch.randn(4, 1))
    report = gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False)
    top = report.findings[0]
    assert report.time.verdict == "exploding" and top.cause == "recurrent"
    assert top.evidence["flow_after_fix"] == "vanishing"
    assert "after this fix the flow over time is vanishing" in top.message
    unchecked = gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False, check_fixes=False)
    assert "flow_after_fix" not in unchecked.findings[0].evidence


def test_to_dict_layout_is_the_documented_one(batch) -> None:
    """The lab and other programs read these keys (see gradguard/explain/report.py)."""
    model = mlp(3, nn.ReLU, he)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = doctor(model, batch, nn.functional.cross_entropy, optimizer=optimizer, jacobian_iterations=5).to_dict()
    assert list(data) == ["verdict", "start_layer", "healthy", "loss", "total_grad_norm", "findings", "depth_flow",
                          "time_flow", "activations", "init_audit", "recurrent_bounds", "jacobian", "learning_rate",
                          "nonfinite", "notes", "attention"]
    assert data["attention"]["modules"] == [] and data["attention"]["log_z"]["classes"] == OUT
    assert set(data["attention"]) == {"modules", "log_z", "notes"}
    assert set(data["attention"]["log_z"]) == {"mean", "min", "max", "classes"}
    assert set(data["depth_flow"]) == {"layers", "input_error_signal", "growth_per_layer", "total_growth",
                                       "counted_gains", "verdict", "start_layer", "jump_gain"}
    assert set(data["depth_flow"]["layers"][0]) == {"name", "error_signal", "weight_grad", "weight_norm",
                                                    "grad_to_weight", "gain", "recurrent"}
    assert set(data["jacobian"]) == {"input_output", "blocks", "blocks_covered"}
    assert set(data["jacobian"]["blocks"]) == {"0", "2", "4"}
    assert set(data["learning_rate"][0]) == {"layer", "lr", "sgd_ratio", "update_ratio"}
    assert set(data["init_audit"][0]) == {"layer", "param", "activation", "scheme", "std", "prescribed", "ratio",
                                          "flagged", "xavier", "he"}


def test_conv_net_with_batch_norm_and_dropout_is_measured_and_its_modes_kept() -> None:
    """Jacobians run in eval mode (batch norm would update its statistics in place, dropout would change
    the function between power-iteration steps); the modules' own modes are restored."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model[3].eval()  # one module in another mode than the rest
    running_mean = model[1].running_mean.clone()
    batch = (torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,)))
    report = doctor(model, batch, nn.functional.cross_entropy, jacobian_iterations=5)
    assert report.jacobian["input_output"] is not None and not report.notes
    assert [m.training for m in model] == [True, True, True, False, True, True, True, True]
    # the doctor's training-mode forward would move batch norm's statistics: they are restored
    assert torch.equal(model[1].running_mean, running_mean) and int(model[1].num_batches_tracked) == 0
    checks = {c.layer: c for c in report.init_checks}
    assert checks["0"].scheme == "he" and checks["4"].scheme == "he" and checks["7"].scheme == "xavier"
    assert checks["0"].prescribed == pytest.approx((2 / (3 * 9)) ** 0.5) == pytest.approx(checks["0"].he)
    assert checks["7"].xavier == pytest.approx((2 / (8 * 36 + 10)) ** 0.5) == pytest.approx(checks["7"].prescribed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_diagnosed(dtype) -> None:
    """Norms accumulate in float32 whatever the dtype (grad_stats' per-tensor norms)."""
    model = mlp(6, nn.Tanh, standard_normal).to(dtype)
    batch = (torch.randn(16, IN, dtype=dtype), torch.randint(0, OUT, (16,)))
    report = doctor(model, batch, nn.functional.cross_entropy, jacobian_iterations=5)
    assert report.verdict == "exploding" and report.start_layer == "0"
    assert gg.locate_nonfinite(model, batch, nn.functional.cross_entropy) is None


def test_gg_doctor_is_a_plain_function_and_the_package_a_plain_module() -> None:
    """Issue 9.11: mypy said ``Module not callable`` on ``gg.doctor(...)`` (a package made callable by swapping
    its class). Checked by hand: ``mypy`` on the README's call reports no issue."""
    import types

    import gradguard.explain.report

    assert isinstance(gg.doctor, types.FunctionType) and gg.doctor is doctor
    assert type(gradguard.explain) is types.ModuleType
    assert gradguard.explain.report.DoctorReport is DoctorReport


def test_one_layer_off_scale_among_healthy_ones_is_named_as_a_jump(batch) -> None:
    """Issue 9.10: 20 He-initialised ReLU layers, one of them (module '20') 30x too large. The start is that
    layer, not the first one of a fit; the growth is a jump there; its fix rescales that layer alone."""
    torch.manual_seed(0)
    model = mlp(20, nn.ReLU, he)
    with torch.no_grad():
        model[20].weight.mul_(30.0)
    report = diagnose(model, batch)
    assert report.verdict == "exploding" and report.start_layer == "20"
    assert report.depth.jump_gain is not None and 15 < report.depth.jump_gain < 45
    assert report.depth.total_growth < 3 * report.depth.jump_gain  # the measured ratio, not a fit of a step
    top = report.findings[0]
    assert top.severity == "error" and top.layer == "20" and top.cause == "init_scale"
    assert "of it in one jump at '20'" in top.message
    assert top.fix.startswith('model.get_submodule("20").weight.data.mul_(0.0')
    assert top.evidence["flow_after_fix"] == "stable"
    direction = model[20].weight.detach() / model[20].weight.norm()
    apply_fix(top.fix, model, batch)
    assert torch.allclose(model[20].weight / model[20].weight.norm(), direction)  # trained direction kept
    assert diagnose(model, batch).verdict == "stable"


def test_headline_and_healthy_agree(batch) -> None:
    """Issue 9.9: a stable flow with an error finding (an update larger than the weights) says so."""
    model = mlp(3, nn.ReLU, he)
    report = diagnose(model, batch, optimizer=torch.optim.SGD(model.parameters(), lr=1e3))
    assert report.verdict == "stable" and not report.healthy
    assert str(report).splitlines()[0] == "gradguard doctor: STABLE flow; not healthy: 1 error finding(s) (learning_rate)"


def tanh_mlp_with_one_large_layer(width: int, gain: float, seed: int = 0) -> nn.Sequential:
    """Depth 10, tanh, Xavier with ``gain``; the 6th Linear (module '10') 20x too large."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(10):
        linear = nn.Linear(32 if i == 0 else width, 10 if i == 9 else width)
        nn.init.xavier_normal_(linear.weight, gain=gain)
        nn.init.zeros_(linear.bias)
        layers += [linear] + ([nn.Tanh()] if i < 9 else [])
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[10].weight.mul_(20.0)
    return model


@pytest.mark.parametrize(("width", "gain", "scale"), [(16, 5 / 3, 3.0), (64, 1.0, 0.1), (64, 5 / 3, 3.0)])
def test_one_layer_20x_too_large_in_a_depth_10_tanh_net_is_the_start_and_is_rescaled_alone(
        width: int, gain: float, scale: float) -> None:
    """Issue 18.4: a depth-10 tanh/Xavier MLP whose 6th Linear ('10') is 20x too large. Before: start_layer
    '0' and the error finding on '0' with "re-initialise everything" (tanh's gain 5/3 on every layer spreads
    the growth, the tanh after '10' hides its jump), or start '10' with the same re-initialisation. Now the
    layer off its peers' scale is the start, the error finding's layer, and its fix rescales it alone (to
    the peers' scale, whatever gain they were given), checked on a copy."""
    model = tanh_mlp_with_one_large_layer(width, gain)
    generator = torch.Generator().manual_seed(1)
    batch = (scale * torch.randn(64, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    report = diagnose(model, batch)
    assert report.verdict == "exploding" and report.start_layer == "10"
    error = next(f for f in report.findings if f.severity == "error")
    assert error.layer == "10" and error.cause == "init_scale"
    assert error.fix.startswith('model.get_submodule("10").weight.data.mul_(0.05')  # 1/20: the peers' scale
    assert "x20 that of the other layers" in error.message or "x19 that of the other layers" in error.message
    assert error.evidence["flow_after_fix"] == "stable"
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("10.")}
    apply_fix(error.fix, model, batch)
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)  # kept
    assert diagnose(model, batch, check_fixes=False).verdict == "stable"

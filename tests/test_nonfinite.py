"""gg.locate_nonfinite: the first module, in execution order, whose output or gradient holds NaN or Inf."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


class DivideByZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 0.0


class SqrtAtZero(nn.Module):
    """Finite forward (sqrt(0) = 0), infinite backward (d sqrt/dx = 1 / (2 sqrt(x)) at 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x - x.detach())


def ten_layers(seventh: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(10):
        if i == 6:
            layers.append(seventh)
        else:
            layers.append(nn.Linear(8, 8) if i % 2 == 0 else nn.Tanh())
    return nn.Sequential(*layers)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 8), torch.randn(4, 8)


def test_seventh_layer_dividing_by_zero_is_named_in_the_forward_pass(batch) -> None:
    origin = gg.locate_nonfinite(ten_layers(DivideByZero()), batch, nn.functional.mse_loss)
    assert origin is not None
    assert (origin.module, origin.phase, origin.kind) == ("6", "forward", "inf")
    assert origin.inputs_finite
    assert origin.inputs[0].nan == 0 and origin.inputs[0].inf == 0 and origin.inputs[0].shape == [4, 8]


def test_zero_divided_by_zero_is_nan(batch) -> None:
    model = ten_layers(DivideByZero())
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.zero_()  # layer 5 (tanh) then outputs 0, and 0 / 0 = NaN
    origin = gg.locate_nonfinite(model, batch, nn.functional.mse_loss)
    assert (origin.module, origin.phase, origin.kind) == ("6", "forward", "nan")


def test_inf_born_in_the_backward_pass_is_named_with_its_module(batch) -> None:
    origin = gg.locate_nonfinite(ten_layers(SqrtAtZero()), batch, nn.functional.mse_loss)
    assert (origin.module, origin.phase, origin.kind) == ("6", "backward", "inf")
    assert origin.grad_outputs and origin.grad_outputs[0].inf == 0  # the gradient came in finite


def test_non_finite_parameter_gradient_only(batch) -> None:
    """A module whose backward poisons its own weight gradient but not its input gradient."""

    class PoisonedWeightGrad(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight * torch.sqrt(self.weight.detach() - self.weight + 0.0)  # d/dw sqrt(0) = inf
            return nn.functional.linear(x.detach() + x - x.detach(), w.detach(), self.bias) + 0 * w.sum()

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), PoisonedWeightGrad(8, 8), nn.Tanh(), nn.Linear(8, 8))
    origin = gg.locate_nonfinite(model, batch, nn.functional.mse_loss)
    assert origin is not None and origin.module == "2" and origin.phase == "backward"


def test_loss_and_inputs_are_named_when_they_are_the_origin(batch) -> None:
    model = ten_layers(nn.Identity())
    bad_inputs = batch[0].clone()
    bad_inputs[0, 0] = float("nan")
    origin = gg.locate_nonfinite(model, (bad_inputs, batch[1]), nn.functional.mse_loss)
    assert (origin.module, origin.kind) == ("(inputs)", "nan")
    origin = gg.locate_nonfinite(model, batch, lambda out, y: (out - y).pow(2).mean().log() * float("inf"))
    assert (origin.module, origin.phase) == ("(loss_fn)", "forward")
    origin = gg.locate_nonfinite(model, batch, lambda out, y: ((out - y) * 0).sum().sqrt())
    assert (origin.module, origin.phase, origin.kind) == ("(loss_fn)", "backward", "nan")  # inf * 0


def test_all_finite_gives_none_and_leaves_grads_alone(batch) -> None:
    model = ten_layers(nn.Identity())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert gg.locate_nonfinite(model, batch, nn.functional.mse_loss) is None
    assert all(torch.all(p.grad == 1) for p in model.parameters())


def test_doctor_reports_the_origin_as_an_error(batch) -> None:
    report = gg.doctor(ten_layers(DivideByZero()), batch, nn.functional.mse_loss, jacobians=False)
    assert report.nonfinite is not None and report.start_layer == "6"
    assert report.findings[0].cause == "nonfinite" and report.findings[0].severity == "error"
    assert "'6'" in str(report)


def test_origin_prints_and_serialises(batch) -> None:
    origin = gg.locate_nonfinite(ten_layers(DivideByZero()), batch, nn.functional.mse_loss)
    assert str(origin).startswith("first INF: output of '6' in the forward pass")
    assert origin.to_dict()["inputs"][0]["shape"] == [4, 8]


def test_bad_arguments(batch) -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gg.locate_nonfinite(lambda x: x, batch, nn.functional.mse_loss)
    with pytest.raises(TypeError, match="batch must be an"):
        gg.locate_nonfinite(nn.Linear(8, 8), batch[0], nn.functional.mse_loss)


def test_overflow_of_a_growing_signal_is_traced_to_init_and_the_fix_is_checked() -> None:
    """60 linear layers with N(0, 9) weights: the forward signal grows ~12x per layer (3 * sqrt(16)) and
    overflows float32 mid-network; the doctor names the layer, says why, and checks its fix on a copy."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(60)])
    for layer in model:
        nn.init.normal_(layer.weight, std=3.0)
    batch = (torch.randn(8, 16), torch.randn(8, 16))
    report = gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False)
    top = report.findings[0]
    assert report.verdict == "exploding" and top.cause == "nonfinite"
    assert report.nonfinite.phase == "forward" and report.nonfinite.kind == "inf"
    assert "until float overflows" in top.message
    assert top.evidence["flow_after_fix"] == "stable"
    exec(top.fix, {"gg": gg, "nn": nn, "model": model, "batch": batch})
    assert gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False).verdict == "stable"
    assert "flow: not measured" in str(report)

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
    # The first non-finite gradient is d sqrt(u)/du at u = 0, Inf; the NaN at the model output (Inf * 0) follows.
    assert (origin.module, origin.phase, origin.kind, origin.op) == ("(loss_fn)", "backward", "inf", "SqrtBackward0")


def test_all_finite_gives_none_and_leaves_grads_alone(batch) -> None:
    model = ten_layers(nn.Identity())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert gg.locate_nonfinite(model, batch, nn.functional.mse_loss) is None
    assert all(torch.all(p.grad == 1) for p in model.parameters())


def test_doctor_reports_the_origin_as_an_error(batch) -> None:
    report = gg.doctor(ten_layers(DivideByZero()), batch, nn.functional.mse_loss, jacobians=False)
    assert report.verdict == "nonfinite"  # issue 9.9: not "exploding"
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
    with pytest.raises(ValueError, match=r"locate_nonfinite: a batch must be \(inputs, targets\)"):
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
    assert report.verdict == "nonfinite" and top.cause == "nonfinite"
    assert report.nonfinite.phase == "forward" and report.nonfinite.kind == "inf"
    assert "until float overflows" in top.message
    assert top.evidence["flow_after_fix"] == "stable"
    exec(top.fix, {"gg": gg, "nn": nn, "model": model, "batch": batch})
    assert gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False).verdict == "stable"
    assert "flow: not measured" in str(report)


class NaNGrad(torch.autograd.Function):
    """Identity forward; its backward makes every gradient NaN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class SqrtOfZeroBlock(nn.Module):
    """The issue's block: ``fc`` is fine; the block's own ``torch.sqrt`` makes ``dL/dh`` NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h + torch.sqrt(h * 0)


class HalfUsed(nn.Module):
    """Returns one of two outputs of one autograd node: the other one's gradient hook receives None."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.fc(x).chunk(2, dim=-1)
        return a


class Split(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.chunk(2, dim=-1)


class UsesFirstHalf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split = Split()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.split(x)  # the module output ``b`` takes no part in the loss
        return self.fc(a)


def test_module_output_without_gradient_does_not_crash(batch) -> None:
    """Issue 9.1: a gradient hook on an unused output of a multi-output node receives None."""
    model = nn.Sequential(nn.Linear(8, 8), UsesFirstHalf(), HalfUsed(), nn.Linear(8, 8))
    assert gg.locate_nonfinite(model, batch, nn.functional.mse_loss) is None
    report = gg.doctor(model, batch, nn.functional.mse_loss, jacobians=False, check_fixes=False)
    assert report.nonfinite is None and [layer.name for layer in report.depth.layers] == ["0", "1.fc", "2.fc", "3"]


def test_compiled_model_is_diagnosed_with_the_users_names(batch) -> None:
    """Issue 9.1: a torch.compile'd model (inductor, the default backend) runs eagerly under the doctor, and
    names lose torch.compile's ``_orig_mod.`` prefix, which stays in ``path``."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return NaNGrad.apply(self.fc(x))

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), HalfUsed(), Block(), nn.Linear(8, 8))
    compiled = torch.compile(model)
    origin = gg.locate_nonfinite(compiled, batch, nn.functional.mse_loss)
    assert (origin.module, origin.phase, origin.kind, origin.op) == ("3", "backward", "nan", "NaNGradBackward")
    assert origin.path == "_orig_mod.3"
    report = gg.doctor(compiled, batch, nn.functional.mse_loss, jacobians=False, check_fixes=False)
    assert report.start_layer == "3" and report.findings[0].layer == "3"
    healthy = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), HalfUsed(), nn.Linear(8, 8)))
    assert gg.locate_nonfinite(healthy, batch, nn.functional.mse_loss) is None
    optimizer = torch.optim.SGD(healthy.parameters(), lr=0.1)
    report = gg.doctor(healthy, batch, nn.functional.mse_loss, optimizer=optimizer, jacobians=False,
                       check_fixes=False)
    assert [layer.name for layer in report.depth.layers] == ["0", "2.fc", "3"]
    assert [u.layer for u in report.updates] == ["0", "2.fc", "3"]


def test_backward_nan_made_by_a_modules_own_op_is_blamed_on_that_module(batch) -> None:
    """Issue 9.2: ``fc``'s incoming dL/dy is NaN, but the op that made it (sqrt) runs in the block."""
    model = nn.Sequential(nn.Linear(8, 8), SqrtOfZeroBlock(), nn.Linear(8, 1))
    origin = gg.locate_nonfinite(model, (batch[0], batch[1][:, :1]), nn.functional.mse_loss)
    assert (origin.module, origin.phase, origin.op) == ("1", "backward", "SqrtBackward0")
    assert origin.grad_outputs[0].nan == 0  # the block's dL/dy came in finite


def test_forward_nan_made_by_a_modules_own_op_before_its_child_is_blamed_on_that_module(batch) -> None:
    class DividesThenProjects(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x) * 0 / 0)  # 0/0 in the block's own code; ``out`` receives NaN

    model = nn.Sequential(nn.Linear(8, 8), DividesThenProjects(), nn.Linear(8, 8))
    origin = gg.locate_nonfinite(model, batch, nn.functional.mse_loss)
    assert (origin.module, origin.phase, origin.kind, origin.inputs_finite) == ("1", "forward", "nan", True)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def gpt2_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_gpt2_autograd_function_around_a_module_is_blamed_on_that_module(gpt2) -> None:
    """Issue 9.2: a wrapper module whose own autograd.Function poisons the backward, around ``c_proj``."""

    class NaNGradAround(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return NaNGrad.apply(self.inner(x))

    mlp = gpt2.transformer.h[2].mlp
    original = mlp.c_proj
    mlp.c_proj = NaNGradAround(original)
    try:
        origin = gg.locate_nonfinite(gpt2, gpt2_batch())  # the loss is output.loss (labels in the batch)
    finally:
        mlp.c_proj = original
    assert (origin.module, origin.phase, origin.op) == ("transformer.h.2.mlp.c_proj", "backward", "NaNGradBackward")


def test_gpt2_nan_made_by_a_forward_hook_is_blamed_on_the_hooked_module(gpt2) -> None:
    handle = gpt2.transformer.h[2].mlp.register_forward_hook(lambda module, args, out: out + torch.sqrt(out * 0))
    try:
        origin = gg.locate_nonfinite(gpt2, gpt2_batch())
    finally:
        handle.remove()
    assert (origin.module, origin.phase) == ("transformer.h.2.mlp", "backward")
    handle = gpt2.transformer.h[2].mlp.register_forward_hook(lambda module, args, out: out / 0)
    try:
        origin = gg.locate_nonfinite(gpt2, gpt2_batch())
    finally:
        handle.remove()
    assert (origin.module, origin.phase) == ("transformer.h.2.mlp", "forward")
    assert gg.locate_nonfinite(gpt2, gpt2_batch()) is None

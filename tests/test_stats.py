"""grad_stats: one fused read of the gradients, per-layer and global norms, no host sync."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import count_host_syncs
from torch import nn

import gradguard as gg


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def backward(model: nn.Module) -> None:
    model(torch.randn(5, 6)).pow(2).sum().backward()


def reference_norm(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return torch.linalg.vector_norm(flat, p)


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_layer_and_total_norms_match_concatenated_gradients(p: float) -> None:
    model = mlp()
    backward(model)
    stats = gg.grad_stats(model, norm_type=p)
    assert stats.names == ["0", "2", "4"]
    for name, norm in zip(stats.names, stats.norms):
        layer = model.get_submodule(name)
        expected = reference_norm([q.grad for q in layer.parameters()], p)
        torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)
    expected_total = reference_norm([q.grad for q in model.parameters()], p)
    torch.testing.assert_close(stats.total_norm.double(), expected_total, rtol=1e-5, atol=0)
    # the global norm is also the norm of the layer norms
    torch.testing.assert_close(torch.linalg.vector_norm(stats.norms, p), stats.total_norm, rtol=1e-5, atol=0)
    assert bool(stats.finite)


def test_total_norm_is_bit_equal_to_torch_clip_grad_norm() -> None:
    model = mlp()
    backward(model)
    expected = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])
    assert torch.equal(gg.grad_stats(model).total_norm, expected)


def test_param_grouping_and_inputs() -> None:
    model = mlp()
    backward(model)
    by_param = gg.grad_stats(model, groups="param")
    assert by_param.names == [name for name, _ in model.named_parameters()]
    torch.testing.assert_close(by_param.norms[0], model[0].weight.grad.norm())
    unnamed = gg.grad_stats(list(model.parameters()))
    assert unnamed.names == [str(i) for i in range(6)]
    named = gg.grad_stats(model.named_parameters())
    assert named.names == ["0", "2", "4"]
    assert torch.equal(named.total_norm, unnamed.total_norm)


def test_parameters_without_grad_are_left_out() -> None:
    model = mlp()
    backward(model)
    model[2].weight.grad = None
    model[2].bias.grad = None
    stats = gg.grad_stats(model)
    assert stats.names == ["0", "4"]


def test_empty_parameter_list_is_zero_and_finite() -> None:
    stats = gg.grad_stats([])
    assert stats.total_norm.item() == 0.0
    assert stats.norms.numel() == 0
    assert bool(stats.finite)
    frozen = mlp()  # parameters, none with a gradient
    assert gg.grad_stats(frozen).names == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_nonfinite_gradient_names_its_layer(bad: float, p: float) -> None:
    model = mlp()
    backward(model)
    model[2].weight.grad[1, 3] = bad
    stats = gg.grad_stats(model, norm_type=p)
    assert not bool(stats.finite)
    finite_layers = torch.isfinite(stats.norms).tolist()
    assert finite_layers == [True, False, True]
    assert stats.names[finite_layers.index(False)] == "2"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    # 4096 elements of 300: the float16 sum of squares (3.7e8) overflows its max (65504); float32 does not.
    p = torch.zeros(4096, dtype=dtype, requires_grad=True)
    p.grad = torch.full((4096,), 300.0, dtype=dtype)
    stats = gg.grad_stats([p])
    assert stats.total_norm.dtype == torch.float32
    torch.testing.assert_close(stats.total_norm, torch.tensor(300.0 * 64), rtol=1e-3, atol=0)
    assert bool(stats.finite)


def test_mixed_dtypes_are_grouped_and_restored_to_parameter_order() -> None:
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    c = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    a.grad = torch.tensor([3.0, 0.0, 4.0])
    b.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    c.grad = torch.tensor([6.0, 8.0], dtype=torch.float64)
    stats = gg.grad_stats([a, b, c], groups="param")
    # a float64 gradient makes the norms float64, as torch.nn.utils.get_total_norm stacks them
    torch.testing.assert_close(stats.norms, torch.tensor([5.0, 1.0, 10.0], dtype=torch.float64))
    assert stats.total_norm.dtype == torch.nn.utils.get_total_norm([a.grad, b.grad, c.grad]).dtype


def test_sparse_gradient() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 1, 7])).sum().backward()
    assert emb.weight.grad.is_sparse
    stats = gg.grad_stats(emb)
    dense = emb.weight.grad.to_dense()
    torch.testing.assert_close(stats.total_norm, dense.norm())


def test_no_host_sync() -> None:
    model = mlp()
    backward(model)
    model[0].weight.grad[0, 0] = math.nan
    with count_host_syncs() as syncs:
        for p in (2.0, 1.0, math.inf):
            gg.grad_stats(model, norm_type=p)
            gg.grad_stats(model, groups="param", norm_type=p)
    assert syncs.count == 0


def test_counter_sees_a_host_sync() -> None:
    # The counter itself must be able to fail: .item() and a Python `if` on a tensor are syncs.
    with count_host_syncs() as syncs:
        t = torch.ones(())
        t.item()
        if t > 0:
            pass
    assert syncs.count == 2


def test_bad_arguments() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="groups must be one of"):
        gg.grad_stats(model, groups="layer")
    with pytest.raises(ValueError, match="norm_type must be > 0 or inf, got -1.0"):
        gg.grad_stats(model, norm_type=-1)
    with pytest.raises(TypeError, match="item 0 is str"):
        gg.grad_stats(["weight"])


def test_the_cached_layout_is_not_shared_with_the_caller() -> None:
    # names and groups are computed once per list of parameter names; each call still returns its own lists
    model = mlp()
    backward(model)
    first = gg.grad_stats(model)
    first.names.append("not a layer")
    first.group_index.clear()
    first.param_names[0] = "renamed"
    again = gg.grad_stats(model)
    assert again.names == ["0", "2", "4"] and again.group_index == [0, 0, 1, 1, 2, 2]
    assert again.param_names[0] == "0.weight"

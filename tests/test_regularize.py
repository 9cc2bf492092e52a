"""gg.regularize: the penalty's value and gradient, what it leaves out, and the optimizer groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def test_penalty_value_leaves_out_biases_and_normalization() -> None:
    net = model()
    weights = [net[0].weight, net[3].weight]
    expected = 0.1 * sum(w.abs().sum() for w in weights) + 0.5 * 0.01 * sum(w.square().sum() for w in weights)
    torch.testing.assert_close(gg.regularize.penalty(net, l1=0.1, l2=0.01), expected)
    everything = list(net.parameters())
    all_l2 = 0.5 * sum(p.square().sum() for p in everything)
    torch.testing.assert_close(
        gg.regularize.penalty(net, l2=1.0, include_biases=True, include_normalization=True), all_l2)


def test_l2_penalty_gradient_equals_sgd_weight_decay() -> None:
    net_a, net_b = model(), model()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    sgd_a = torch.optim.SGD(gg.regularize.param_groups(net_a, weight_decay=0.1), lr=0.5)
    sgd_b = torch.optim.SGD(net_b.parameters(), lr=0.5)
    nn.functional.mse_loss(net_a(x), y).backward()
    sgd_a.step()
    (nn.functional.mse_loss(net_b(x), y) + gg.regularize.penalty(net_b, l2=0.1)).backward()
    sgd_b.step()
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b)


def test_param_groups_cover_every_parameter_once() -> None:
    net = model()
    groups = gg.regularize.param_groups(net, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(net[0].weight), id(net[3].weight)}
    torch.optim.AdamW(groups, lr=1e-3)


def test_recurrent_biases_are_biases() -> None:
    rnn = nn.RNN(3, 5)
    decayed = [n for n, _ in gg.regularize.decayed_parameters(rnn)[0]]
    assert decayed == ["weight_ih_l0", "weight_hh_l0"]


def test_bad_coefficients() -> None:
    with pytest.raises(ValueError, match="penalty: l1 must be >= 0"):
        gg.regularize.penalty(model(), l1=-1.0)
    with pytest.raises(ValueError, match="param_groups: weight_decay must be >= 0"):
        gg.regularize.param_groups(model(), weight_decay=-0.1)

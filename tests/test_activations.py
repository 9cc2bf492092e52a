"""gg.activations: kinds and replace_."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg


def test_replace_swaps_every_instance_including_nested_ones() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), nn.Tanh())
    replaced = gg.activations.replace_(model, nn.Sigmoid, nn.ReLU)
    assert replaced == ["1", "2.1"]
    assert isinstance(model[1], nn.ReLU) and isinstance(model[2][1], nn.ReLU) and isinstance(model[3], nn.Tanh)
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_replace_with_an_instance_copies_it_per_place() -> None:
    model = nn.Sequential(nn.ReLU(), nn.ReLU())
    gg.activations.replace_(model, nn.ReLU, nn.LeakyReLU(0.3))
    assert model[0] is not model[1] and model[0].negative_slope == 0.3


def test_replace_nothing_to_replace_and_bad_arguments() -> None:
    assert gg.activations.replace_(nn.Linear(2, 2), nn.Sigmoid, nn.ReLU) == []
    with pytest.raises(TypeError, match="old must be an nn.Module class"):
        gg.activations.replace_(nn.Linear(2, 2), "sigmoid", nn.ReLU)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        gg.activations.replace_(nn.Sequential(nn.Sigmoid()), nn.Sigmoid, lambda: 3)


def test_kinds_and_derivative_bounds() -> None:
    assert gg.activations.activation_kind(nn.ReLU()) == "relu"
    assert gg.activations.activation_kind(nn.Tanh()) == "tanh"
    assert gg.activations.activation_kind(nn.Linear(2, 2)) is None
    assert gg.activations.derivative_bound("sigmoid") == 0.25
    assert gg.activations.derivative_bound("tanh") == 1.0

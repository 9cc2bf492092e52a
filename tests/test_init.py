"""gg.init: Xavier, He, orthogonal, LSUV and auto_, each against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.init import following_activations, prescribed_std


def test_xavier_and_he_give_their_std() -> None:
    layer = nn.Linear(400, 200)
    gg.init.xavier_(layer)
    assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / 600), rel=0.02)
    assert torch.all(layer.bias == 0)
    gg.init.he_(layer)
    assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    gg.init.he_(layer, negative_slope=0.5)
    assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / (1.25 * 400)), rel=0.02)


def test_conv_fans_include_the_kernel() -> None:
    conv = nn.Conv2d(16, 32, kernel_size=3)
    gg.init.he_(conv)
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.03)


def test_orthogonal_recurrent_weights_per_gate_block() -> None:
    lstm = nn.LSTM(8, 16)
    gg.init.orthogonal_(lstm)
    for block in lstm.weight_hh_l0.detach().chunk(4, dim=0):
        torch.testing.assert_close(block.T @ block, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.all(lstm.bias_hh_l0 == 0)


def test_auto_picks_by_the_following_activation() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Dropout(), nn.Tanh(),
                          nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64))
    chosen = gg.init.auto_(model)
    assert chosen == {"0": "he", "2": "xavier", "5": "he", "7": "xavier"}
    assert float(model[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert float(model[2].weight.detach().std()) == pytest.approx(math.sqrt(1 / 64), rel=0.05)
    assert float(model[5].weight.detach().std()) == pytest.approx(math.sqrt(2 / (1.04 * 64)), rel=0.05)


def test_auto_makes_recurrent_hidden_weights_orthogonal() -> None:
    rnn = nn.RNN(4, 32)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(10)
    assert gg.init.auto_(rnn) == {"": "recurrent"}
    assert float(torch.linalg.matrix_norm(rnn.weight_hh_l0.detach(), 2)) == pytest.approx(1.0, abs=1e-5)


def test_auto_with_inputs_uses_execution_order_and_finds_hand_written_cells() -> None:
    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 12)
            self.rec = nn.Linear(12, 12)

        def forward(self, x, h):
            return torch.tanh(self.inp(x) + self.rec(h))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()  # registered before the layer it follows
            self.head = nn.Linear(12, 12)
            self.cell = Cell()

        def forward(self, x):
            h = x.new_zeros(x.shape[0], 12)
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
            return self.act(self.head(h))

    model = Model()
    x = torch.randn(2, 5, 3)
    assert following_activations(model, x)["head"] is model.act
    chosen = gg.init.auto_(model, x)
    assert chosen["head"] == "he" and chosen["cell.rec"] == "orthogonal"
    assert float(torch.linalg.matrix_norm(model.cell.rec.weight.detach(), 2)) == pytest.approx(1.0, abs=1e-5)


def test_lsuv_reaches_unit_output_variance() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(256, 32) * 5
    reached = gg.init.lsuv_(model, x, tol=0.05)
    assert set(reached) == {"0", "2", "4"}
    assert all(abs(v - 1.0) < 0.05 for v in reached.values())
    assert gg.init.lsuv_(model, (x, None), tol=0.05).keys() == reached.keys()  # an (inputs, targets) pair


def test_prescribed_std_per_activation() -> None:
    w = torch.empty(10, 30)
    assert prescribed_std(w, nn.ReLU()) == ("he", pytest.approx(math.sqrt(2 / 30)))
    assert prescribed_std(w, nn.Tanh()) == ("xavier", pytest.approx(math.sqrt(2 / 40)))
    assert prescribed_std(w, None) == ("xavier", pytest.approx(math.sqrt(2 / 40)))
    assert prescribed_std(w, nn.SELU()) == ("he", pytest.approx(math.sqrt(1 / 30)))


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="xavier_: module must be an nn.Module"):
        gg.init.xavier_(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lsuv_: tol must be > 0"):
        gg.init.lsuv_(nn.Linear(2, 2), torch.randn(4, 2), tol=0)


def test_chrono_sets_gate_biases_to_log_uniform_spans() -> None:
    lstm, gru = nn.LSTM(3, 64), nn.GRU(3, 64)
    gg.init.chrono_(lstm, max_steps=50)
    i_gate, f_gate = lstm.bias_ih_l0.detach().chunk(4)[:2]
    assert torch.all(f_gate >= 0) and torch.all(f_gate <= math.log(49) + 1e-6)
    torch.testing.assert_close(i_gate, -f_gate)
    assert torch.all(lstm.bias_hh_l0.detach().chunk(4)[1] == 0)
    assert float(f_gate.std()) > 0.3  # spread over the spans, not one value
    gg.init.chrono_(gru, max_steps=50)
    update = gru.bias_ih_l0.detach().chunk(3)[1]
    assert torch.all(update >= 0) and torch.all(gru.bias_hh_l0.detach().chunk(3)[1] == 0)
    with pytest.raises(ValueError, match="holds no LSTM or GRU"):
        gg.init.chrono_(nn.RNN(3, 4), max_steps=10)
    with pytest.raises(ValueError, match="max_steps must be >= 3"):
        gg.init.chrono_(lstm, max_steps=2)

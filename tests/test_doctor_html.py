"""report.to_html: one self-contained page with the flow plots and the tables."""

from __future__ import annotations

import re

import torch
from torch import nn

import gradguard as gg


def test_html_page_is_self_contained_with_depth_and_time_plots(tmp_path) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 8, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return self.mlp(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    batch = (torch.randn(4, 6, 3), torch.randn(4, 1))
    report = gg.doctor(Model(), batch, nn.functional.mse_loss, jacobian_iterations=5)
    page = report.to_html(tmp_path / "doctor.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<img alt="gradient flow across (depth|time)" src="data:image/png;base64,', page)) == 2
    assert not re.search(r'(src|href)="(http|//|/)', page)  # nothing fetched from elsewhere
    for heading in ("Findings", "Gradient flow across depth", "Gradient flow across time", "Init audit",
                    "Activations", "Jacobian spectral norms"):
        assert f"<h2>{heading}</h2>" in page
    assert "<code>mlp.0</code>" in page and "weight_hh_l0" in page


def test_html_escapes_module_names(tmp_path) -> None:
    model = nn.Sequential()
    model.add_module("<b>x</b>", nn.Linear(2, 2))
    report = gg.doctor(model, (torch.randn(3, 2), torch.randn(3, 2)), nn.functional.mse_loss, jacobians=False)
    page = report.to_html(tmp_path / "p.html").read_text()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page

"""A model for ``gradguard doctor``: a deep tanh MLP initialised the way many tutorials do it, N(0, 1).

    gradguard doctor examples/doctor_example.py:build
    gradguard doctor examples/doctor_example.py:build --html doctor.html

``build()`` returns ``(model, batch, loss_fn, optimizer)``; the optimizer is optional for the doctor (it
measures the size of one update with it). The doctor finds the error signal exploding from the first layer,
the weights 8x too large for tanh, most tanh units saturated, and an update larger than the weights; its
fix, ``gg.init.auto_(model)``, makes the flow stable (``build(fixed=True)`` shows the result).
"""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg

DEPTH, WIDTH, FEATURES, CLASSES, BATCH = 16, 64, 20, 5, 128


def build(fixed: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module,
                                        torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(FEATURES if i == 0 else WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)  # the mistake: std 1 whatever the fan-in
            nn.init.zeros_(module.bias)
    if fixed:
        gg.init.auto_(model)
    inputs = torch.randn(BATCH, FEATURES)
    targets = torch.randint(0, CLASSES, (BATCH,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, (inputs, targets), nn.CrossEntropyLoss(), optimizer


def build_fixed() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module, torch.optim.Optimizer]:
    """The same model after the doctor's fix: ``gradguard doctor examples/doctor_example.py:build_fixed``."""
    return build(fixed=True)


if __name__ == "__main__":
    print(gg.doctor(*build()[:3], optimizer=build()[3]))

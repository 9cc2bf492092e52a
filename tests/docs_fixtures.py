"""The objects a documentation page's snippets assume (``<!-- docs-test: setup NAME -->`` on the page).

A how-to page shows the lines that change a user's loop, not the model and data around them; the page
names the setup it assumes, and the block runner (``test_docs_blocks.py``) makes it here before the page's
first block. Each setup is small (a few thousand parameters) so that a page runs in well under a second.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def loop() -> dict[str, Any]:
    """A small regression MLP, its optimizer and loss, 40 batches, and one batch's loss (not yet backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = nn.MSELoss()
    w = torch.randn(8, 1)
    data = []
    for _ in range(40):
        x = torch.randn(16, 8)
        data.append((x, torch.tanh(x @ w)))
    inputs, targets = data[0]
    loss = loss_fn(model(inputs), targets)
    return {
        "model": model,
        "optimizer": optimizer,
        "loss_fn": loss_fn,
        "data": data,
        "inputs": inputs,
        "targets": targets,
        "batch": (inputs, targets),
        "loss": loss,
    }


def torchrun() -> dict[str, Any]:
    """``loop``, in a process that torchrun could have started: the environment of a one-rank world."""
    import socket

    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return loop()


SETUPS = {"loop": loop, "torchrun": torchrun}

"""TensorBoard: a Guard that writes gradient norms, clip coefficients, skips and per-layer norms.

    python examples/tensorboard_example.py [--steps 100] [--logdir gradguard-out/tb]
    tensorboard --logdir gradguard-out/tb

Tags: ``gradguard/total_norm``, ``gradguard/coef``, ``gradguard/skipped``, ``gradguard/clipped``,
``gradguard/loss``, ``gradguard/lr`` and one group ``gradguard_layers/<layer>`` of per-layer norms.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def main(steps: int = 100, logdir: str = "gradguard-out/tb") -> gg.Guard:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(
        model, optimizer, clip=gg.clip.GlobalNorm(1.0), log_every=10, layer_every=5,
        sinks=[gg.sinks.TensorBoard(logdir)],
    )  # fmt: skip
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    print(f"{guard.summary()}; run: tensorboard --logdir {logdir}")
    return guard


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--logdir", default="gradguard-out/tb")
    args = parser.parse_args()
    main(args.steps, args.logdir)

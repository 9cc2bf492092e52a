"""Plain PyTorch: a training loop with a Guard, a JSON Lines log, and the run report.

A small MLP learns a regression; batch 40 holds a NaN and batch 80 is scaled by 1e4. The Guard skips the
first, clips the second, and the run ends with finite weights. Then ``gradguard report`` renders the log.

    python examples/plain_pytorch.py [--steps 200] [--out gradguard-out/plain]
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

import gradguard as gg
from gradguard.report.run import read_jsonl, render_run_report


def batches(
    steps: int, nan_at: int, scaled_at: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    data = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.tanh(x @ w)
        if step == nan_at:
            x[0, 0] = math.nan
        if step == scaled_at:
            x = x * 1e4
        data.append((x, y))
    return data


def main(
    steps: int = 200, out: str = "gradguard-out/plain", nan_at: int = 40, scaled_at: int = 80,
    sinks: Sequence[gg.sinks.Sink] = (),
) -> gg.Guard:
    """The run; ``sinks`` are added to the JSON Lines log (the tracker examples pass theirs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    log = os.path.join(out, "run.jsonl")
    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip(max_grad_norm=None), sinks=[gg.sinks.JSONL(log), *sinks])
    loss_fn = nn.MSELoss()
    for x, y in batches(steps, nan_at, scaled_at):
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss)  # measures, decides, clips, steps the optimizer or skips
        optimizer.zero_grad(set_to_none=True)
    guard.close()  # flushes the last records

    report = os.path.join(out, "report.html")
    with open(report, "w", encoding="utf-8") as file:
        file.write(render_run_report(read_jsonl(log)))
    print(f"{guard.summary()}; log {log}; report {report}")
    return guard


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="gradguard-out/plain")
    args = parser.parse_args()
    main(args.steps, args.out)

"""LR back-off earned and undone: where the learning rate ends after a long run of harmless skips.

Two runs of a small regression MLP (16 -> 64 -> 1, tanh, plain SGD at lr 0.05, batch 32) under
``gg.Guard(model, opt)`` at its recovery defaults:

* ``nan_every_10th``: every 10th batch gives a NaN gradient (the loss stays healthy): the Guard skips it;
  the LR should stay near the start (target: >= 0.5x the starting LR at the end);
* ``fp16_scaler``: fp16 autocast with ``torch.amp.GradScaler(growth_interval=5)``: the scaler doubles its
  scale every 5 clean steps and overflows routinely (each overflow a skipped step); the LR should end at
  the starting LR (the scaler backs off its scale, that is its job).

Prints, per run, the steps, skips, LR back-offs, rollbacks, the final LR over the starting LR and the step
of the last good snapshot (harmless skips must not stop snapshots: a rollback late in the run should not
throw the whole run away; with a snapshot due every 25 steps, it should be within the last 50).

    python benchmarks/lr_ratchet.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import gradguard as gg

LR = 0.05


def _batch(i: int) -> torch.Tensor:
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(i))


def run(kind: str, steps: int, seed: int = 0) -> dict[str, float]:
    """One run; returns its summary and ``lr_ratio`` (final LR / starting LR)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", growth_interval=5) if kind == "fp16_scaler" else None
    guard = gg.Guard(model, optimizer, scaler=scaler)
    for i in range(steps):
        x = _batch(seed * 100_000 + i)
        if scaler is not None:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), x[:, :1].sin())
            scaler.scale(loss).backward()
        else:
            loss = nn.functional.mse_loss(model(x), x[:, :1].sin())
            loss.backward()
            if i % 10 == 9:
                model[0].weight.grad[0, 0] = math.nan
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    summary = guard.summary()
    return {**summary, "lr_ratio": optimizer.param_groups[0]["lr"] / LR,
            "snapshot_step": -1 if guard.recovery.snapshot.step is None else guard.recovery.snapshot.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    print(f"{'run':<16}{'seed':>5}{'steps':>7}{'skipped':>9}{'backoffs':>10}{'rollbacks':>10}{'lr/lr0':>10}{'last snapshot':>15}")
    for kind in ("nan_every_10th", "fp16_scaler"):
        for seed in range(args.seeds):
            r = run(kind, args.steps, seed)
            print(f"{kind:<16}{seed:>5}{r['steps']:>7}{r['skipped']:>9}{r['lr_backoffs']:>10}{r['rollbacks']:>10}"
                  f"{r['lr_ratio']:>10.3g}{r['snapshot_step']:>15}")


if __name__ == "__main__":
    main()

"""Weights & Biases: the plain-PyTorch run (a NaN batch skipped, a scaled one clipped) logged to a W&B run.

    python examples/wandb_example.py [--steps 200] [--out gradguard-out/wandb] [--online]
    wandb sync gradguard-out/wandb/wandb/offline-run-*      # upload an offline run later

Offline by default (no account needed): the run is written under ``--out``. The one line that adds W&B to a
Guard is ``gg.sinks.WandB(project=...)``; the run then holds every step's ``gradguard/*`` scalars against
``gradguard/step``, the events as ``gradguard_events/<kind>/<layer>`` and as the ``gradguard/events`` table,
per-layer norms (histogram, summary, the top layers), and at the end the records and the run report as the
artifact ``gradguard-<run id>``.
"""

from __future__ import annotations

import argparse
import os

import plain_pytorch

import gradguard as gg


def main(steps: int = 200, out: str = "gradguard-out/wandb", nan_at: int = 40, scaled_at: int = 80,
         online: bool = False) -> tuple[gg.Guard, gg.sinks.WandB]:
    os.makedirs(out, exist_ok=True)
    # --8<-- [start:tracker]
    tracker = gg.sinks.WandB(project="gradguard-example", dir=out, mode="online" if online else "offline")
    # --8<-- [end:tracker]
    guard = plain_pytorch.main(steps, out, nan_at, scaled_at, sinks=[tracker])
    print(f"W&B run {tracker.run.id}: {tracker.totals}; files in {os.path.dirname(tracker.run.dir)}")
    return guard, tracker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="gradguard-out/wandb")
    parser.add_argument("--online", action="store_true", help="log to wandb.ai (needs `wandb login`)")
    args = parser.parse_args()
    main(args.steps, args.out, online=args.online)

"""Amortized cost of the update-size signal (``gradguard.update_size``) on a realistic model.

bench_guard's 10M-parameter TinyGPT on the CPU: thread CPU time of ``guard.step`` (optimizer step included)
with the Guard's defaults (update size on: a copy of the weights every 10th step, measured at the next) and
with ``Detector(update_size=None)``, plain and fused AdamW, over blocks of consecutive steps (sampled steps
included, so the figure is amortized), the variants interleaved in rounds. The share is of a whole training
step (forward + backward + the guarded step).

    python benchmarks/bench_update_size.py [--rounds 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_guard import TinyGPT
from torch import nn

import gradguard as gg

VOCAB, WIDTH, LAYERS, HEADS, CONTEXT, BATCH = 8192, 320, 6, 8, 128, 8


def make_variant(model: nn.Module, fused: bool, guard: bool, update_size: bool):
    """A copy of the model, its AdamW, and the step to time (``guard.step`` or a bare ``optimizer.step``)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    if not guard:
        return model, lambda loss: optimizer.step()
    # warm-ups of 3 steps: the timed steps are steady steps
    detector = gg.detect.Detector(warmup_steps=3, precursor=gg.precursor.Precursor(warmup_steps=3),
                                  **({} if update_size else {"update_size": None}))
    g = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(1.0), detector=detector)
    return model, g.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the first is a warm-up, not counted)")
    parser.add_argument("--steps", type=int, default=40, help="consecutive steps per variant and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, WIDTH, LAYERS, HEADS, CONTEXT)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    variants = {
        "bare plain": make_variant(model, False, False, False),
        "guard plain, update size off": make_variant(model, False, True, False),
        "guard plain (defaults)": make_variant(model, False, True, True),
        "bare fused": make_variant(model, True, False, False),
        "guard fused, update size off": make_variant(model, True, True, False),
        "guard fused (defaults)": make_variant(model, True, True, True),
    }
    idx = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    start = time.thread_time()
    loss = loss_fn(model(idx[:, :-1]), idx[:, 1:])
    loss.backward()
    forward_backward = time.thread_time() - start
    grads = [p.grad.clone() for p in model.parameters()]
    loss = loss.detach()
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (copy_, step) in variants.items():
            total = 0.0
            for _ in range(args.steps):
                for param, grad in zip(copy_.parameters(), grads):
                    param.grad = grad.clone()
                start = time.thread_time()
                step(loss)
                total += time.thread_time() - start
            if round_ > 0:
                per_step[name].append(total / args.steps)
    print(f"TinyGPT {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, 1 thread; "
          f"forward + backward {forward_backward * 1e3:.0f} ms")
    for name, values in per_step.items():
        print(f"  {name:32s} {statistics.median(values) * 1e3:8.2f} ms/step (median of {len(values)} rounds "
              f"of {args.steps} steps)")
    for path in ("plain", "fused"):
        off = statistics.median(per_step[f"guard {path}, update size off"])
        on = statistics.median(per_step[f"guard {path} (defaults)"])
        print(f"{path}: the update size adds {(on - off) * 1e3:+.2f} ms/step, "
              f"{(on - off) / (forward_backward + on) * 100:+.2f}% of a whole step")


if __name__ == "__main__":
    main()

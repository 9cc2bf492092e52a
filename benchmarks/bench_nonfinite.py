"""Cost of ``gg.locate_nonfinite`` against one plain training step, measured in one run.

A plain step is ``zero_grad; loss = loss_fn(model(x), y); loss.backward(); optimizer.step()`` (SGD).
``locate_nonfinite`` runs one forward and one backward pass with a finiteness flag per module output and
per gradient each autograd node makes, plus the ``grad_stats`` read of the parameter gradients (the
all-finite case, where it has to go through both passes). The two are interleaved, timed with ``time.perf_counter`` (with
``torch.cuda.synchronize`` on a GPU), and the median of the repeats is reported, as a ratio. The issue asks
for a ratio under 3.

    python benchmarks/bench_nonfinite.py [--layers 16] [--width 512] [--batch 256] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradguard as gg


def mlp(layers: int, width: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*modules, nn.Linear(width, 10))


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = mlp(args.layers, args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_fn = nn.functional.cross_entropy

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def locate() -> None:
        assert gg.locate_nonfinite(model, (x, y), loss_fn) is None

    for _ in range(3):  # warm-up: allocator, kernels, lazy imports
        training_step()
        locate()
    step_times, locate_times = [], []
    for _ in range(args.repeats):
        step_times.append(timed(training_step, device))
        locate_times.append(timed(locate, device))
    step, found = statistics.median(step_times), statistics.median(locate_times)
    modules = sum(1 for _ in model.modules()) - 1
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {args.layers} x (Linear {args.width} + LayerNorm + GELU) + head = {modules} modules, "
          f"batch {args.batch}, median of {args.repeats}")
    print(f"plain training step     {step * 1e3:8.2f} ms   1.00x")
    print(f"gg.locate_nonfinite     {found * 1e3:8.2f} ms   {found / step:.2f}x   (issue: < 3x)")


if __name__ == "__main__":
    main()

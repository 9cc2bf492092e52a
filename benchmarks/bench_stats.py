"""Cost of gradguard's statistics and clippers next to torch's clipping and the zclip package.

Gradients of a transformer-like parameter set (~40M parameters in ~100 tensors), all measured in one
run, interleaved, median of repeats. Prints:

* grad_stats' achieved bandwidth against torch.sum over the same bytes (one read of memory: the limit);
* each clipper's time as a ratio of torch.nn.utils.clip_grad_norm_ on the same gradients;
* ZClip against the zclip package, and the host syncs each makes per call.

Two clipping regimes: "no clip" (the threshold is above the norm: torch and GlobalNorm still multiply by
1.0, the zclip package skips its scaling pass but reads the norm back to the host) and "clip" (the
threshold is below the norm, so every method scales; the gradients are restored before each call and the
restore's own time is subtracted).

    python benchmarks/bench_stats.py [--layers 8] [--width 640] [--repeats 15] [--threads N]

On the CPU, torch's 2-norm kernel (``_foreach_norm`` / ``vector_norm``, what ``clip_grad_norm_`` uses)
runs on one thread while ``torch.sum`` uses them all: with several threads the bandwidth ratio measures
that kernel, not grad_stats; compare ``grad_stats`` with the ``foreach_norm`` row, or run ``--threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradguard as gg
from gradguard.clip import AGC, AutoClip, GlobalNorm, LayerNorm, Value, ZClip


def transformer_like(layers: int, width: int, vocab: int) -> nn.Module:
    """Parameter shapes of a GPT block stack: qkv, proj, mlp (4x), two LayerNorms per block."""

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "ln1": nn.LayerNorm(width),
                "qkv": nn.Linear(width, 3 * width),
                "proj": nn.Linear(width, width),
                "ln2": nn.LayerNorm(width),
                "fc1": nn.Linear(width, 4 * width),
                "fc2": nn.Linear(4 * width, width),
            }
        )

    return nn.ModuleDict(
        {
            "embed": nn.Embedding(vocab, width),
            "blocks": nn.ModuleList(block() for _ in range(layers)),
            "ln_f": nn.LayerNorm(width),
        }
    )


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def norm_throughput(model: nn.Module, grads: list[torch.Tensor], repeats: int) -> None:
    """``gg.grad_stats(model)`` (per-tensor, per-layer and total norms, names) against ``torch._foreach_norm``
    over the same gradients (the per-tensor norms alone): timed in adjacent pairs, in alternating order,
    so that both see the same load; the ratio of each pair, then their median and spread."""
    ratios = []
    for i in range(repeats + 2):
        pair = [("grad_stats", lambda: gg.grad_stats(model)), ("foreach", lambda: torch._foreach_norm(grads, 2.0))]
        times = {}
        for name, fn in pair if i % 2 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        if i >= 2:
            ratios.append(times["foreach"] / times["grad_stats"])
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"  grad_stats throughput / torch._foreach_norm's: {statistics.median(ratios):.3f} (median of "
          f"{len(ratios)} adjacent pairs; quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}; target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--norm-repeats", type=int, default=41, help="pairs timed for grad_stats / _foreach_norm")
    parser.add_argument("--norms-only", action="store_true", help="stop after the reads (no clipping sections)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = transformer_like(args.layers, args.width, args.vocab)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    saved = [p.grad.clone() for p in params]
    grads = [p.grad for p in params]
    n_params = sum(p.numel() for p in params)
    n_bytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.cat([g.flatten() for g in grads])
    norm = gg.grad_stats(params).total_norm.item()
    print(
        f"{n_params / 1e6:.1f}M parameters in {len(params)} tensors ({n_bytes / 2**20:.0f} MiB of gradients), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, total norm {norm:.3f}"
    )

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    # --- bandwidth: grad_stats vs one plain read (torch.sum) --------------------------------------------
    rounds: dict[str, list[float]] = {
        "sum": [],
        "grad_stats": [],
        "grad_stats(param)": [],
        "foreach_norm": [],
    }
    for _ in range(args.repeats):
        rounds["sum"] += timed(lambda: torch.sum(flat), 1)
        rounds["grad_stats"] += timed(lambda: gg.grad_stats(model), 1)
        rounds["grad_stats(param)"] += timed(lambda: gg.grad_stats(model, groups="param"), 1)
        rounds["foreach_norm"] += timed(lambda: torch._foreach_norm(grads, 2.0), 1)
    base = statistics.median(rounds["sum"])
    print("\none read of the gradients (median):")
    for name, times in rounds.items():
        t = statistics.median(times)
        print(
            f"  {name:20s} {t * 1e3:8.2f} ms  {n_bytes / t / 1e9:6.1f} GB/s  {base / t:6.1%} of torch.sum's bandwidth"
        )
    norm_throughput(model, grads, args.norm_repeats)
    if args.norms_only:
        return

    zclip = None
    try:
        import zclip as zclip_package

        zclip = zclip_package
    except ImportError:
        print("\n(zclip not installed: `pip install zclip==1.0.0` to compare with it)")

    for regime, threshold in (("no clip", 10 * norm), ("clip", norm / 2)):
        methods: dict[str, Callable[[], object]] = {
            "torch.clip_grad_norm_": lambda t=threshold: torch.nn.utils.clip_grad_norm_(params, t),
            "GlobalNorm": (lambda c: lambda: c(model))(GlobalNorm(threshold)),
            "torch.clip_grad_value_": lambda t=threshold: torch.nn.utils.clip_grad_value_(params, t / 1e3),
            "Value": (lambda c: lambda: c(model))(Value(threshold / 1e3)),
            "LayerNorm": (lambda c: lambda: c(model))(LayerNorm(threshold)),
            "AGC": (lambda c: lambda: c(model))(AGC(clipping=1e3 if regime == "no clip" else 1e-4)),
            "AutoClip": (lambda c: lambda: c(model))(
                AutoClip(percentile=10.0 if regime == "clip" else 100.0)
            ),
            "ZClip": (lambda c: lambda: c(model))(ZClip(warmup_steps=2, max_grad_norm=threshold)),
        }
        if zclip is not None:
            package = zclip.ZClip(warmup_steps=2, max_grad_norm=threshold)
            methods["zclip package"] = lambda z=package: z.step(model)
        for fn in methods.values():  # run the stateful ones past their warm-up
            for _ in range(3):
                restore()
                fn()
        results: dict[str, list[float]] = {name: [] for name in methods}
        restores: list[float] = []
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                restore()
                mid = time.perf_counter()
                fn()
                end = time.perf_counter()
                restores.append(mid - start)
                results[name].append(end - mid)
        syncs: dict[str, int] = {}
        for name, fn in methods.items():
            restore()
            with gg.count_host_syncs() as counter:
                fn()
            syncs[name] = counter.count
        torch_time = statistics.median(results["torch.clip_grad_norm_"])
        print(f"\nclipping, regime '{regime}' (threshold {threshold:.3f}; median of {args.repeats}):")
        for name, times in results.items():
            t = statistics.median(times)
            print(
                f"  {name:22s} {t * 1e3:8.2f} ms  {t / torch_time:5.2f}x torch  host syncs/call: {syncs[name]}"
            )
        if zclip is not None:
            ratio = statistics.median(results["ZClip"]) / statistics.median(results["zclip package"])
            print(f"  ZClip / zclip package: {ratio:.2f}x")
    restore()


if __name__ == "__main__":
    main()

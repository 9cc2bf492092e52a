"""Cost of a guarded training step: a small causal transformer (~10M parameters) on the CPU.

Ways to take the same optimizer step, each on its own copy of the model and optimizer, measured in one
run, interleaved round by round in rotating order, medians over the rounds:

* ``bare``: ``optimizer.step()`` (AdamW, torch's default implementation);
* ``torch clip``: ``torch.nn.utils.clip_grad_norm_(max_norm=1)`` then ``optimizer.step()``;
* ``zclip pkg``: the ``zclip`` package's ``ZClip().step(model)`` then ``optimizer.step()``;
* ``guard``: ``gg.Guard(model, AdamW, clip=GlobalNorm(1))``, ``guard.step(loss)``;
* ``guard compiled``: the same with ``compile=True`` (the step's device arithmetic through ``torch.compile``);
* ``bare fused`` / ``guard fused`` / ``guard fused compiled``: the same with ``AdamW(fused=True)``: the Guard
  passes the clip coefficient as ``grad_scale`` and the skip flag as ``found_inf``;
* ``guard forensics`` / ``guard fused forensics``: the Guards with ``forensics=gg.Forensics(loss_fn=...)``
  and ``guard.step(loss, batch=batch)``: on healthy steps forensics keeps references (the batch, the
  layer norms, the random-number state) and, on the fused path, reads the event flags once.

Each round runs forward and backward once, on a reference copy of the model, and gives every variant a
copy of those gradients (not timed): the variants are timed on the same gradients, and the round costs
one backward pass rather than one per variant. What is timed is the optimizer phase (everything after
backward: clipping, guarding, ``optimizer.step()``, ``zero_grad``), where the overhead of clipping lives.
Overhead = (median phase of the variant - median phase of its bare baseline), also as a % of the bare
step (forward + backward + the bare phase). The Guards' detector warm-ups are shortened to 3 steps and the
first ``--warmup`` rounds are not timed, so the timed rounds are steady steps (as every step of a real run
after its 25th), compiled where asked. Both wall-clock time and the thread's CPU time
(``time.thread_time``) are reported: on a shared machine the wall clock also counts the time other
processes held the core; with ``--threads 1`` all of torch's work runs on the timed thread, so CPU time
is the cost itself. The Guard flushes its history every ``log_every`` steps and samples the weight norm
every 10th step (the precursor): the medians leave those steps out, and their cost is timed apart.

After the rounds, the cost of one forensics analysis (what a bad step costs: recompute the step,
per-sample losses and gradient norms, the origin layer) is timed on the same model and batch, as a
multiple of the bare training step.

Before timing, it counts the device ops of one guarded step (:func:`count_guard_ops`): the ATen ops that
``guard.step`` dispatches, under a ``TorchDispatchMode``, leaving out the optimizer's own ops and the
per-tensor norm read (``_foreach_norm``, which ``clip_grad_norm_`` makes too); with ``compile=True`` the
compiled region's kernels, from the profiler. On a GPU each one is a kernel launch of a few microseconds,
whatever the model's size. Views (``select``, ``view``, ``detach``...) launch no kernel and are counted apart.

    python benchmarks/bench_guard.py [--rounds 15] [--warmup 11] [--layers 6] [--width 320] [--threads 2]
                                     [--ops] [--analyses 3]
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily

import gradguard as gg


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style causal language model: token + position embeddings, pre-LN blocks, tied head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.register_buffer("mask", torch.triu(torch.full((context, context), -math.inf), diagonal=1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(t))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.ln(x) @ self.tokens.weight.T


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active and not ``paused``, ``_foreach_norm`` excepted."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.views = 0
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not self.paused and func is not torch.ops.aten._foreach_norm.Scalar:
            if func.is_view:
                self.views += 1
            else:
                self.kernels[str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def compiled_kernels(prof: Any) -> collections.Counter[str]:
    """The kernels a compiled step ran (``torch.profiler`` events inside inductor's compiled graph: its fused
    kernels, which ``torch._inductor.config.cpp.enable_kernel_profile`` makes visible on the CPU, CUDA kernels,
    and any ATen op it calls), views and allocations left out."""
    kernels: collections.Counter[str] = collections.Counter()

    def visit(event: Any, inside: bool) -> None:
        inside = inside or "CompiledFxGraph" in event.name
        if inside and "CompiledFxGraph" not in event.name:
            name = event.name.removeprefix("aten::")
            if name not in ("empty", "empty_strided", "as_strided", "view", "reshape", "select", "slice"):
                kernels["compiled: " + name.split("_cpp_fused_")[0].split("_fused_")[0]] += 1
            return  # a kernel's own children are not launches
        for child in event.cpu_children:
            visit(child, inside)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, False)
    return kernels


def count_guard_ops(model: nn.Module, fused: bool, vocab: int, steps: int = 31, compile: bool = False) -> OpCounter:
    """The ops of guarded step number ``steps`` (after the detector's warm-up; neither a flush nor a step that
    records per-layer norms or samples the weight norm) of ``Guard(clip=GlobalNorm(1))`` on a copy of
    ``model``, batch 1 x 16 tokens. With ``compile``, the compiled device step is counted by its kernels (the
    dispatch counter is paused around it: a compiled region does not run under a dispatch mode)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    counter = OpCounter()
    optimizer_step = optimizer.step

    @functools.wraps(optimizer_step)  # keeps the signature the Guard inspects for fused support
    def step_uncounted(*args: Any, **kwargs: Any) -> Any:
        counter.paused = True
        try:
            return optimizer_step(*args, **kwargs)
        finally:
            counter.paused = False

    optimizer.step = step_uncounted  # type: ignore[method-assign]
    guard = gg.Guard(model, optimizer, clip=gg.clip.GlobalNorm(1.0), compile=compile)
    assert steps % guard.log_every and steps % guard.layer_every, "count an ordinary step"
    if compile:
        torch._inductor.config.cpp.enable_kernel_profile = True  # the fused CPU kernels appear in the profiler
    data = torch.Generator().manual_seed(2)
    for i in range(steps + 1):
        idx = torch.randint(0, vocab, (1, 17), generator=data)
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, vocab), idx[:, 1:].reshape(-1))
        loss.backward()
        if i == steps:
            if compile:
                assert guard._step_fn.compiled is not None and guard._step_fn.compile, "the step did not compile"
                step_fn = guard._step_fn

                def counted(*args: Any, steady: bool, step_fn: Any = step_fn) -> Any:
                    calls = step_fn.compiled_calls
                    with _pop_mode_temporarily(), torch.profiler.profile(
                            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        out = step_fn(*args, steady=steady)
                    assert step_fn.compiled_calls == calls + 1, "the counted step did not run compiled"
                    counter.kernels.update(compiled_kernels(prof))
                    return out

                guard._step_fn = counted
            with counter:
                guard.step(loss)
        else:
            guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    return counter


def make_variants(model: nn.Module, loss_fn: Any) -> dict:
    """name -> (model copy, optimizer, phase function(loss, batch))."""
    from zclip import ZClip as ZClipPackage

    variants = {}

    def add(name, fused, phase_factory):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
        variants[name] = (m, opt, phase_factory(m, opt))

    add("bare", False, lambda m, opt: lambda loss, batch: opt.step())

    def torch_clip(m, opt):
        params = list(m.parameters())

        def phase(loss, batch):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return phase

    add("torch clip", False, torch_clip)

    def zclip_package(m, opt):
        zclip = ZClipPackage(max_grad_norm=1.0)

        def phase(loss, batch):
            zclip.step(m)
            opt.step()

        return phase

    add("zclip pkg", False, zclip_package)
    def guard(forensics: bool = False, compile: bool = False):
        def factory(m, opt):
            # warm-ups of 3 steps: the timed rounds are steady steps, as every step after a real run's 25th
            detector = gg.detect.Detector(warmup_steps=3, precursor=gg.precursor.Precursor(warmup_steps=3))
            kwargs = dict(clip=gg.clip.GlobalNorm(1.0), detector=detector, compile=compile)
            if not forensics:
                g = gg.Guard(m, opt, **kwargs)
                phase = lambda loss, batch: g.step(loss)  # noqa: E731
            else:
                g = gg.Guard(m, opt, forensics=gg.Forensics(loss_fn=loss_fn), **kwargs)
                phase = lambda loss, batch: g.step(loss, batch=batch)  # noqa: E731
            phase.guard = g  # the analysis cost is measured on it
            return phase

        return factory

    add("guard", False, guard())
    add("guard forensics", False, guard(forensics=True))
    add("guard compiled", False, guard(compile=True))
    add("bare fused", True, lambda m, opt: lambda loss, batch: opt.step())
    add("guard fused", True, guard())
    add("guard fused forensics", True, guard(forensics=True))
    add("guard fused compiled", True, guard(compile=True))
    return variants


def forensics_bookkeeping_seconds(variant: tuple, batch: tuple, calls: int = 2000) -> float:
    """Thread CPU time per healthy step of what forensics adds to ``guard.step`` besides the read it shares
    with the plain path: ``remember`` (the batch split and kept), ``end_step`` (the norms kept) and
    ``end_call`` (the RNG state captured). Timed on a copy of the Forensics, so the Guard's is untouched."""
    forensics = copy.copy(variant[2].guard.forensics)
    forensics._batches, forensics._norms = copy.copy(forensics._batches), copy.copy(forensics._norms)
    norms = torch.ones(20)
    start = time.thread_time()
    for _ in range(calls):
        forensics.remember(batch)
        forensics.end_step(norms)
        forensics.end_call()
    return (time.thread_time() - start) / calls


def analysis_seconds(variant: tuple, batch: tuple, loss_fn: Any, repeats: int) -> tuple[list[float], str]:
    """Wall times of ``repeats`` forensics analyses of one (healthy) step of ``variant``'s model, as the
    Guard would run one on a grad_spike step; and the per-sample method it used."""
    m, opt, phase = variant
    forensics = phase.guard.forensics
    times, method = [], ""
    for _ in range(repeats):
        loss = loss_fn(m(batch[0]), batch[1])
        loss.backward()
        forensics.remember(batch)
        stats = gg.grad_stats(m)
        start = time.perf_counter()
        record = forensics.analyse(m, stats, ["grad_spike"], phase.guard.step_count, loss.detach())
        times.append(time.perf_counter() - start)
        forensics.end_step(None)
        method = str(record.get("method"))
        assert "error" not in record, record["error"]
        opt.zero_grad(set_to_none=True)
    return times, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=11)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--ops", action="store_true", help="list the ops counted in one guarded step")
    parser.add_argument("--analyses", type=int, default=3, help="forensics analyses timed after the rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.context)
    n_params = sum(p.numel() for p in model.parameters())
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))

    variants = make_variants(model, loss_fn)
    reference = copy.deepcopy(model)  # computes each round's gradients; never steps
    data = torch.Generator().manual_seed(1)
    names = list(variants)
    phases = {name: [] for name in names}
    cpu_phases = {name: [] for name in names}
    backward, cpu_backward = [], []
    print(f"TinyGPT: {n_params / 1e6:.1f}M parameters, {args.layers} layers, width {args.width}, "
          f"batch {args.batch}x{args.context}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\ndevice ops per guarded step (optimizer's own ops and the per-tensor _foreach_norm left out):")
    for label, fused, compile in (("plain AdamW", False, False), ("fused AdamW", True, False),
                                  ("plain AdamW, compile=True", False, True),
                                  ("fused AdamW, compile=True", True, True)):
        counter = count_guard_ops(model, fused, args.vocab, compile=compile)
        print(f"  {label}: {sum(counter.kernels.values())} ops (+ {counter.views} views); target <= 25")
        if args.ops:
            print("    " + ", ".join(f"{name} x{n}" for name, n in counter.kernels.most_common()))
    for round_ in range(args.warmup + args.rounds):
        idx = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=data)
        start, cpu_start = time.perf_counter(), time.thread_time()
        loss = loss_fn(reference(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        backward.append(time.perf_counter() - start)
        cpu_backward.append(time.thread_time() - cpu_start)
        grads = [p.grad for p in reference.parameters()]
        reference.zero_grad(set_to_none=True)
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # rotate: no fixed position
        special = any(phase.guard.step_count % 10 == 0 or (phase.guard.step_count + 1) % phase.guard.log_every == 0
                      for _, _, phase in variants.values() if hasattr(phase, "guard"))
        for name in order:
            m, opt, phase = variants[name]
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            start, cpu_start = time.perf_counter(), time.thread_time()
            phase(loss.detach(), (idx[:, :-1], idx[:, 1:]))
            opt.zero_grad(set_to_none=True)
            end, cpu_end = time.perf_counter(), time.thread_time()
            if round_ >= args.warmup and not special:  # a weight-norm sample or a flush: timed apart
                phases[name].append(end - start)
                cpu_phases[name].append(cpu_end - cpu_start)

    for clock, forward_backward, phase_times in (("wall clock", backward, phases),
                                                 ("thread CPU time", cpu_backward, cpu_phases)):
        report(clock, names, statistics.median(forward_backward[args.warmup:]), phase_times)
    sample = weight_sample_seconds(variants["guard"][0])
    bare_step = statistics.median(cpu_backward[args.warmup:]) + statistics.median(cpu_phases["bare"])
    print(f"\nthe precursor's weight-norm sample, every 10th guarded step (one norm pass over the weights), timed "
          f"alone: {sample * 1e3:.2f} ms = {sample / 10 / bare_step * 100:.3f}% of the bare step, amortized "
          f"(CPU time)")
    cpu_steps = {"bare": [bare_step]}
    bookkeeping = forensics_bookkeeping_seconds(variants["guard forensics"], (idx[:, :-1], idx[:, 1:]))
    print(f"\nforensics bookkeeping of one healthy step, timed alone (remember the batch, the layer norms and "
          f"the RNG state; 2000 calls): {bookkeeping * 1e6:.1f} us = "
          f"{bookkeeping / statistics.median(cpu_steps['bare']) * 100:.4f}% of the bare step (CPU time)")
    analysed = sum(len(variants[n][2].guard.forensics.analyses) for n in names if "forensics" in n)
    print(f"\nbad steps analysed during the rounds: {analysed} (healthy steps are what the rounds measure)")
    if args.analyses:
        idx = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=data)
        times, method = analysis_seconds(variants["guard forensics"], (idx[:, :-1], idx[:, 1:]), loss_fn,
                                         args.analyses)
        bare = statistics.median(backward[args.warmup:]) + statistics.median(phases["bare"])
        print(f"one forensics analysis (per-sample gradients by {method}): median {statistics.median(times):.2f} s "
              f"over {len(times)} = {statistics.median(times) / bare:.1f} bare steps ({bare * 1e3:.0f} ms, wall "
              f"clock); target: a few steps")


def weight_sample_seconds(model: nn.Module, calls: int = 20) -> float:
    """Thread CPU time of one ``gg.precursor.weight_norm`` over the model's weights (median)."""
    times = []
    for _ in range(calls):
        start = time.thread_time()
        gg.precursor.weight_norm(model.parameters())
        times.append(time.thread_time() - start)
    return statistics.median(times)


def report(clock: str, names: list[str], forward_backward: float, phases: dict) -> None:
    phase_med = {n: statistics.median(phases[n]) for n in names}
    print(f"\n== {clock}, medians over {len(phases[names[0]])} rounds; forward + backward {forward_backward * 1e3:.1f} ms")
    print(f"{'variant':<22} {'opt phase ms':>13} {'phase/bare':>11} {'overhead ms':>12} {'overhead % of step':>19}")
    for name in names:
        base = "bare fused" if "fused" in name else "bare"
        bare_step = forward_backward + phase_med[base]
        overhead = phase_med[name] - phase_med[base]
        print(f"{name:<22} {phase_med[name] * 1e3:>13.2f} {phase_med[name] / phase_med[base]:>11.3f} "
              f"{overhead * 1e3:>12.2f} {overhead / bare_step * 100:>18.2f}%")
    torch_over = phase_med["torch clip"] - phase_med["bare"]
    for label, plain, fused in (("eager", "guard", "guard fused"), ("compile=True", "guard compiled",
                                                                    "guard fused compiled")):
        guard_over = phase_med[plain] - phase_med["bare"]
        fused_over = phase_med[fused] - phase_med["bare fused"]
        print(f"Guard ({label}) overhead / torch clip_grad_norm_ overhead: {guard_over / torch_over:.2f} (plain "
              f"AdamW), {fused_over / torch_over:.2f} (fused AdamW); as % of the bare step: "
              f"{guard_over / (forward_backward + phase_med['bare']) * 100:.2f}% (plain), "
              f"{fused_over / (forward_backward + phase_med['bare fused']) * 100:.2f}% (fused)")
    print("targets: ratios <= 1.0, and < 1% of the step")
    plain_fx = phase_med["guard forensics"] - phase_med["guard"]
    fused_fx = phase_med["guard fused forensics"] - phase_med["guard fused"]
    print(f"Forensics on healthy steps, as % of the bare step: "
          f"{plain_fx / (forward_backward + phase_med['bare']) * 100:.2f}% (plain), "
          f"{fused_fx / (forward_backward + phase_med['bare fused']) * 100:.2f}% (fused); target: <= 0.5%")


if __name__ == "__main__":
    main()

"""The Guard on a GPU: step time, host syncs and the statistics' bandwidth, GPT-2-small-sized model.

    python benchmarks/bench_gpu.py                        # or `make bench-gpu`: one GPU, under 5 minutes
    python benchmarks/bench_gpu.py --device cpu --tiny    # the same code paths on a tiny model (a check)

Without a CUDA device (and without ``--device cpu``) it says so and exits 0. Everything is measured in one
run; each figure is a median, and the variants are interleaved round by round in rotating order.

1. **Step time.** A 124M-parameter GPT (GPT-2 small: 12 layers, width 768, 12 heads, context 1024, vocab
   50304, tied embeddings; written here in plain torch, as nanoGPT's ``model.py``), bf16 autocast, a
   batch that fills a step of about ``--target-ms`` (100 ms). Each variant trains its own copy (same
   weights, same batches):

   * ``bare``: ``optimizer.step()`` (AdamW, torch's default foreach implementation);
   * ``torch clip``: ``torch.nn.utils.clip_grad_norm_(max_norm=1)`` then ``optimizer.step()``;
   * ``zclip pkg``: the ``zclip`` package's ``ZClip().step(model)`` then ``optimizer.step()``;
   * ``guard``: ``gg.Guard(model, AdamW, clip=GlobalNorm(1))``;
   * ``bare fused``: ``AdamW(fused=True)``, the baseline of the fused variants;
   * ``guard fused``: the Guard with ``AdamW(fused=True)`` and forensics on
     (``gg.Forensics``, ``guard.step(loss, batch=...)``), where this gradguard has them;
   * ``guard fused, forensics off``: the same without forensics;
   * ``guard fused, compile=True``: the same, its step's device arithmetic compiled (``torch.compile``).

   The Guards' detector warm-ups are shortened to 3 steps, so that the timed rounds are steady steps (as
   every step of a real run after its 25th), compiled where asked.

   Times come from CUDA events (the device's own clock; a host sync that leaves the device idle shows as
   time), around the whole step and around the optimizer phase (everything after ``backward``).
   Overhead = median phase of a variant - median phase of its bare baseline, as a % of the bare step.

2. **Host syncs.** ``torch.cuda.set_sync_debug_mode`` around 50 guarded steps (the Guard's ``step`` only,
   after the detector's warm-up; the steps that flush the history, every ``log_every``, are left out:
   a flush is the documented read): ``"error"`` on the fused path, where any sync would raise (the claim:
   none), and ``"warn"`` on the plain path and on the fused path with forensics on, where the warnings are
   counted (the claim: exactly the one documented read per step; forensics reads the event flags before
   the fused optimizer steps, to explain a bad step before the weights move). On ``--device cpu`` the same steps are counted as ``gg.count_host_syncs``
   counts them (``aten._local_scalar_dense``), the optimizer's own reads of its CPU step counters left out.

3. **Kernel launches** of one steady guarded step (``torch.profiler``: the CUDA launches made inside
   ``guard.step``, those of ``optimizer.step`` and of the per-tensor ``_foreach_norm`` left out; on
   ``--device cpu``, the outermost ATen ops instead, a compiled graph counted as one): plain AdamW, fused
   AdamW, fused AdamW with ``compile=True``.

4. **Compiled = eager.** A small MLP trained 45 steps on the device, with a NaN gradient at step 30 and a
   loss spike at step 36, under ``Guard(compile=True)`` and under the eager Guard: the records must be the
   same (an event's z-score and threshold to 6 significant digits): the compiled step runs inductor's GPU code (triton), whose handling of
   NaN and inf is what the Guard's promise rests on.

5. **Bandwidth.** ``gg.grad_stats(model)`` over the model's gradients (one read) against a device copy of
   the same bytes (a read and a write), and ``torch._foreach_norm`` over the same tensors.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg

# ----------------------------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    vocab: int = 50304  # GPT-2's 50257, padded to a multiple of 64 as nanoGPT does
    context: int = 1024
    layers: int = 12
    heads: int = 12
    width: int = 768


GPT2_SMALL = GPTConfig()
TINY = GPTConfig(vocab=512, context=64, layers=2, heads=4, width=64)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.c_attn = nn.Linear(cfg.width, 3 * cfg.width)
        self.attn_proj = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.c_fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.mlp_proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, pre-LN blocks, final LayerNorm, head tied to the embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        for name, p in self.named_parameters():  # GPT-2's init, residual projections scaled by depth
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------------------------------------- clock


class Clock:
    """CUDA events on a GPU (the device's timeline), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    phase: Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], object]  # (loss, batch)
    baseline: str


def has_forensics() -> bool:
    """Whether this gradguard's Guard takes ``forensics=gg.Forensics(...)`` (issue 11)."""
    return hasattr(gg, "Forensics") and "forensics" in inspect.signature(gg.Guard).parameters


def make_variants(model: nn.Module) -> dict[str, Variant]:
    variants: dict[str, Variant] = {}

    def add(name: str, fused: bool, phase_factory: Callable[[nn.Module, Any], Callable]) -> None:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
        variants[name] = Variant(m, opt, phase_factory(m, opt), "bare fused" if fused else "bare")

    add("bare", False, lambda m, opt: lambda loss, batch: opt.step())

    def torch_clip(m: nn.Module, opt: Any) -> Callable:
        params = list(m.parameters())

        def phase(loss: torch.Tensor, batch: Any) -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return phase

    add("torch clip", False, torch_clip)
    try:
        from zclip import ZClip as ZClipPackage
    except ImportError:
        print("(zclip not installed: `pip install zclip==1.0.0` to compare with it)")
    else:

        def zclip_package(m: nn.Module, opt: Any) -> Callable:
            zclip = ZClipPackage(max_grad_norm=1.0)

            def phase(loss: torch.Tensor, batch: Any) -> None:
                zclip.step(m)
                opt.step()

            return phase

        add("zclip pkg", False, zclip_package)

    def guard(forensics: bool, compile: bool = False) -> Callable:
        def factory(m: nn.Module, opt: Any) -> Callable:
            kwargs: dict[str, Any] = {"clip": gg.clip.GlobalNorm(1.0), "detector": short_warmup()}
            if compile:
                kwargs["compile"] = True
            if forensics:
                g = gg.Guard(m, opt, forensics=gg.Forensics(loss_fn=loss_fn), **kwargs)
                return lambda loss, batch: g.step(loss, batch=batch)
            g = gg.Guard(m, opt, **kwargs)
            return lambda loss, batch: g.step(loss)

        return factory

    add("guard", False, guard(forensics=False))
    add("bare fused", True, lambda m, opt: lambda loss, batch: opt.step())
    if has_forensics():
        add("guard fused", True, guard(forensics=True))
    else:
        print("(this gradguard's Guard takes no forensics: the 'guard fused' row with forensics on is left out)")
    add("guard fused, forensics off", True, guard(forensics=False))
    if has_compile():
        add("guard fused, compile=True", True, guard(forensics=False, compile=True))
    return variants


def short_warmup() -> Any:
    """A detector whose warm-ups take 3 steps (the default's take 25): the steps measured are steady ones."""
    return gg.detect.Detector(warmup_steps=3, precursor=gg.precursor.Precursor(warmup_steps=3))


def has_compile() -> bool:
    """Whether this gradguard's Guard takes ``compile=`` (issue 12)."""
    return "compile" in inspect.signature(gg.Guard).parameters


def random_batch(cfg: GPTConfig, batch: int, device: torch.device, gen: torch.Generator) -> tuple:
    idx = torch.randint(0, cfg.vocab, (batch, cfg.context + 1), generator=gen, device=device)
    return idx[:, :-1], idx[:, 1:]


def train_step(
    variant: Variant, batch: tuple[torch.Tensor, torch.Tensor], amp: torch.autocast, clock: Clock
) -> tuple[Any, Any, Any]:
    """Forward, backward, the variant's optimizer phase; returns the three clock marks."""
    start = clock.mark()
    with amp:
        loss = loss_fn(variant.model(batch[0]), batch[1])
    loss.backward()
    middle = clock.mark()
    variant.phase(loss, batch)
    variant.optimizer.zero_grad(set_to_none=True)
    return start, middle, clock.mark()


# ----------------------------------------------------------------------------------------------- measurements


def choose_batch(model: nn.Module, cfg: GPTConfig, device: torch.device, amp: torch.autocast, target_ms: float,
                 clock: Clock) -> int:
    """The batch whose bare step takes about ``target_ms``, from the time of a small one (halved on OOM)."""
    probe = Variant(model, torch.optim.AdamW(model.parameters(), lr=0.0), lambda loss, batch: None, "bare")
    gen = torch.Generator(device=device).manual_seed(0)
    batch = 8
    while True:
        try:
            times = []
            for _ in range(4):
                start, _, end = train_step(probe, random_batch(cfg, batch, device, gen), amp, clock)
                clock.wait()
                times.append(clock.ms(start, end))
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
    per_sample = statistics.median(times[1:]) / batch
    model.zero_grad(set_to_none=True)
    return max(1, min(64, round(target_ms / per_sample)))


def step_times(variants: dict[str, Variant], cfg: GPTConfig, batch: int, device: torch.device,
               amp: torch.autocast, clock: Clock, rounds: int, warmup: int) -> tuple[dict, dict]:
    names = list(variants)
    steps: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[float]] = {n: [] for n in names}
    gen = torch.Generator(device=device).manual_seed(1)
    for round_ in range(warmup + rounds):
        data = random_batch(cfg, batch, device, gen)
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # rotate: no fixed position
        marks = {name: train_step(variants[name], data, amp, clock) for name in order}
        clock.wait()
        if round_ >= warmup:
            for name, (start, middle, end) in marks.items():
                steps[name].append(clock.ms(start, end))
                phases[name].append(clock.ms(middle, end))
    return steps, phases


def report_times(variants: dict[str, Variant], steps: dict, phases: dict) -> None:
    step_med = {n: statistics.median(v) for n, v in steps.items()}
    phase_med = {n: statistics.median(v) for n, v in phases.items()}
    print(f"\n== step time, medians over {len(next(iter(steps.values())))} rounds (spread: 10th-90th percentile)")
    print(f"{'variant':<27} {'step ms':>9} {'spread':>15} {'step/bare':>10} {'opt phase ms':>13} "
          f"{'overhead % of step':>19}")
    for name, variant in variants.items():
        base = variant.baseline
        low, high = percentiles(steps[name])
        overhead = (phase_med[name] - phase_med[base]) / step_med[base] * 100
        print(f"{name:<27} {step_med[name]:>9.2f} {f'{low:.1f}-{high:.1f}':>15} "
              f"{step_med[name] / step_med[base]:>10.3f} {phase_med[name]:>13.2f} {overhead:>18.2f}%")
    torch_over = phase_med["torch clip"] - phase_med["bare"]
    ratios = {"plain AdamW": phase_med["guard"] - phase_med["bare"]}
    for name in ("guard fused", "guard fused, forensics off", "guard fused, compile=True"):
        if name in phase_med:
            ratios[name.replace("guard fused", "fused AdamW")] = phase_med[name] - phase_med["bare fused"]
    print("\nGuard overhead / torch clip_grad_norm_ overhead: "
          + ", ".join(f"{over / torch_over:.2f} ({label})" for label, over in ratios.items()))


def percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10)
    return deciles[0], deciles[-1]


class CPUSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (what a host sync is made of) outside ``optimizer.step``: on the
    CPU, torch's for-loop AdamW reads its step counters, which on a GPU live on the host and sync nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.count = 0
        self.paused = False
        optimizer_step = optimizer.step

        @functools.wraps(optimizer_step)  # the signature the Guard inspects for fused support
        def step_uncounted(*args: Any, **kwargs: Any) -> Any:
            self.paused = True
            try:
                return optimizer_step(*args, **kwargs)
            finally:
                self.paused = False

        optimizer.step = step_uncounted  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def guarded_steps(variant: Variant, guard: gg.Guard, forensics: bool, cfg: GPTConfig, batch: int,
                  device: torch.device, amp: torch.autocast, steps: int,
                  checked: Callable[[Callable[[], object]], None]) -> None:
    """``steps`` training steps, each ``guard.step`` run inside ``checked`` unless it flushes the history."""
    gen = torch.Generator(device=device).manual_seed(2)
    for _ in range(steps):
        data = random_batch(cfg, batch, device, gen)
        with amp:
            loss = loss_fn(variant.model(data[0]), data[1])
        loss.backward()

        def step(loss: torch.Tensor = loss, data: tuple = data) -> object:
            return guard.step(loss, batch=data) if forensics else guard.step(loss)

        if (guard.step_count + 1) % guard.log_every == 0:
            step()  # a flush: the documented read, not checked
        else:
            checked(step)
        variant.optimizer.zero_grad(set_to_none=True)


def host_syncs(model: nn.Module, cfg: GPTConfig, batch: int, device: torch.device, amp: torch.autocast,
               steps: int = 50, warmup: int = 30) -> None:
    print(f"\n== host syncs in {steps} guarded steps (after {warmup} warm-up steps; flush steps left out)")
    cases = [("fused AdamW", True, False, False), ("plain AdamW", False, False, False)]
    if has_forensics():
        cases.insert(1, ("fused AdamW, forensics on", True, True, False))
    if has_compile() and device.type == "cuda":  # a dispatch-mode counter (the CPU's) runs the step eagerly
        cases.insert(1, ("fused AdamW, compile=True", True, False, True))
    for label, fused, forensics, compile in cases:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
        cpu_counter = CPUSyncCounter(opt)  # before the Guard takes opt.step
        extra: dict[str, Any] = {"forensics": gg.Forensics(loss_fn=loss_fn)} if forensics else {}
        if compile:
            extra.update(compile=True, detector=short_warmup())
        guard = gg.Guard(m, opt, clip=gg.clip.GlobalNorm(1.0), **extra)
        variant = Variant(m, opt, lambda loss, batch: None, "")
        guarded_steps(variant, guard, forensics, cfg, batch, device, amp, warmup, lambda fn: fn())
        flushes = sum((guard.step_count + i + 1) % guard.log_every == 0 for i in range(steps))
        expected = 0 if fused and not forensics else steps - flushes  # forensics reads the flags per step
        count, error = 0, None
        if device.type == "cuda":
            mode = "error" if fused and not forensics else "warn"

            def checked(fn: Callable[[], object], mode: str = mode) -> None:
                nonlocal count
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(mode)
                    try:
                        fn()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                count += sum("synchroniz" in str(w.message) for w in caught)

            try:
                guarded_steps(variant, guard, forensics, cfg, batch, device, amp, steps, checked)
            except RuntimeError as exc:  # set_sync_debug_mode("error") raises at the first sync
                error = str(exc).splitlines()[0]
            how = f'set_sync_debug_mode("{mode}")'
        else:

            def checked(fn: Callable[[], object], cpu_counter: CPUSyncCounter = cpu_counter) -> None:
                with cpu_counter:
                    fn()

            guarded_steps(variant, guard, forensics, cfg, batch, device, amp, steps, checked)
            count = cpu_counter.count
            how = "aten._local_scalar_dense outside optimizer.step"
        verdict = "as documented" if error is None and count == expected else "NOT as documented"
        found = f"error: {error}" if error is not None else f"{count} syncs"
        print(f"  {label}: {found} in {steps - flushes} checked steps ({how}); documented: {expected} "
              f"({'one read per step' if expected else 'none'}) -> {verdict}")


def launches(model: nn.Module, cfg: GPTConfig, batch: int, device: torch.device, amp: torch.autocast,
             warmup: int = 12) -> None:
    """Kernel launches of one steady guarded step (the module docstring, point 3)."""
    cuda = device.type == "cuda"
    what = "CUDA kernel launches" if cuda else "ATen ops (no CUDA here)"
    print(f"\n== {what} in one guarded step, after {warmup} steps (optimizer.step and _foreach_norm left out)")
    cases = [("plain AdamW", False, False), ("fused AdamW", True, False)]
    if has_compile():
        cases.append(("fused AdamW, compile=True", True, True))
    for label, fused, compile in cases:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused)
        optimizer_step = opt.step

        @functools.wraps(optimizer_step)  # the signature the Guard inspects for fused support
        def marked(*args: Any, optimizer_step: Any = optimizer_step, **kwargs: Any) -> Any:
            with torch.profiler.record_function("optimizer.step"):
                return optimizer_step(*args, **kwargs)

        opt.step = marked  # type: ignore[method-assign]
        guard = gg.Guard(m, opt, clip=gg.clip.GlobalNorm(1.0), detector=short_warmup(),
                         **({"compile": True} if compile else {}))
        variant = Variant(m, opt, lambda loss, batch: None, "")
        guarded_steps(variant, guard, False, cfg, batch, device, amp, warmup, lambda fn: fn())
        while guard.step_count % 10 == 0 or (guard.step_count + 1) % guard.log_every == 0:  # an ordinary step
            guarded_steps(variant, guard, False, cfg, batch, device, amp, 1, lambda fn: fn())
        gen = torch.Generator(device=device).manual_seed(4)
        data = random_batch(cfg, batch, device, gen)
        with amp:
            loss = loss_fn(m(data[0]), data[1])
        loss.backward()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            guard.step(loss)
            if cuda:
                torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        print(f"  {label}: {count_launches(prof, cuda)}")


def count_launches(prof: Any, cuda: bool) -> int:
    """CUDA launches (``cudaLaunchKernel``-like runtime calls, memcpy/memset included) or, without CUDA, the
    outermost ATen ops that are not views or allocations (a compiled graph as one), outside ``optimizer.step``
    and ``_foreach_norm``."""
    skipped = ("optimizer.step", "aten::_foreach_norm")
    free = ("aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::select",
            "aten::slice", "aten::detach", "detach", "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze")
    count = 0

    def visit(event: Any) -> None:
        nonlocal count
        if event.name in skipped:
            return
        if cuda:
            name = event.name.lower()
            if "launchkernel" in name or "memcpyasync" in name or "memsetasync" in name:
                count += 1
        elif event.name.startswith("aten::") or "CompiledFxGraph" in event.name:
            count += event.name not in free  # the outermost op (a compiled graph: at least one kernel)
            return
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return count


def compiled_matches_eager(device: torch.device, steps: int = 45) -> bool:
    """Point 4 of the module docstring; prints the verdict and returns it."""

    def run(compile: bool) -> list[dict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=device.type == "cuda")
        guard = gg.Guard(model, opt, clip=gg.clip.GlobalNorm(1.0), log_every=10,
                         **({"compile": True} if compile else {}))
        gen = torch.Generator(device=device).manual_seed(1)
        for i in range(steps):
            x = torch.randn(32, 6, generator=gen, device=device)
            loss = F.mse_loss(model(x), x[:, :1] - x[:, 1:2]) * (1e4 if i == 36 else 1.0)
            loss.backward()
            if i == 30:
                model[2].weight.grad[0, 0] = math.nan
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
        guard.close()
        if compile and not guard._step_fn.compiled_calls:
            print("  compile=True did not run compiled (it fell back to eager: see the warning above)")
        # an event's z-score and threshold to 6 significant digits: inductor may fuse the EMA's multiply-adds
        # (an FMA rounds once), one ulp from eager; the decisions and every other value must be equal
        return [{**r, "events": [{k: (float(f"{v:.6g}") if isinstance(v, float) and k in ("z", "threshold") else v)
                                  for k, v in e.items()} for e in r["events"]]} for r in guard.history]

    eager, compiled = run(False), run(True)
    same = json.dumps(eager, sort_keys=True) == json.dumps(compiled, sort_keys=True)
    differ = [a["step"] for a, b in zip(eager, compiled) if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)]
    kinds = sorted({e["kind"] for r in compiled for e in r["events"]})
    print(f"\n== compile=True against eager, {steps} steps on {device.type} (NaN gradient at 30, spike at 36): "
          + ("the same records" if same else f"records DIFFER at steps {differ}") + f"; events seen: {kinds}")
    return same


def bandwidth(model: nn.Module, cfg: GPTConfig, device: torch.device, amp: torch.autocast, clock: Clock,
              repeats: int) -> None:
    gen = torch.Generator(device=device).manual_seed(3)
    data = random_batch(cfg, 2, device, gen)
    with amp:
        loss = loss_fn(model(data[0]), data[1])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    n_bytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.cat([g.flatten() for g in grads])
    copy_target = torch.empty_like(flat)
    methods: dict[str, Callable[[], object]] = {
        "device copy": lambda: copy_target.copy_(flat),
        "grad_stats": lambda: gg.grad_stats(model),
        "_foreach_norm": lambda: torch._foreach_norm(grads, 2.0),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats + 2):
        for name, fn in methods.items():
            start = clock.mark()
            fn()
            end = clock.mark()
            clock.wait()
            if i >= 2:
                times[name].append(clock.ms(start, end))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n== one read of the gradients ({n_bytes / 2**20:.0f} MiB in {len(grads)} tensors), medians of "
          f"{repeats}")
    copy_bw = 2 * n_bytes / med["device copy"] / 1e6  # read + write, GB/s
    print(f"  {'device copy':<14} {med['device copy']:8.3f} ms  {copy_bw:7.1f} GB/s (read + write)")
    for name in ("grad_stats", "_foreach_norm"):
        bw = n_bytes / med[name] / 1e6
        print(f"  {name:<14} {med[name]:8.3f} ms  {bw:7.1f} GB/s (read)  {bw / copy_bw:6.1%} of the copy's bandwidth")
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the code paths)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 instead of GPT-2 small")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: fill a step of --target-ms)")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--sync-steps", type=int, default=50, help="guarded steps checked for host syncs")
    parser.add_argument("--sync-warmup", type=int, default=30, help="guarded steps before those")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine, nothing measured (run it on a GPU; "
              "`--device cpu --tiny` checks its code paths here)")
        return 0
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    cfg = TINY if args.tiny else GPT2_SMALL
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    clock = Clock(device)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_gpu: {where}, torch {torch.__version__}; GPT {n_params / 1e6:.1f}M parameters "
          f"({cfg.layers} layers, width {cfg.width}, context {cfg.context}), bf16 autocast")
    started = time.perf_counter()
    batch = args.batch or (4 if args.tiny else choose_batch(model, cfg, device, amp, args.target_ms, clock))
    print(f"batch {batch} x {cfg.context} tokens" + ("" if args.batch or args.tiny else
                                                      f" (fills a bare step of about {args.target_ms:.0f} ms)"))

    variants = make_variants(model)
    steps, phases = step_times(variants, cfg, batch, device, amp, clock, args.rounds, args.warmup)
    report_times(variants, steps, phases)
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    host_syncs(model, cfg, batch, device, amp, steps=args.sync_steps, warmup=args.sync_warmup)
    launches(model, cfg, batch, device, amp)
    if has_compile():
        compiled_matches_eager(device)
    bandwidth(model, cfg, device, amp, clock, repeats=args.rounds)
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

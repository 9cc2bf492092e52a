"""Early warning beyond the lab: which signals see a late divergence coming, on families they were not tuned on.

Each family trains a small model on data shipped with scikit-learn (``load_digits``) or Python (the lab's character
corpus, ``pydoc_data.topics``); nothing is downloaded. Healthy families must never warn; late-diverging ones
should warn well before they diverge:

* healthy: an MLP and a small CNN on digits, an LSTM reading a digit's 8 rows, the lab's small causal transformer
  on characters; SGD with momentum, Adam, AdamW; constant LR and linear warm-up + cosine;
* diverging late: a warm-up to a too-high LR (the transformer under AdamW; the CNN under SGD with momentum, 0.2
  over 200 steps); Adam with a low beta2 and a tiny epsilon at a high LR (the MLP, its LR raised x1.01 a step);
  an LR raised slowly (the MLP, SGD, x1.02 a step); and an LSTM under Adam with its LR raised slowly (recurrent
  weights, which blow up through the time steps).
* **not here: attention-logit growth** at a moderate LR over a longer run. On this small transformer (pre-LN, width
  32) the logits do grow (the largest ``|q.k| / sqrt(d)`` from 0.1 at init to 700-45,000 by step 500, with AdamW
  at LR 0.01-0.03, the query/key weights at x1-30 the LR or x4 at init, 600 steps, seeds 0-1), the attention
  turns one-hot, and the loss stalls at 2.6-3.0 instead of falling, but it never climbs back half-way to its start:
  no run diverged, so there is nothing to warn of by this script's definition (nor in the earlier tries: constant
  LR 0.01-0.1, query/key weights x1-8 at init, with and without the pre-attention LayerNorm).

A run **diverges** at the first step whose loss is not finite or whose smoothed loss (EMA 0.9) has climbed back
half-way from its best to the loss at step 0. A warning **counts** when it comes at least 20 steps and at least 10%
of the time to divergence before it (a warning after it does not). A healthy run with any warning is a **false
alarm**.

**Signals** (each the library's own device code, run on inputs recorded during the run; per-step inputs are the
gradient norm, the weight norm every 10 steps, the update measured every 10 steps):

* ``weights``: ``gg.precursor``'s weight growth (``||W||`` grew ``weight_ratio`` times in 10 steps);
* ``weight acceleration``: ``gg.precursor``'s weight acceleration (the growth per 10 steps sped up by
  ``acceleration`` over its slowest since step 50);
* ``grad climb``: ``gg.precursor``'s gradient-norm climb off its floor (``ratio``);
* ``update size``: ``gg.update_size``'s measured update size per layer climbing ``climb`` times off its floor, or
  above ``max_ratio`` (``||dW_l|| / ||W_l||``);
* ``combined``: any of the four at its chosen threshold.

Thresholds are chosen per signal on the **tuning seeds** (the highest recall on the diverging families with at
most 5% false alarms on the healthy ones) and reported on the **evaluation seeds**, which were not used.

``--respond`` compares, on the diverging families' evaluation seeds, the Guard at its defaults (acting on the
divergence) with the Guard acting on the warning (:func:`warning_guard`: ``responses={"precursor": "rollback",
"update_size": "rollback"}`` at the chosen thresholds: back to the last snapshot with the LR halved, the cut kept,
``RecoveryPolicy(lr_recover_after=None)``): the final loss. ``--cost`` times the Guard's step with and without the
update size, side by side, and counts host reads.

    python benchmarks/early_warning.py [--quick] [--respond] [--cost]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.lab.models import CausalSelfAttention, CausalTransformer
from gradguard.lab.tasks import char_batch, char_corpus
from gradguard.precursor import Precursor, weight_norm
from gradguard.update_size import UpdateMeasurement, UpdateSize, log_lr, update_size_step

TUNING_SEEDS = (0, 1)
EVALUATION_SEEDS = (2, 3, 4)
LEAD_STEPS, LEAD_FRACTION = 20, 0.10
SAMPLE_EVERY = 10
FALSE_ALARM_TARGET, RECALL_TARGET = 0.05, 0.80

#: per signal: the options tried on the tuning seeds (the first is the library's default)
GRIDS: dict[str, list[dict[str, float]]] = {
    "weights": [{"weight_ratio": r} for r in (2.5, 1.5, 1.75, 2.0, 3.0)],
    "weight acceleration": [{"acceleration": a} for a in (0.03, 0.02, 0.04, 0.05, 0.08)],
    "grad climb": [{"ratio": r} for r in (4.0, 2.0, 3.0, 6.0, 8.0)],
    "update size": [{"climb": c, "max_ratio": m} for c in (8.0, 3.0, 4.0, 6.0, 16.0)
                    for m in (math.inf, 0.03, 0.1, 0.3)],
}
SIGNALS = (*GRIDS, "combined")


# ---------------------------------------------------------------------------------------------- the families

@dataclass
class Family:
    name: str
    healthy: bool
    steps: int
    make: Callable[[int], tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]


_DIGITS: tuple[Tensor, Tensor] | None = None
_CHARS: Any = None


def digits() -> tuple[Tensor, Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        _DIGITS = ((x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(d.target, dtype=torch.int64))
    return _DIGITS


def chars() -> Any:
    global _CHARS
    if _CHARS is None:
        _CHARS = char_corpus(30_000)
    return _CHARS


def digit_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = digits()
    index = torch.randint(0, len(x), (32,), generator=generator)
    return x[index], y[index]


def char_batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return char_batch(chars().train_ids, 16, CONTEXT, generator)


def classify(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def next_char(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class CNN(nn.Module):
    """Two 3x3 convolutions with max-pooling on the 8x8 digits, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x.reshape(-1, 1, 8, 8))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


class RowLSTM(nn.Module):
    """Reads a digit's 8 rows of 8 pixels as a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x.reshape(-1, 8, 8))
        return self.head(out[:, -1])


CONTEXT = 16


def transformer(qk_scale: float = 1.0) -> nn.Module:
    """The lab's small GPT (2 blocks of width 32); ``qk_scale`` multiplies the query and key weights at init (larger
    attention logits from the start: the regime where they grow)."""
    model = CausalTransformer(len(chars().vocab), CONTEXT, d_model=32, n_layer=2, n_head=4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CausalSelfAttention):
                module.qkv.weight[: 2 * module.qkv.in_features].mul_(qk_scale)
    return model


def constant(_: int) -> float:
    return 1.0


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def warmup_to(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup)


def ramp(rate: float) -> Callable[[int], float]:
    return lambda step: rate**step


def _family(name: str, healthy: bool, steps: int, model: Callable[[], nn.Module],
            optimizer: Callable[[Any], torch.optim.Optimizer], schedule: Callable[[int], float],
            data: str) -> Family:
    def make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]:
        torch.manual_seed(seed)
        m = model()
        return m, optimizer(m.parameters()), schedule

    if data == "digits":
        return Family(name, healthy, steps, make, digit_batch, classify)
    return Family(name, healthy, steps, make, char_batches, next_char)


def families(quick: bool = False) -> list[Family]:
    s = 300
    every = [
        # healthy
        _family("MLP, SGD+momentum, constant", True, s, mlp, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                constant, "digits"),
        _family("MLP, Adam, warm-up+cosine", True, s, mlp, lambda p: torch.optim.Adam(p, lr=2e-3),
                warmup_cosine(30, s), "digits"),
        _family("CNN, Adam, constant", True, s, CNN, lambda p: torch.optim.Adam(p, lr=1e-3), constant, "digits"),
        _family("CNN, SGD+momentum, warm-up+cosine", True, s, CNN,
                lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), warmup_cosine(30, s), "digits"),
        _family("LSTM, AdamW, constant", True, s, RowLSTM,
                lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01), constant, "digits"),
        _family("transformer, AdamW, warm-up+cosine", True, s, transformer,
                lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
                warmup_cosine(50, s), "chars"),
        # diverging late
        _family("warm-up to a too-high LR (transformer, AdamW)", False, s, transformer,
                lambda p: torch.optim.AdamW(p, lr=1.0, betas=(0.9, 0.95), weight_decay=0.0),
                warmup_to(150), "chars"),
        _family("Adam, beta2 0.5, eps 1e-12, high LR (MLP)", False, s, mlp,
                lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.9, 0.5), eps=1e-12), ramp(1.01), "digits"),
        _family("LR raised slowly (MLP, SGD x1.02/step)", False, s, mlp,
                lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), ramp(1.02), "digits"),
        _family("LR raised slowly (LSTM, Adam x1.015/step)", False, s, RowLSTM,
                lambda p: torch.optim.Adam(p, lr=3e-3), ramp(1.015), "digits"),
        _family("warm-up to a too-high LR (CNN, SGD+momentum)", False, s, CNN,
                lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9), warmup_to(200), "digits"),
    ]
    if quick:  # the suite's small version: one healthy family and one late-diverging one
        return [f for f in every if f.name in ("MLP, SGD+momentum, constant", "LR raised slowly (LSTM, Adam x1.015/step)")]
    return every


# ---------------------------------------------------------------------------------------------- one run

@dataclass
class Trace:
    """What a run recorded, on the host: the inputs of every signal, and the losses."""

    family: str
    healthy: bool
    seed: int
    losses: list[float]
    log_norms: list[float]
    weight_norms: dict[int, float]  # step -> ||W||, every SAMPLE_EVERY steps
    lrs: list[float]
    updates: dict[int, tuple[list[float], float]]  # sampled step -> (per-layer ratios, total ratio)
    diverged: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.diverged = divergence_step(self.losses)


def divergence_step(losses: list[float]) -> int | None:
    """The first step whose loss is not finite or whose EMA (0.9) climbed back half-way from its best to the loss
    at step 0 (after 20 steps)."""
    if not losses:
        return None
    start, ema, best = losses[0], losses[0], losses[0]
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        ema = 0.9 * ema + 0.1 * loss
        best = min(best, ema)
        if step >= 20 and ema > best + 0.5 * (start - best) and start > best:
            return step
    return None


def layer_index(model: nn.Module) -> tuple[list[Tensor], Tensor, int]:
    """The parameters, the layer (module) of each as gg.grad_stats groups them, the number of layers."""
    stats = gg.grad_stats(model)
    named = dict(model.named_parameters())
    params = [named[name] for name in stats.param_names] if stats.param_names else list(model.parameters())
    return params, torch.tensor(stats.group_index, dtype=torch.int64), len(stats.names)


def run(family: Family, seed: int, guard_options: dict[str, Any] | None = None) -> tuple[Trace, float]:
    """Train one run without a Guard (recording every signal's inputs), or with ``gg.Guard(**guard_options)``;
    returns the trace and the final held-out-like loss (the mean of the last 20 losses)."""
    model, optimizer, schedule = family.make(seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(1000 + seed)
    guard = None
    if guard_options is not None:
        guard = gg.Guard(model, optimizer, scheduler=scheduler, **guard_options)
    sizes = UpdateSize(every=SAMPLE_EVERY)
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    weights: dict[int, Tensor] = {}
    lrs: list[float] = []
    updates: dict[int, tuple[Tensor, Tensor]] = {}
    index_of: tuple[list[Tensor], Tensor, int] | None = None
    start = time.perf_counter()
    try:
        for step in range(family.steps):
            x, y = family.batch(generator)
            loss = family.loss(model, x, y)
            loss.backward()
            losses.append(loss.detach())
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            if guard is not None:
                guard.step(loss)
                optimizer.zero_grad(set_to_none=True)
                continue
            norms.append(gg.grad_stats(model).total_norm)
            if step % SAMPLE_EVERY == 0:
                weights[step] = weight_norm(model.parameters())
            measurement = sizes.measure()
            if measurement is not None:
                updates[step - 1] = (measurement.layer_ratio, measurement.total_ratio)
            if step % SAMPLE_EVERY == 0:
                if index_of is None:
                    index_of = layer_index(model)
                sizes.copy_before_step(index_of[0], index_of[1], index_of[2], log_lr(lrs[-1], torch.device("cpu")))
                sizes.stepped(torch.tensor(True))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if not torch.isfinite(losses[-1]):
                break
    except gg.TrainingDiverged:
        pass
    if guard is not None:
        try:
            guard.close()
        except gg.TrainingDiverged:
            pass
    seconds = time.perf_counter() - start
    host = torch.stack(losses).tolist()
    trace = Trace(family.name, family.healthy, seed, host,
                  torch.stack(norms).clamp_min(1e-30).log().tolist() if norms else [],
                  {s: float(w) for s, w in weights.items()}, lrs,
                  {s: (r.tolist(), float(t)) for s, (r, t) in updates.items()}, seconds=seconds)
    tail = [v for v in host[-20:]]
    final = statistics.fmean(tail) if tail and all(math.isfinite(v) for v in tail) else math.inf
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        final = math.inf
    return trace, final


# ---------------------------------------------------------------------------------------------- the signals

def first_warning(trace: Trace, signal: str, options: dict[str, float]) -> int | None:
    """The first step the signal warns on this trace, replaying the library's device code on its inputs."""
    if signal == "weights":
        precursor = Precursor(ratio=1e30, weight_every=SAMPLE_EVERY, acceleration=None, **options)
        for step, log_norm in enumerate(trace.log_norms):
            w = trace.weight_norms.get(step)
            precursor.update_log(torch.tensor(log_norm), torch.tensor(math.isfinite(log_norm)),
                                 None if w is None else torch.tensor(w))
        return precursor.first_warning()
    if signal == "weight acceleration":
        precursor = Precursor(ratio=1e30, weight_every=SAMPLE_EVERY, weight_ratio=None, **options)
        for step, log_norm in enumerate(trace.log_norms):
            w = trace.weight_norms.get(step)
            precursor.update_log(torch.tensor(log_norm), torch.tensor(math.isfinite(log_norm)),
                                 None if w is None else torch.tensor(w))
        return precursor.first_warning()
    if signal == "grad climb":
        precursor = Precursor(weight_ratio=None, acceleration=None, **options)
        for log_norm in trace.log_norms:
            precursor.update_log(torch.tensor(log_norm), torch.tensor(math.isfinite(log_norm)))
        return precursor.first_warning()
    if signal == "update size":
        sizes = UpdateSize(every=SAMPLE_EVERY, **options)
        layers = len(next(iter(trace.updates.values()))[0]) if trace.updates else 1
        for step in range(len(trace.log_norms)):
            measured = trace.updates.get(step - 1)
            measurement = None
            if measured is not None:
                measurement = UpdateMeasurement(torch.tensor(measured[0]), torch.tensor(measured[1]),
                                                log_lr(trace.lrs[step - 1], torch.device("cpu")), torch.tensor(True))
            state, config = sizes.begin(layers, torch.device("cpu"), measurement is not None)
            state, _ = update_size_step(state, log_lr(trace.lrs[step], torch.device("cpu")), measurement, config)
            sizes.keep(state, config)
        return sizes.first_warning()
    raise ValueError(f"unknown signal {signal!r}")


@dataclass
class Score:
    runs: int = 0
    warned: int = 0  # diverging: warned in time; healthy: false alarms
    leads: list[int] = field(default_factory=list)
    late: int = 0  # diverging runs whose divergence came too early to be scored (< 20 steps)

    def rate(self) -> float:
        return self.warned / self.runs if self.runs else math.nan


def in_time(trace: Trace, warned: int | None) -> int | None:
    """The lead of a warning that counts (see the module docstring), else None."""
    if warned is None or trace.diverged is None:
        return None
    lead = trace.diverged - warned
    return lead if lead >= LEAD_STEPS and lead >= LEAD_FRACTION * trace.diverged else None


def warnings_of(traces: list[Trace], chosen: dict[str, dict[str, float]]) -> dict[str, list[int | None]]:
    out: dict[str, list[int | None]] = {}
    for signal in GRIDS:
        out[signal] = [first_warning(t, signal, chosen[signal]) for t in traces]
    out["combined"] = [min((w for w in ws if w is not None), default=None) for ws in zip(*out.values())]
    return out


def score(traces: list[Trace], warned: list[int | None]) -> dict[str, Score]:
    scores: dict[str, Score] = {}
    for trace, w in zip(traces, warned):
        s = scores.setdefault(trace.family, Score())
        s.runs += 1
        if trace.healthy:
            s.warned += w is not None
        else:
            lead = in_time(trace, w)
            if lead is not None:
                s.warned += 1
                s.leads.append(lead)
    return scores


def choose(traces: list[Trace]) -> dict[str, dict[str, float]]:
    """Per signal, on the tuning traces: the options with the highest recall on the diverging runs among those with
    at most FALSE_ALARM_TARGET false alarms (ties: the earlier in the grid, the default first)."""
    healthy = [t for t in traces if t.healthy]
    diverging = [t for t in traces if not t.healthy]
    chosen = {}
    for signal, grid in GRIDS.items():
        best, best_key = grid[0], (-1.0, -1.0)
        for options in grid:
            alarms = sum(first_warning(t, signal, options) is not None for t in healthy) / max(1, len(healthy))
            recall = sum(in_time(t, first_warning(t, signal, options)) is not None
                         for t in diverging) / max(1, len(diverging))
            key = (1.0 if alarms <= FALSE_ALARM_TARGET else 0.0, recall - alarms)
            if key > best_key:
                best, best_key = options, key
        chosen[signal] = best
    return chosen


def table(traces: list[Trace], chosen: dict[str, dict[str, float]]) -> list[str]:
    warned = warnings_of(traces, chosen)
    lines = [f"{'family':<52} {'runs':>4} {'diverged at':>16} " + " ".join(f"{s:>22}" for s in SIGNALS)]
    scores = {signal: score(traces, warned[signal]) for signal in SIGNALS}
    names = list(dict.fromkeys(t.family for t in traces))
    for name in names:
        runs = [t for t in traces if t.family == name]
        healthy = runs[0].healthy
        steps = [t.diverged for t in runs]
        at = "-" if healthy else ",".join("x" if d is None else str(d) for d in steps)
        cells = []
        for signal in SIGNALS:
            s = scores[signal][name]
            if healthy:
                cells.append(f"false alarms {s.warned}/{s.runs}")
            else:
                lead = f" lead {statistics.median(s.leads):.0f}/{min(s.leads)}" if s.leads else ""
                cells.append(f"{s.warned}/{s.runs}{lead}")
        lines.append(f"{name:<52} {len(runs):>4} {at:>16} " + " ".join(f"{c:>22}" for c in cells))
    healthy_runs = [t for t in traces if t.healthy]
    summary = []
    for signal in SIGNALS:
        alarms = sum(w is not None for t, w in zip(traces, warned[signal]) if t.healthy)
        fams = [scores[signal][n] for n in names if not next(t for t in traces if t.family == n).healthy]
        meeting = sum(s.rate() >= RECALL_TARGET for s in fams)
        summary.append(f"{signal}: false alarms {alarms}/{len(healthy_runs)}, late-diverging families at >= "
                       f"{RECALL_TARGET:.0%}: {meeting}/{len(fams)}")
    return lines + summary


# ---------------------------------------------------------------------------------------------- cost

def cost(steps: int = 200) -> list[str]:
    """The Guard's step with and without the update size, side by side (alternating blocks of steps, one model),
    and the host reads of each."""
    family = next(f for f in families() if f.name.startswith("transformer, AdamW"))
    lines = []
    for fused in (False, True):
        model, _, _ = family.make(0)
        setups = {}
        for label, sizes in (("update size on", "default"), ("update size off", None)):
            torch.manual_seed(0)
            m = transformer()
            m.load_state_dict(model.state_dict())
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=fused)
            setups[label] = (m, opt, gg.Guard(m, opt, detector=gg.detect.Detector(update_size=sizes)))
        generator = torch.Generator().manual_seed(0)
        batches = [family.batch(generator) for _ in range(20)]
        seconds = {label: 0.0 for label in setups}
        syncs = {}
        for block in range(steps // 20):
            for label, (m, opt, guard) in (setups.items() if block % 2 == 0 else reversed(setups.items())):
                start = time.perf_counter()
                for x, y in batches:
                    loss = family.loss(m, x, y)
                    loss.backward()
                    guard.step(loss)
                    opt.zero_grad(set_to_none=True)
                seconds[label] += time.perf_counter() - start
        for label, (m, opt, guard) in setups.items():
            with gg.count_host_syncs() as counter:
                for x, y in batches[:20]:  # 20 steps: two samples and their measurements, no flush
                    loss = family.loss(m, x, y)
                    loss.backward()
                    guard.step(loss)
                    opt.zero_grad(set_to_none=True)
            syncs[label] = counter.count
        on, off = seconds["update size on"], seconds["update size off"]
        n_params = sum(p.numel() for p in setups["update size on"][0].parameters())
        lines.append(f"{'fused' if fused else 'plain'} AdamW, transformer ({n_params} parameters), {steps} steps each: "
                     f"with the update size {1e3 * on / steps:.2f} ms/step, without {1e3 * off / steps:.2f} ms/step "
                     f"({100 * (on - off) / off:+.2f}%); host reads in 20 steps: {syncs['update size on']} with, "
                     f"{syncs['update size off']} without")
    return lines


# ---------------------------------------------------------------------------------------------- main

def _run_task(task: tuple[bool, int, int]) -> Trace:
    quick, index, seed = task
    torch.set_num_threads(1)
    return run(families(quick)[index], seed)[0]


def collect(fams: list[Family], seeds: tuple[int, ...], quick: bool = False, workers: int = 1) -> list[Trace]:
    """Every family's runs at ``seeds`` (in ``workers`` processes)."""
    tasks = [(quick, index, seed) for index in range(len(fams)) for seed in seeds]
    if workers <= 1:
        return [_run_task(task) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_run_task, tasks, chunksize=1)


def warning_guard(chosen: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The Guard's options that act on the warning at the chosen thresholds: back to the snapshot before the climb
    with the LR halved, and the cut kept (the warning says the LR is too large: growing it back re-enters the
    climb)."""
    precursor = Precursor(weight_every=SAMPLE_EVERY, **chosen["grad climb"], **chosen["weights"],
                          **chosen["weight acceleration"])
    return {"detector": gg.detect.Detector(precursor=precursor,
                                           update_size=UpdateSize(every=SAMPLE_EVERY, **chosen["update size"])),
            "responses": {"precursor": "rollback", "update_size": "rollback"},
            "recovery": gg.RecoveryPolicy(lr_recover_after=None)}


def _respond_task(task: tuple[int, int, str, dict[str, dict[str, float]]]) -> float:
    index, seed, arm, chosen = task
    torch.set_num_threads(1)
    return run(families()[index], seed, {} if arm == "defaults" else warning_guard(chosen))[1]


def respond(fams: list[Family], seeds: tuple[int, ...], chosen: dict[str, dict[str, float]],
            workers: int = 1) -> list[str]:
    """The diverging families under the Guard at its defaults (acting on the divergence), and acting on the
    warning (:func:`warning_guard`): the mean of the last 20 losses of each run."""
    every = families()
    tasks = [(every.index(next(f for f in every if f.name == family.name)), seed, arm, chosen)
             for family in fams if not family.healthy for arm in ("defaults", "warning") for seed in seeds]
    if workers <= 1:
        finals = [_respond_task(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            finals = pool.map(_respond_task, tasks, chunksize=1)
    by = {(every[index].name, arm, seed): final for (index, seed, arm, _), final in zip(tasks, finals)}
    lines = [f"{'family':<52} {'Guard (defaults)':>24} {'acting on the warning':>24}  (mean of the last 20 losses)"]
    better = runs = 0
    for family in fams:
        if family.healthy:
            continue
        cells = [", ".join(f"{by[(family.name, arm, seed)]:.3g}" for seed in seeds) for arm in ("defaults", "warning")]
        lines.append(f"{family.name:<52} {cells[0]:>24} {cells[1]:>24}")
        for seed in seeds:
            runs += 1
            better += by[(family.name, "warning", seed)] < by[(family.name, "defaults", seed)]
    lines.append(f"acting on the warning ended with the lower loss in {better} of {runs} runs")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one healthy and one diverging family, fewer seeds")
    parser.add_argument("--respond", action="store_true", help="acting on the warning against the defaults")
    parser.add_argument("--cost", action="store_true", help="the update size's cost per step, side by side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-table", action="store_true", help="skip the table (with --cost: the cost alone)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_table:
        lines = cost() if args.cost else []
        print("\n".join(lines))
        return {"cost": lines}
    fams = families(args.quick)
    tuning = TUNING_SEEDS[:1] if args.quick else TUNING_SEEDS
    evaluation = EVALUATION_SEEDS[:1] if args.quick else EVALUATION_SEEDS
    start = time.perf_counter()
    tuned = collect(fams, tuning, args.quick, args.workers)
    chosen = choose(tuned)
    evaluated = collect(fams, evaluation, args.quick, args.workers)
    print(f"early warning: {len(fams)} families, thresholds chosen on seeds {tuning}, reported on seeds {evaluation} "
          f"({time.perf_counter() - start:.0f} s)")
    for signal, options in chosen.items():
        print(f"  chosen for {signal}: {options}")
    lines = table(evaluated, chosen)
    print("\n".join(lines))
    result: dict[str, Any] = {"chosen": chosen, "evaluated": evaluated, "tuned": tuned, "table": lines}
    if args.respond:
        result["respond"] = respond(fams, evaluation, chosen, args.workers)
        print("\n".join(result["respond"]))
    if args.cost:
        result["cost"] = cost()
        print("\n".join(result["cost"]))
    return result


if __name__ == "__main__":
    main()

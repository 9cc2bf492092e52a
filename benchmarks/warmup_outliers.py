"""Warm-up outliers: is an outlier batch flagged as often during the detector's warm-up as after it, and does a
healthy warm-up raise nothing? (issue 17, item 2)

Each family trains a small model at its defaults under ``gg.Guard(model, optimizer)`` for ``--steps`` healthy steps
(data shipped with scikit-learn or Python, nothing downloaded): an MLP and a small CNN on digits, the lab's LSTM
language model and its small causal transformer on characters, and the soak's regression MLP
(``benchmarks/soak.py``), each under SGD with momentum and under AdamW. The run records what the detector sees at
every step (the total gradient norm, the loss, the layers' norms) and the Guard's own events.

**Healthy**: the events the Guard raised on the run (any kind), in the warm-up (the first ``warmup_steps``) and
after it. The target is none.

**Outliers**: for every step ``k`` from the fourth on, and every kind of outlier, the detector (the library's own
code, started from its state before step ``k`` on the recorded run) scores step ``k``'s values with the outlier in:

* ``row x100``: one row of 16 with a x100 loss, the gradients as recorded (a mislabeled row under cross-entropy,
  whose gradient is bounded while its loss is not): the loss x115/16 = x7.2;
* ``loss xN``: the loss alone ``N`` times larger (the gradients as recorded): the ``loss`` slot;
* ``grad xN``: the gradients ``N`` times larger (every layer's norm and the total), the loss as recorded: the total
  norm's slot.

The flag rate is the share of steps ``k`` whose outlier raised ``loss_spike`` or ``grad_spike`` in each phase: the
warm-up (``k`` from 3 to ``warmup_steps - 1``), the ``HANDOVER`` steps after it (the moving statistics start from
the warm-up's), and later; the target is a warm-up rate no lower than the later one.

The warm-up's floors were read off the healthy runs of the **tuning seeds**; the table is for the **evaluation
seeds** (``--seeds``). ``--detector EXPR`` scores with another detector (``EXPR`` evaluated in ``gradguard.detect``,
e.g. ``"Detector(warmup_loss_sigma_floor=0.5)"``); the Guard's own healthy run uses it too.

    python benchmarks/warmup_outliers.py [--seeds 5 6 7] [--steps 150] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard import detect
from gradguard.lab.models import CausalTransformer, DeepMLP, RecurrentLM
from gradguard.lab.tasks import char_batch, char_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (the soak's regression MLP and its data)
from early_warning import CNN  # noqa: E402  (the early warning's digits CNN)

TUNING_SEEDS = (0, 1, 2, 3, 4)  # the warm-up floors were read off the healthy runs of these (their first 25 steps)
EVALUATION_SEEDS = (5, 6, 7)
#: kind -> (loss factor, gradient factor); "row x100": one row of 16 with a x100 loss, the others as they were
KINDS = {"row x100": (115.0 / 16.0, 1.0), "loss x10": (10.0, 1.0), "loss x100": (100.0, 1.0), "grad x10": (1.0, 10.0),
         "grad x100": (1.0, 100.0)}
FIRST_SCORED = detect.MIN_WARMUP_VALUES  # the fourth step (index 3) is the first a warm-up scores
CONTEXT = 32
#: where a step falls: the warm-up, the HANDOVER steps after it (the moving statistics start from the warm-up's), later
PHASES = ("warm-up", "after", "later")
HANDOVER = 50


def phase_of(step: int, warmup: int) -> int:
    return 0 if step < warmup else 1 if step < warmup + HANDOVER else 2


_DATA: dict[str, Any] = {}


def digits(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if "digits" not in _DATA:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        _DATA["digits"] = ((x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(d.target, dtype=torch.int64))
    x, y = _DATA["digits"]
    index = torch.randint(0, len(x), (32,), generator=generator)
    return x[index], y[index]


def chars(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if "chars" not in _DATA:
        _DATA["chars"] = char_corpus(30_000)
    return char_batch(_DATA["chars"].train_ids, 16, CONTEXT, generator)


def regression(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if "regression" not in _DATA:  # the soak's teacher and noise, one long stream of batches
        x, y, _, _ = soak.make_data(0, 400)
        _DATA["regression"] = (x.reshape(-1, soak.IN_FEATURES), y.reshape(-1, 1))
    x, y = _DATA["regression"]
    index = torch.randint(0, len(x), (soak.BATCH,), generator=generator)
    return x[index], y[index]


def vocab() -> int:
    if "chars" not in _DATA:
        _DATA["chars"] = char_corpus(30_000)
    return len(_DATA["chars"].vocab)


@dataclass(frozen=True)
class Family:
    name: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    data: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _sgd(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)


def _adamw(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def families() -> list[Family]:
    mse = nn.functional.mse_loss
    mlp = lambda: DeepMLP(64, 10, depth=2, width=128, activation="relu")  # noqa: E731
    lstm = lambda: RecurrentLM(vocab(), 64, "lstm")  # noqa: E731
    gpt = lambda: CausalTransformer(vocab(), CONTEXT, d_model=32, n_layer=2, n_head=4)  # noqa: E731
    return [
        Family("MLP digits, SGD", mlp, _sgd(0.05), digits, _cross_entropy),
        Family("MLP digits, AdamW", mlp, _adamw(1e-3), digits, _cross_entropy),
        Family("CNN digits, SGD", CNN, _sgd(0.05), digits, _cross_entropy),
        Family("CNN digits, AdamW", CNN, _adamw(1e-3), digits, _cross_entropy),
        Family("LSTM chars, SGD", lstm, _sgd(0.5), chars, _cross_entropy),
        Family("LSTM chars, AdamW", lstm, _adamw(3e-3), chars, _cross_entropy),
        Family("transformer chars, SGD", gpt, _sgd(0.1), chars, _cross_entropy),
        Family("transformer chars, AdamW", gpt, _adamw(3e-3), chars, _cross_entropy),
        Family("soak MLP, SGD", soak.make_model, _sgd(soak.LEARNING_RATE), regression, mse),
        Family("soak MLP, AdamW", soak.make_model, _adamw(soak.ADAMW_LR), regression, mse),
    ]


def make_detector(expr: str | None) -> detect.Detector:
    return detect.Detector() if expr is None else eval(expr, vars(detect))  # noqa: S307 (a benchmark option)


@dataclass
class Result:
    family: str
    seed: int
    warmup_steps: int
    healthy_warmup: list[str]  # "step:kind" of the Guard's events on the healthy run, in the warm-up
    healthy_after: list[str]
    flagged: dict[str, list[int]]  # kind -> [flagged, scored] per phase (PHASES), flattened
    seconds: float


def run(task: tuple[int, int, int, str | None]) -> Result:
    """One family and seed: the healthy guarded run, then every step's outliers scored from the recorded state."""
    index, seed, steps, expr = task
    torch.set_num_threads(1)
    family = families()[index]
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = family.model()
    optimizer = family.optimizer(model.parameters())
    guard = gg.Guard(model, optimizer, detector=make_detector(expr), log_every=steps)
    generator = torch.Generator().manual_seed(seed)
    seen: list[tuple[gg.GradStats, Tensor]] = []  # per step: the gradients' statistics and the loss
    for _ in range(steps):
        x, y = family.data(generator)
        loss = family.loss(model(x), y)
        loss.backward()
        stats = gg.grad_stats(model)
        seen.append((stats, loss.detach().clone()))
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    warmup = guard.detector.warmup_steps
    events = [(r["step"], e["kind"]) for r in guard.history for e in r["events"]]
    healthy_warmup = [f"{s}:{k}" for s, k in events if s < warmup]
    healthy_after = [f"{s}:{k}" for s, k in events if s >= warmup]
    # the detector's state before each step, on the recorded healthy run
    detector = make_detector(expr)
    states = []
    for stats, loss in seen:
        states.append(detector.state_dict())
        detector.update(stats, loss)
    flagged: dict[str, list[int]] = {}
    for kind, (loss_factor, grad_factor) in KINDS.items():
        counts = [0] * (2 * len(PHASES))
        for k in range(FIRST_SCORED, steps):
            stats, loss = seen[k]
            probe = make_detector(expr)
            probe.load_state_dict(states[k])
            outlier = replace(stats, total_norm=stats.total_norm * grad_factor, norms=stats.norms * grad_factor)
            verdict = probe.update(outlier, loss * loss_factor)
            hit = bool(verdict.flag("loss_spike") | verdict.flag("grad_spike"))
            slot = 2 * phase_of(k, warmup)
            counts[slot] += hit
            counts[slot + 1] += 1
        flagged[kind] = counts
    return Result(family.name, seed, warmup, healthy_warmup, healthy_after, flagged, time.perf_counter() - start)


def table(results: list[Result]) -> str:
    lines = ["| family | healthy runs with an event in the warm-up / after | "
             + " | ".join(f"{kind}: {' / '.join(PHASES)}" for kind in KINDS) + " |",
             "|---|---|" + "---|" * len(KINDS)]
    by_family: dict[str, list[Result]] = {}
    for r in results:
        by_family.setdefault(r.family, []).append(r)
    total = {kind: [0] * (2 * len(PHASES)) for kind in KINDS}
    runs = [0, 0, 0]

    def rates(c: list[int]) -> str:
        return " / ".join(f"{c[2 * i] / c[2 * i + 1]:.0%}" if c[2 * i + 1] else "-" for i in range(len(PHASES)))

    for name, rows in by_family.items():
        cells = []
        for kind in KINDS:
            c = [sum(r.flagged[kind][i] for r in rows) for i in range(2 * len(PHASES))]
            total[kind] = [a + b for a, b in zip(total[kind], c)]
            cells.append(rates(c))
        warm = sum(1 for r in rows if r.healthy_warmup)
        after = sum(1 for r in rows if r.healthy_after)
        runs = [runs[0] + warm, runs[1] + after, runs[2] + len(rows)]
        lines.append(f"| {name} | {warm} / {after} of {len(rows)} | " + " | ".join(cells) + " |")
    lines.append(f"| all | {runs[0]} / {runs[1]} of {runs[2]} | " + " | ".join(rates(t) for t in total.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(EVALUATION_SEEDS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--detector", default=None, help="a Detector expression evaluated in gradguard.detect")
    parser.add_argument("--families", type=int, nargs="+", default=None, help="indexes into families()")
    args = parser.parse_args()
    chosen = args.families if args.families is not None else range(len(families()))
    tasks = [(i, seed, args.steps, args.detector) for i in chosen for seed in args.seeds]
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(run, tasks)
    else:
        results = [run(task) for task in tasks]
    print(f"detector: {args.detector or 'Detector()'}; seeds {args.seeds}; {args.steps} steps; "
          f"{time.perf_counter() - start:.0f} s")
    print(table(results))
    for r in results:
        if r.healthy_warmup or r.healthy_after:
            print(f"  healthy {r.family} seed {r.seed}: warm-up {r.healthy_warmup} after {r.healthy_after}")


if __name__ == "__main__":
    main()

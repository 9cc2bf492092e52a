"""Recurrent defaults over longer and other runs: does ``ArmedAutoClip`` (the Guard's default clip for gated
recurrent models) arm only where a clip is needed?

``benchmarks/recurrent_defaults.py`` measures healthy language models of 300 steps; a clip that arms stays armed,
so what matters is also what a healthy run meets later: a cliff (one gradient norm 10x the last), or the noise of
small batches whose loss sits on a few hard samples. Workloads (nothing downloaded: the standard library's Python
sources, scikit-learn's digits, the temporal order problem):

* ``LSTM LM, SGD lr L`` (L = 15, 20, 30): the lab's character-level language model of Python source (256 units,
  batches of 16 windows of 32 characters, 300 steps): it explodes without a clip, which must arm early;
* ``LSTM LM, SGD lr 10``: the same model at lr 10, which trains unguarded;
* ``LSTM LM, SGD lr 1, 1500 steps``: 128 units, a healthy run 5x as long (one 10.9x jump at step 181, seed 10);
* ``GRU digit rows, SGD + OneCycle``: a GRU (64 units) reads the 8 rows of each 8x8 digit and classifies it;
  SGD momentum 0.9, OneCycle to lr 0.1, label smoothing 0.1, batches of 32, 1500 steps (a new user's run);
* ``LSTM digit rows, AdamW + cosine``: two LSTM layers of 64, AdamW lr 3e-3, cosine, batches of 16, 1500 steps;
* ``temporal order LSTM``: the lab's (chrono init, SGD lr 0.5 momentum 0.9, T=20, 400 steps), which learns
  unguarded.

Remedies: no Guard; ``gg.Guard(model, opt)`` at its defaults; and the Guard with the clip before
``arm_steps``, ``ArmedAutoClip(arm_steps=10**9)`` (armed by a roughness of 0.6, or one 10x jump, at any step). It
prints the held-out loss (accuracy for the temporal order problem) and the clipped steps per seed.

    python benchmarks/recurrent_long.py [--seeds 10 11] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg
from gradguard.clip import ArmedAutoClip
from gradguard.init import chrono_
from gradguard.lab.models import LSTMModel, RecurrentLM
from gradguard.lab.tasks import char_batch, python_source_corpus, temporal_order_problem

NO_GUARD, GUARD, BEFORE = "no Guard", "Guard (defaults)", "Guard, the clip before (arms at any step)"
REMEDIES = (NO_GUARD, GUARD, BEFORE)


def _guard(remedy: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> gg.Guard | None:
    if remedy == NO_GUARD:
        return None
    if remedy == GUARD:
        return gg.Guard(model, optimizer, scheduler=scheduler)
    return gg.Guard(model, optimizer, scheduler=scheduler, clip=ArmedAutoClip(arm_steps=10**9))


def _step(guard: gg.Guard | None, optimizer: torch.optim.Optimizer, scheduler: Any, loss: torch.Tensor) -> None:
    loss.backward()
    if guard is not None:
        guard.step(loss)
    else:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _clipped(guard: gg.Guard | None) -> int:
    return 0 if guard is None else int(guard.summary()["clipped"])


def language_model(remedy: str, seed: int, lr: float, steps: int, hidden: int) -> tuple[float, int]:
    corpus = python_source_corpus()
    torch.manual_seed(seed)
    model = RecurrentLM(corpus.vocab_size, hidden, "lstm")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    guard, generator = _guard(remedy, model, optimizer), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = char_batch(corpus.train_ids, 16, 32, generator)
        _step(guard, optimizer, None, F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    x, y = char_batch(corpus.val_ids, 256, 32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())), _clipped(guard)


class DigitRows(nn.Module):
    """A recurrent classifier of 8x8 digits read as 8 rows of 8 pixels: the last step's state, then linear."""

    def __init__(self, cell: str, layers: int):
        super().__init__()
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(8, 64, num_layers=layers, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def digit_rows(remedy: str, seed: int, cell: str, steps: int = 1500) -> tuple[float, int]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 8, 8)
    y = torch.tensor(digits.target)
    order = np.random.default_rng(123).permutation(len(x))
    train, test = order[:1347], order[1347:]
    torch.manual_seed(seed)
    if cell == "gru":
        model, batch = DigitRows("gru", 1), 32
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
        loss_fn: Callable[..., torch.Tensor] = nn.CrossEntropyLoss(label_smoothing=0.1)
    else:
        model, batch = DigitRows("lstm", 2), 16
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        loss_fn = nn.CrossEntropyLoss()
    guard, rows = _guard(remedy, model, optimizer, scheduler), np.random.default_rng(seed)
    for _ in range(steps):
        index = train[rows.integers(0, len(train), batch)]
        _step(guard, optimizer, scheduler, loss_fn(model(x[index]), y[index]))
    with torch.no_grad():
        return float(F.cross_entropy(model(x[test]), y[test])), _clipped(guard)


def temporal_order(remedy: str, seed: int, steps: int = 400) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = chrono_(LSTMModel(8, 32, 4), 20, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    guard, generator = _guard(remedy, model, optimizer), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = temporal_order_problem(64, 20, generator)
        _step(guard, optimizer, None, F.cross_entropy(model(x), y))
    x, y = temporal_order_problem(1000, 20, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()), _clipped(guard)


WORKLOADS: dict[str, Callable[[str, int], tuple[float, int]]] = {
    "LSTM LM, SGD lr 30": lambda remedy, seed: language_model(remedy, seed, 30.0, 300, 256),
    "LSTM LM, SGD lr 20": lambda remedy, seed: language_model(remedy, seed, 20.0, 300, 256),
    "LSTM LM, SGD lr 15": lambda remedy, seed: language_model(remedy, seed, 15.0, 300, 256),
    "LSTM LM, SGD lr 10": lambda remedy, seed: language_model(remedy, seed, 10.0, 300, 256),
    "LSTM LM, SGD lr 1, 1500 steps": lambda remedy, seed: language_model(remedy, seed, 1.0, 1500, 128),
    "GRU digit rows, SGD + OneCycle": lambda remedy, seed: digit_rows(remedy, seed, "gru"),
    "LSTM digit rows, AdamW + cosine": lambda remedy, seed: digit_rows(remedy, seed, "lstm"),
    "temporal order LSTM (accuracy)": temporal_order,
}


def run(task: tuple[str, str, int]) -> tuple[str, str, int, float, int, float]:
    torch.set_num_threads(1)
    workload, remedy, seed = task
    start = time.perf_counter()
    score, clipped = WORKLOADS[workload](remedy, seed)
    return workload, remedy, seed, score, clipped, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tasks = [(w, r, s) for w in args.workloads for r in REMEDIES for s in args.seeds]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run, tasks, chunksize=1)
    seconds = [r[-1] for r in results]
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s, {args.workers} workers; median "
          f"{statistics.median(seconds):.1f} s a run; seeds {args.seeds}")
    by = {(w, r, s): (score, clipped) for w, r, s, score, clipped, _ in results}
    print("| workload | " + " | ".join(REMEDIES) + " |")
    print("|---|" + "---|" * len(REMEDIES))
    for workload in args.workloads:
        cells = []
        for remedy in REMEDIES:
            per_seed = [by[workload, remedy, seed] for seed in args.seeds]
            cells.append(", ".join(f"{score:.4g} ({clipped})" for score, clipped in per_seed))
        print(f"| {workload} | " + " | ".join(cells) + " |")
    print("(per seed: held-out loss, or accuracy; in brackets the steps the Guard clipped)")


if __name__ == "__main__":
    main()

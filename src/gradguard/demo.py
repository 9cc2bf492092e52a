"""``gradguard demo``: a tanh RNN on the adding problem, at a learning rate where its gradients explode.

The adding problem (Hochreiter & Schmidhuber 1997): a sequence of random numbers in [0, 1], two of them
marked; the target is their sum. The answer depends on inputs far back in the sequence, so the gradient
flows through many steps of the recurrence, where it grows like the recurrent weight's spectral radius to
the power of the distance (Pascanu, Mikolov & Bengio 2013). The recurrent weights start with spectral
radius 1.5 and plain SGD runs at a learning rate that is fine most of the time and ruinous on the steps
whose gradient explodes.

The same data, initialisation and learning rate are trained three times:

1. unguarded: the loss goes non-finite and the weights with it;
2. clipped with ``gg.clip.ZClip()`` alone;
3. guarded with ``gg.Guard(model, optimizer, clip=gg.clip.ZClip())``: it also skips non-finite steps and
   spikes of the loss, backs off the learning rate and rolls back if it must, and counts what it did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import gradguard as gg

SEQUENCE_LENGTH = 40
HIDDEN = 48
BATCH = 64
LEARNING_RATE = 0.05
SPECTRAL_RADIUS = 1.5


def adding_batch(generator: torch.Generator, batch: int = BATCH, length: int = SEQUENCE_LENGTH):
    """Inputs ``(batch, length, 2)``: a value channel and a marker channel with two ones; target: the sum
    of the two marked values, ``(batch, 1)``. The first mark falls in the first half of the sequence."""
    values = torch.rand(batch, length, generator=generator)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    markers = torch.zeros(batch, length)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=-1), target


class AddingRNN(nn.Module):
    """A one-layer tanh RNN read out from its last hidden state."""

    def __init__(self, hidden: int = HIDDEN, spectral_radius: float = SPECTRAL_RADIUS):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():  # an orthogonal matrix has all singular values 1: scale them to the radius
            weight_hh = self.rnn.weight_hh_l0
            assert isinstance(weight_hh, torch.Tensor)
            nn.init.orthogonal_(weight_hh)
            weight_hh.mul_(spectral_radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@dataclass
class RunResult:
    name: str
    final_loss: float
    largest_grad_norm: float
    went_nonfinite: bool
    weights_finite: bool
    seconds: float
    summary: dict[str, int] | None = None
    events: dict[str, int] | None = None


def _train(name: str, steps: int, seed: int, mode: str) -> RunResult:
    torch.manual_seed(seed)
    model = AddingRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    zclip = gg.clip.ZClip()
    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip()) if mode == "guard" else None
    data = torch.Generator().manual_seed(seed + 1)
    largest, nonfinite, losses = 0.0, False, []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = adding_batch(data)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = float(gg.grad_stats(model).total_norm)  # measured for this printout only (a host read)
        largest = max(largest, norm) if math.isfinite(norm) else math.inf
        value = float(loss.detach())
        nonfinite = nonfinite or not math.isfinite(value)
        losses.append(value)
        if guard is not None:
            guard.step(loss)
        else:
            if mode == "zclip":
                zclip(model)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    summary: dict[str, int] | None = None
    events: dict[str, int] | None = None
    if guard is not None:
        guard.close()
        summary = guard.summary()
        counts: dict[str, int] = {}
        for record in guard.history:
            for event in record["events"]:
                counts[event["kind"]] = counts.get(event["kind"], 0) + 1
        events = counts
    tail = losses[-20:]
    return RunResult(
        name=name,
        final_loss=sum(tail) / len(tail),
        largest_grad_norm=largest,
        went_nonfinite=nonfinite,
        weights_finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        seconds=time.perf_counter() - start,
        summary=summary,
        events=events,
    )


def run_demo(steps: int = 300, seed: int = 0) -> list[RunResult]:
    """Train the three runs and print what happened to each; returns the results."""
    torch.set_num_threads(1)  # a small RNN: threads cost more than they give
    print(
        f"gradguard demo: tanh RNN (hidden {HIDDEN}, recurrent spectral radius {SPECTRAL_RADIUS}) on the adding "
        f"problem (length {SEQUENCE_LENGTH}), SGD lr {LEARNING_RATE}, {steps} steps, seed {seed}."
    )
    print("Predicting the mean scores about 0.167 (MSE); learning the task scores near 0.\n")
    results = [
        _train("unguarded", steps, seed, mode="none"),
        _train("gg.clip.ZClip()", steps, seed, mode="zclip"),
        _train("gg.Guard(clip=ZClip())", steps, seed, mode="guard"),
    ]
    header = f"{'run':<24} {'final loss':>11} {'largest grad norm':>18} {'loss non-finite':>16} {'weights':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        weights = "finite" if r.weights_finite else "NaN/Inf"
        print(
            f"{r.name:<24} {r.final_loss:>11.4g} {r.largest_grad_norm:>18.4g} "
            f"{'yes' if r.went_nonfinite else 'no':>16} {weights:>8}"
        )
    guarded = results[-1].summary
    if guarded is not None:
        print(
            f"\nThe Guard: {guarded['steps']} steps, {guarded['skipped']} skipped, {guarded['clipped']} clipped, "
            f"{guarded['rollbacks']} rollbacks, {guarded['lr_backoffs']} LR back-offs."
        )
        seen = ", ".join(f"{kind} x{count}" for kind, count in sorted((results[-1].events or {}).items()))
        print(f"Events in guard.history: {seen or 'none'}.")
    print(f"({sum(r.seconds for r in results):.1f} s)")
    return results

"""``gradguard demo``: a tanh RNN whose gradients explode through time, trained without and with the Guard.

The task is the temporal order problem (Hochreiter & Schmidhuber 1997, experiment 6a; the lab's
``temporal_order_problem``): a sequence of random symbols holds an ``X`` or a ``Y`` at two times far apart,
and the class is their order (XX, XY, YX, YY). The answer depends on inputs far back in the sequence, so
the gradient flows through many steps of the recurrence, where it grows like the recurrent weight's
spectral radius to the power of the distance (Pascanu, Mikolov & Bengio 2013). The recurrent weights
start with spectral radius 1.5; SGD with momentum runs at a learning rate that is fine on most steps and
throws the weights off a cliff of the loss surface on the steps whose gradient explodes.

The same data, initialisation and learning rate are trained three times:

1. unguarded: each time the run starts to learn, a gradient spike throws it back to chance;
2. clipped with ``gg.clip.ZClip()`` alone;
3. guarded with ``gg.Guard(model, optimizer)`` at its defaults: for a model with recurrent layers the
   default clip is ``gg.clip.AutoClip(percentile=5.0)`` (every step clipped at the 5th percentile of the
   norms seen so far, Seetharaman et al. 2020), and the Guard also skips non-finite steps and loss spikes,
   backs off the learning rate and rolls back if it must, and counts what it did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import gradguard as gg
from gradguard.lab.models import TanhRNN
from gradguard.lab.tasks import TEMPORAL_ORDER_CLASSES, TEMPORAL_ORDER_SYMBOLS, temporal_order_problem

SEQUENCE_LENGTH = 20
HIDDEN = 32
BATCH = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9
SPECTRAL_RADIUS = 1.5
#: the cross-entropy of a model that has learned nothing (uniform over the 4 classes)
CHANCE_LOSS = math.log(len(TEMPORAL_ORDER_CLASSES))


@dataclass
class RunResult:
    name: str
    final_loss: float
    test_accuracy: float
    largest_grad_norm: float
    went_nonfinite: bool
    weights_finite: bool
    seconds: float
    summary: dict[str, int] | None = None
    events: dict[str, int] | None = None
    clip: str | None = None  # the Guard's clip strategy


def _train(name: str, steps: int, seed: int, mode: str) -> RunResult:
    torch.manual_seed(seed)
    model = TanhRNN(len(TEMPORAL_ORDER_SYMBOLS), HIDDEN, len(TEMPORAL_ORDER_CLASSES), SPECTRAL_RADIUS)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    zclip = gg.clip.ZClip()
    guard = gg.Guard(model, optimizer) if mode == "guard" else None
    data = torch.Generator().manual_seed(seed + 1)
    largest, nonfinite, losses = 0.0, False, []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = temporal_order_problem(BATCH, SEQUENCE_LENGTH, data)
        loss = nn.functional.cross_entropy(model(x), y)
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
    seconds = time.perf_counter() - start
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
    test_x, test_y = temporal_order_problem(1000, SEQUENCE_LENGTH, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        test_accuracy = float((model(test_x).argmax(dim=-1) == test_y).float().mean())
    tail = losses[-20:]
    return RunResult(
        name=name,
        final_loss=sum(tail) / len(tail),
        test_accuracy=test_accuracy,
        largest_grad_norm=largest,
        went_nonfinite=nonfinite,
        weights_finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        seconds=seconds,
        summary=summary,
        events=events,
        clip=repr(guard.clip) if guard is not None else None,
    )


def run_demo(steps: int = 300, seed: int = 0) -> list[RunResult]:
    """Train the three runs and print what happened to each; returns the results."""
    torch.set_num_threads(1)  # a small RNN: threads cost more than they give
    print(
        f"gradguard demo: tanh RNN (hidden {HIDDEN}, recurrent spectral radius {SPECTRAL_RADIUS}) on the temporal "
        f"order problem (length {SEQUENCE_LENGTH}, 4 classes), SGD lr {LEARNING_RATE} momentum {MOMENTUM}, "
        f"{steps} steps, seed {seed}."
    )
    print(f"Chance (a model that learned nothing) scores a loss of {CHANCE_LOSS:.3f} and 25% accuracy; "
          "learning the task scores near 0 and 100%.\n")
    results = [
        _train("unguarded", steps, seed, mode="none"),
        _train("gg.clip.ZClip()", steps, seed, mode="zclip"),
        _train("gg.Guard(model, opt)", steps, seed, mode="guard"),
    ]
    header = (f"{'run':<22} {'final loss':>11} {'test accuracy':>14} {'largest grad norm':>18} "
              f"{'loss non-finite':>16} {'weights':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        weights = "finite" if r.weights_finite else "NaN/Inf"
        print(
            f"{r.name:<22} {r.final_loss:>11.4g} {r.test_accuracy:>14.1%} {r.largest_grad_norm:>18.4g} "
            f"{'yes' if r.went_nonfinite else 'no':>16} {weights:>8}"
        )
    guarded = results[-1].summary
    if guarded is not None:
        print(
            f"\nThe Guard (defaults; its clip: {results[-1].clip}): {guarded['steps']} steps, "
            f"{guarded['skipped']} skipped, {guarded['clipped']} clipped, {guarded['rollbacks']} rollbacks, "
            f"{guarded['lr_backoffs']} LR back-offs."
        )
        seen = ", ".join(f"{kind} x{count}" for kind, count in sorted((results[-1].events or {}).items()))
        print(f"Events in guard.history: {seen or 'none'}.")
    print(f"({sum(r.seconds for r in results):.1f} s of training)")
    return results

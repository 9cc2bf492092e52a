"""A loss that moves for good: does the Guard let a healthy run go on when its loss floor rises and stays?

A real run's loss can rise for good without anything going wrong: a harder data mixture, more label noise, a
loss term switched on. A loss spike is never learned by the detector (a loss that stays high says the weights
went bad), so before the relevel (``gradguard.recover``, ``Recovery._level_moved``) every later step was a
spike: a back-off, a rollback, rollbacks to the same snapshot until ``TrainingDiverged``.

Each run is the soak's regression MLP (``benchmarks/soak.py``: its model, data, SGD and AdamW settings), 400
steps; from a random step in [60, 250) the batches' labels carry extra noise, so that the loss's floor is
``factor`` times what it was (``factor`` 3, 10, 30, 100). The same schedule runs under ``gg.Guard(model,
optimizer)`` at its defaults and with the optimizer alone. Reported per factor and optimizer: runs ended by
``TrainingDiverged`` (the target is none: every run is healthy), ``loss_relevel`` events, skipped steps,
rollbacks, the LR at the end over the start, and the held-out loss (noise-free labels) over the optimizer
alone's (a run stopped early, or rolled back to before the shift, looks *better* there: it did not train on
the noisy labels; read it with the first column).

``--stretch``: the cost side. The same noise (std 3, the loss's floor x100) for ``STRETCHES`` steps from step 150,
then clean data again: bad data that lasts and whose losses agree is taken for a new level and trained on.
Reported: the held-out loss over the optimizer alone's (lower: the bad stretch did less harm).

    python benchmarks/level_shift.py [--seeds 0 20] [--workers 2] [--stretch]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import gradguard as gg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (the soak's regression MLP, its data and optimizers)

FACTORS = (3, 10, 30, 100)
OPTIMIZERS = ("SGD", "AdamW")
STEPS = 400
SHIFT_STEPS = range(60, 250)  # where the loss's floor rises
STRETCH_AT, STRETCHES, STRETCH_FACTOR = 150, (30, 100), 101  # --stretch: noise of std 3 = sqrt(101 - 1) * NOISE


def run(task: tuple[int, int, str, bool], length: int | None = None) -> tuple[tuple[int, int, str, bool], dict[str, float]]:
    """One run: ``(seed, factor, optimizer, guarded)`` -> its outcome; ``length``: the noise for that many steps
    from ``STRETCH_AT`` (None: for good, from a random step)."""
    seed, factor, optimizer_name, guarded = task
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    shift_at = random.Random(seed).choice(SHIFT_STEPS) if length is None else STRETCH_AT
    shift_end = STEPS if length is None else STRETCH_AT + length
    torch.manual_seed(seed)
    model = soak.make_model()
    optimizer = soak.make_optimizer(optimizer_name, soak.CONFIGS[0], list(model.parameters()))
    guard = gg.Guard(model, optimizer) if guarded else None
    x, y, x_test, y_test = soak.make_data(seed, STEPS)
    noise = torch.Generator().manual_seed(seed + 1)
    extra = math.sqrt(factor - 1) * soak.NOISE  # the loss's floor NOISE**2 becomes factor * NOISE**2
    diverged = False
    try:
        for step in range(STEPS):
            target = y[step]
            if shift_at <= step < shift_end:
                target = target + extra * torch.randn(target.shape, generator=noise)
            loss = torch.nn.functional.mse_loss(model(x[step]), target)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if guard is not None:
            guard.close()
    except gg.TrainingDiverged:
        diverged = True
    with torch.no_grad():
        held_out = float(torch.nn.functional.mse_loss(model(x_test), y_test))
    summary = guard.summary() if guard is not None else {}
    relevels = 0 if guard is None else sum(
        1 for record in guard.history for event in record["events"] if event["kind"] == "loss_relevel")
    base_lr = soak.ADAMW_LR if optimizer_name == "AdamW" else soak.LEARNING_RATE
    return task, {"diverged": float(diverged), "held_out": held_out, "skipped": summary.get("skipped", 0),
                  "rollbacks": summary.get("rollbacks", 0), "relevels": relevels,
                  "lr_ratio": optimizer.param_groups[0]["lr"] / base_lr}


def table(out: dict[tuple[int, int, str, bool], dict[str, float]], seeds: range) -> str:
    lines = ["| loss floor after the shift | optimizer | TrainingDiverged | relevels | skipped: median / max | "
             "rollbacks: max | LR end / start: min | held-out loss / optimizer alone: median / max |",
             "|---|---|---|---|---|---|---|---|"]
    for factor in FACTORS:
        for name in OPTIMIZERS:
            guarded = [out[(s, factor, name, True)] for s in seeds]
            ratios = [g["held_out"] / out[(s, factor, name, False)]["held_out"] for s, g in zip(seeds, guarded)]
            skipped = [g["skipped"] for g in guarded]
            lines.append(
                f"| x{factor} | {name} | {int(sum(g['diverged'] for g in guarded))} / {len(guarded)} | "
                f"{int(sum(g['relevels'] for g in guarded))} | {statistics.median(skipped):g} / {max(skipped):g} | "
                f"{max(g['rollbacks'] for g in guarded):g} | {min(g['lr_ratio'] for g in guarded):.2f} | "
                f"{statistics.median(ratios):.3f} / {max(ratios):.3f} |")
    return "\n".join(lines)


def stretch(task: tuple[int, int, str, bool]) -> tuple[tuple[int, int, str, bool], dict[str, float]]:
    """``task``'s second entry is the stretch's length (the factor is ``STRETCH_FACTOR``)."""
    seed, length, optimizer_name, guarded = task
    return task, run((seed, STRETCH_FACTOR, optimizer_name, guarded), length)[1]


def stretch_table(out: dict[tuple[int, int, str, bool], dict[str, float]], seeds: range) -> str:
    lines = ["| bad stretch (noise std 3 from step 150) | optimizer | TrainingDiverged | relevels | "
             "held-out loss / optimizer alone: median / max |", "|---|---|---|---|---|"]
    for length in STRETCHES:
        for name in OPTIMIZERS:
            guarded = [out[(s, length, name, True)] for s in seeds]
            ratios = [g["held_out"] / out[(s, length, name, False)]["held_out"] for s, g in zip(seeds, guarded)]
            lines.append(f"| {length} steps | {name} | {int(sum(g['diverged'] for g in guarded))} / {len(guarded)} | "
                         f"{int(sum(g['relevels'] for g in guarded))} | {statistics.median(ratios):.3f} / {max(ratios):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 20], metavar=("FIRST", "END"),
                        help="seeds FIRST .. END-1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stretch", action="store_true", help="the cost side: a bad stretch that ends")
    args = parser.parse_args()
    seeds = range(*args.seeds)
    if not seeds:
        raise SystemExit(f"level_shift: --seeds {args.seeds[0]} {args.seeds[1]} is empty")
    sizes = STRETCHES if args.stretch else FACTORS
    tasks = [(s, f, name, guarded) for f in sizes for name in OPTIMIZERS for s in seeds for guarded in (True, False)]
    start = time.perf_counter()
    with multiprocessing.Pool(max(1, args.workers)) as pool:
        out = dict(pool.map(stretch if args.stretch else run, tasks))
    print(f"seeds {seeds.start}-{seeds.stop - 1}; {STEPS} steps; {time.perf_counter() - start:.0f} s")
    print(stretch_table(out, seeds) if args.stretch else table(out, seeds))


if __name__ == "__main__":
    main()

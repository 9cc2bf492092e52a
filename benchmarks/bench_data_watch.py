"""The data watch (``gg.forensics.DataWatch``): precision and recall on a corrupted corpus, and its cost.

**Detection.** A character model (``gradguard.lab.bad_data.CharConvLM``, 3 causal convolutions of width
128, 0.2M parameters) is trained for ``--steps`` steps of 32 rows of 64 bytes of the standard library's
Python source, one pass in a shuffled order, with 1% of the rows corrupted (repeated character, padding
only, shuffled targets, random bytes; ``gradguard.lab.bad_data``), under a Guard with a ``DataWatch``.
Precision: flagged rows that are corrupted; recall: corrupted rows seen after the watch's warm-up that it
flagged, overall and per kind. The watch's defaults were set on seed 0; seeds 1 and 2 check them.

**Cost.** In one run, on healthy data (no row corrupted), two identical models train side by side, the
steps interleaved (their order alternating): one under ``Guard(data_watch=DataWatch())`` with
``sample_losses``, one under a plain ``Guard``. Each step (forward, backward, ``guard.step``, zero_grad) is
timed; the report gives the median of each, their ratio, and the time of the watch's own call
(``observe``, timed inside the watched steps) over the median step. Host syncs: ``gg.count_host_syncs``
around the watch's call and around a guarded step with and without it.

    python benchmarks/bench_data_watch.py [--steps 600] [--seeds 0 1 2] [--cost-steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import gradguard as gg
from gradguard.forensics.watch import DataWatch
from gradguard.lab.bad_data import KINDS, CharConvLM, sample_losses, source_rows, train_watched


def detection(seeds: list[int], steps: int) -> None:
    print(f"detection: {steps} steps x 32 rows x 64 bytes, 1% corrupted, DataWatch() defaults")
    print(f"{'seed':>4} {'precision':>9} {'recall':>6} " + " ".join(f"{k:>9}" for k in KINDS)
          + f" {'flagged':>7} {'false+':>6} {'spikes':>6}")
    for seed in seeds:
        run = train_watched(seed=seed, steps=steps)
        by_kind = " ".join(f"{run.flagged_by_kind[k]:>3}/{sum(1 for v in run.corrupted_seen.values() if v == k):<3}  "
                           for k in KINDS)
        print(f"{seed:>4} {run.precision or 0:>9.2f} {run.recall or 0:>6.2f} {by_kind} {len(run.suspects):>7} "
              f"{run.false_positives:>6} {run.spikes:>6}")


def cost(steps: int) -> None:
    rows = source_rows(steps * 32)
    torch.manual_seed(0)
    models = [CharConvLM(), CharConvLM()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    watch = DataWatch()
    guards = [gg.Guard(models[0], optimizers[0], data_watch=watch, log_every=50),
              gg.Guard(models[1], optimizers[1], log_every=50)]
    observe = watch.observe
    observed: list[float] = []

    def timed_observe(*args, **kwargs):
        start = time.perf_counter()
        observe(*args, **kwargs)
        observed.append(time.perf_counter() - start)

    watch.observe = timed_observe  # type: ignore[method-assign]
    times: list[list[float]] = [[], []]
    syncs = {}
    for step in range(steps):
        ids = torch.arange(step * 32, (step + 1) * 32)
        x, y = rows[ids, :-1], rows[ids, 1:]
        for which in ((0, 1) if step % 2 == 0 else (1, 0)):
            counting = step == steps - 2  # one steady step that does not flush: its guard.step's host reads
            start = time.perf_counter()
            losses = sample_losses(models[which], x, y)
            loss = losses.mean()
            loss.backward()
            with gg.count_host_syncs() if counting else contextlib.nullcontext() as counter:
                if which == 0:
                    guards[0].step(loss, batch=(x, y, ids), sample_losses=losses)
                else:
                    guards[1].step(loss)
            optimizers[which].zero_grad(set_to_none=True)
            if counting:
                syncs[which] = counter.count
            else:
                times[which].append(time.perf_counter() - start)
    with gg.count_host_syncs() as counter:
        observe(losses.detach(), (x, y, ids), steps)
    for guard in guards:
        guard.close()
    skip = min(50, steps // 4)  # the warm-up of the detector and of the watch
    watched, plain = statistics.median(times[0][skip:]), statistics.median(times[1][skip:])
    own = statistics.median(observed[skip:])
    print(f"cost: {steps} healthy steps side by side ({steps - skip} timed), {torch.get_num_threads()} thread(s)")
    print(f"  median step, plain Guard:            {plain * 1e3:8.3f} ms")
    print(f"  median step, Guard + DataWatch:      {watched * 1e3:8.3f} ms   ratio {watched / plain:.4f}")
    print(f"  the watch's own call (observe):      {own * 1e6:8.1f} us   = {own / plain:.2%} of a plain step")
    print(f"  host syncs: observe {counter.count}; guard.step {syncs[1]} without the watch, {syncs[0]} with it "
          "(the same: the watch adds none; on the CPU, AdamW reads its step counter once per parameter)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cost-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-detection", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cost(args.cost_steps)
    if not args.skip_detection:
        detection(args.seeds, args.steps)


if __name__ == "__main__":
    main()

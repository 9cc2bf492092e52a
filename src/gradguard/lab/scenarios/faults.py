"""Faults: corrupted batches and NaN gradients injected into an otherwise healthy run.

Real runs meet rare bad batches (a mis-scaled input) and numerical faults (a NaN in the backward pass).
One NaN gradient reaches every weight through ``optimizer.step()`` and the run is lost; one batch scaled
by 1e4 gives a gradient 1e4 times too large and one update throws the weights away. The Guard is meant to
skip non-finite steps and clip spikes; a plain global-norm clip bounds the spike but lets NaN through.

The Guard runs with forensics on (``gg.Forensics``): in the ``bad samples`` fault three samples of a healthy
batch are corrupted (inputs x -1e3, at known positions), and the samples forensics names on the bad steps
are scored against them (precision and recall). The sign matters: a ReLU network is positively
homogeneous, so a sample scaled by +1e3 that the model already classifies right only gets a more confident
right answer (loss and gradient near 0: no bad step at all); scaled by -1e3 it gets a confidently wrong
one. The NaN-gradient fault is injected after the backward pass, so a recomputed step does not reproduce
it, which forensics should report (``reproducible`` False).

``silent bad data`` is the fault no step shows: 1% of the rows of a character model's corpus (Python
source) are corrupted (a repeated character, padding only, shuffled targets, random bytes;
``gradguard.lab.bad_data``), which moves a batch's gradient norm by a percent or two: the detector, which
watches the whole batch, is not built to see it, and forensics runs only on the steps it flags. The Guard runs with a data watch (``gg.forensics.DataWatch``) fed the
per-sample losses; the rows it flags are scored against the corrupted ones (precision, and recall over the
corrupted rows seen after its warm-up), beside the number of steps the detector flagged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradguard.forensics.watch import DataWatch
from gradguard.lab.bad_data import train_watched
from gradguard.lab.models import DeepMLP
from gradguard.lab.record import make_record
from gradguard.lab.remedies import make_remedy, remedy_label
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import digits_split
from gradguard.lab.training import Faults, TrainLog, accuracy, evaluate_loss, train

NAME = "faults"
TITLE = "Faults: bad batches and NaN gradients, without and with the Guard"
CLAIM = (
    "A single NaN gradient or a single batch scaled by 1e4 ruins an unprotected run (NaN weights or a "
    "loss that never comes back); the Guard skips or clips those steps and the run ends as if they had "
    "not happened."
)

FAULT_KINDS = ("clean", "bad batch", "NaN grad", "bad samples")
#: The fault no step shows, run on its own task (a character model) under the Guard with a data watch.
SILENT = "silent bad data"
REMEDIES: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "global_norm": {"name": "global_norm", "max_norm": 5.0},
    "guard": {"name": "guard", "forensics": {}},
}
#: Positions, in the batch of 64, of the corrupted samples of the ``bad samples`` fault, and their factor.
BAD_SAMPLE_POSITIONS = (5, 23, 41)
BAD_SAMPLE_SCALE = -1e3


def grid(quick: bool, seeds: int | None, steps: int | None) -> list[RunConfig]:
    configs = []
    total_steps = steps or (300 if quick else 1000)
    for fault in FAULT_KINDS:
        for remedy in REMEDIES:
            for seed in seed_list(quick, seeds, quick_default=2, full_default=5):
                configs.append(
                    {
                        "scenario": NAME,
                        "variant": f"{fault} / {remedy_label(REMEDIES[remedy])}",
                        "seed": seed,
                        "fault": fault,
                        "fault_steps": fault_steps(fault, total_steps),
                        "remedy": REMEDIES[remedy],
                        "depth": 4,
                        "width": 128,
                        "steps": total_steps,
                        "batch_size": 64,
                        "lr": 0.05,
                    }
                )
    for seed in seed_list(quick, seeds, quick_default=2, full_default=5):
        configs.append({"scenario": NAME, "variant": f"{SILENT} / Guard + data watch", "seed": seed, "fault": SILENT,
                        "fault_steps": [], "remedy": {"name": "guard", "data_watch": {}},
                        "steps": steps or (150 if quick else 600), "batch_size": 32, "lr": 3e-3})
    return configs


def fault_steps(fault: str, steps: int) -> list[int]:
    """Three faults, at 1/4, 1/2 and 3/4 of the run (none for the clean run)."""
    if fault == "clean":
        return []
    return sorted({steps // 4, steps // 2, 3 * steps // 4})


def run(config: RunConfig) -> Record:
    if config["fault"] == SILENT:
        return run_silent(config)
    data = digits_split()
    model = DeepMLP(data.num_features, 10, config["depth"], config["width"], "relu")
    generator = torch.Generator().manual_seed(config["seed"])

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(data.x_train), (config["batch_size"],), generator=generator)
        return data.x_train[index], data.y_train[index]

    steps = frozenset(config["fault_steps"])
    faults = {
        "clean": Faults(),
        "bad batch": Faults(bad_batch_steps=steps),
        "NaN grad": Faults(nan_grad_steps=steps),
        "bad samples": Faults(bad_sample_steps=steps, bad_sample_positions=BAD_SAMPLE_POSITIONS,
                              bad_sample_scale=BAD_SAMPLE_SCALE),
    }[config["fault"]]
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    remedy = make_remedy(config["remedy"], model, optimizer, loss_fn=F.cross_entropy)
    log = train(model, remedy, next_batch, F.cross_entropy, config["steps"], faults=faults)
    train_accuracy = accuracy(model, data.x_train, data.y_train)
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    return make_record(
        config,
        log,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        generalization_gap=train_accuracy - test_accuracy,
        test_loss=evaluate_loss(model, F.cross_entropy, data.x_test, data.y_test),
        remedy_summary=remedy.summary(),
        **forensics_scores(remedy, faults),
        remedy_config=remedy.describe(),
    )


def run_silent(config: RunConfig) -> Record:
    """The silent bad data fault: ``bad_data.train_watched`` (a Guard with a data watch), scored."""
    watched = train_watched(seed=config["seed"], steps=config["steps"], batch_size=config["batch_size"],
                            lr=config["lr"], watch=DataWatch(**config["remedy"]["data_watch"]))
    log = TrainLog(losses=watched.losses, grad_norms=watched.grad_norms, seconds=watched.seconds)
    return make_record(
        config,
        log,
        watch_precision=watched.precision,
        watch_recall=watched.recall,
        watch_flagged=len(watched.suspects),
        watch_corrupted_seen=len(watched.corrupted_seen),
        watch_recall_by_kind=watched.recall_by_kind,
        detector_flagged_steps=watched.spikes,
        remedy_config=f"gg.Guard(model, optimizer, data_watch=gg.forensics.DataWatch({config['remedy']['data_watch'] or ''}))",
    )


def forensics_scores(remedy: Any, faults: Faults) -> dict[str, Any]:
    """Precision and recall of the samples forensics named (against the corrupted ones, where samples were
    corrupted), and how many analysed steps reproduced."""
    forensics = getattr(getattr(remedy, "guard", None), "forensics", None)
    if forensics is None:
        return {}
    truth = {(step, i) for step in faults.bad_sample_steps for i in faults.bad_sample_positions}
    named = {(s["step"], s["id"]) for s in forensics.bad_samples}
    hits = len(truth & named)
    return {
        "forensics_analysed": len(forensics.analyses),
        "forensics_reproducible": sum(bool(a["reproducible"]) for a in forensics.analyses),
        "forensics_named": len(named),
        "forensics_precision": hits / len(named) if truth and named else None,
        "forensics_recall": hits / len(truth) if truth else None,
    }

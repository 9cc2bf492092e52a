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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradguard.lab.models import DeepMLP
from gradguard.lab.record import make_record
from gradguard.lab.remedies import make_remedy, remedy_label
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import digits_split
from gradguard.lab.training import Faults, accuracy, evaluate_loss, train

NAME = "faults"
TITLE = "Faults: bad batches and NaN gradients, without and with the Guard"
CLAIM = (
    "A single NaN gradient or a single batch scaled by 1e4 ruins an unprotected run (NaN weights or a "
    "loss that never comes back); the Guard skips or clips those steps and the run ends as if they had "
    "not happened."
)

FAULT_KINDS = ("clean", "bad batch", "NaN grad", "bad samples")
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
    return configs


def fault_steps(fault: str, steps: int) -> list[int]:
    """Three faults, at 1/4, 1/2 and 3/4 of the run (none for the clean run)."""
    if fault == "clean":
        return []
    return sorted({steps // 4, steps // 2, 3 * steps // 4})


def run(config: RunConfig) -> Record:
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

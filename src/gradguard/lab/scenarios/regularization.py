"""Regularization: none / L1 / L2 on the digits with a small training set.

A common claim links exploding gradients to overfitting: large weights make large gradients and a
network that fits its training set by heart, and weight penalties (L2: Krogh & Hertz 1992, "A simple
weight decay can improve generalization"; L1: Tibshirani 1996) are said to fix both. The scenario
measures the weight norms, the gradient norms and the train/test accuracy gap, and the report says
whether the numbers support the link, whatever they show.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradguard.lab.models import DeepMLP
from gradguard.lab.record import make_record
from gradguard.lab.remedies import Remedy
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import digits_split
from gradguard.lab.training import accuracy, evaluate_loss, train

NAME = "regularization"
TITLE = "Regularization: L1 and L2 penalties with a small training set"
CLAIM = (
    "Exploding gradients are often said to cause overfitting, and L1/L2 penalties to cure both: smaller "
    "weights, smaller gradients, a smaller train/test gap. Tested on the digits with 150 training images."
)

PENALTIES = {"none": {"l1": 0.0, "l2": 0.0}, "L1": {"l1": 1e-4, "l2": 0.0}, "L2": {"l1": 0.0, "l2": 1e-3}}


def grid(quick: bool, seeds: int | None, steps: int | None) -> list[RunConfig]:
    configs = []
    for name, penalty in PENALTIES.items():
        for seed in seed_list(quick, seeds, quick_default=2, full_default=5):
            configs.append(
                {
                    "scenario": NAME,
                    "variant": name,
                    "seed": seed,
                    **penalty,
                    "n_train": 150,
                    "depth": 3,
                    "width": 256,
                    "activation": "relu",
                    "steps": steps or (400 if quick else 2000),
                    "lr": 1e-3,
                }
            )
    return configs


def weight_norm(model: torch.nn.Module) -> float:
    """L2 norm of all weight matrices together (biases left out, as the penalties leave them out)."""
    weights = [p.detach() for name, p in model.named_parameters() if name.endswith("weight")]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in weights])))


def run(config: RunConfig) -> Record:
    data = digits_split(n_train=config["n_train"])
    model = DeepMLP(data.num_features, 10, config["depth"], config["width"], config["activation"])
    initial_weight_norm = weight_norm(model)
    penalty = None
    if config["l1"] or config["l2"]:
        from gradguard import regularize

        def penalty(model: torch.nn.Module) -> torch.Tensor:
            return regularize.penalty(model, l1=config["l1"], l2=config["l2"])

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.x_train, data.y_train  # full batch: the whole (small) training set every step

    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    log = train(model, Remedy(optimizer), next_batch, F.cross_entropy, config["steps"], penalty=penalty)
    train_accuracy = accuracy(model, data.x_train, data.y_train)
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    return make_record(
        config,
        log,
        initial_weight_norm=initial_weight_norm,
        final_weight_norm=weight_norm(model),
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        generalization_gap=train_accuracy - test_accuracy,
        test_loss=evaluate_loss(model, F.cross_entropy, data.x_test, data.y_test),
    )

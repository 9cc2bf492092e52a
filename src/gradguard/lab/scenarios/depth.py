"""Depth: a deep MLP on the digits, activation x initialization.

Glorot & Bengio 2010 ("Understanding the difficulty of training deep feedforward neural networks") and
He et al. 2015 ("Delving Deep into Rectifiers"): the variance of the back-propagated error is multiplied
at every layer by ``fan * Var(W) * E[f'(z)^2]``; with N(0, 1) weights that factor is far above 1 and the
gradient grows geometrically with depth, while Xavier (tanh/sigmoid) and He (ReLU) keep it near 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.lab.diagnosis import gradient_flow_at_init
from gradguard.lab.models import DeepMLP
from gradguard.lab.record import make_record
from gradguard.lab.remedies import make_remedy, remedy_label
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import digits_split
from gradguard.lab.training import accuracy, evaluate_loss, train

NAME = "depth"
TITLE = "Depth: activation and initialization of a deep MLP"
CLAIM = (
    "In a deep network the gradient is a product of one factor per layer, so a poor initialization "
    "(N(0, 1) weights) makes it explode geometrically with depth and training fails, while Xavier "
    "(Glorot & Bengio 2010) for tanh/sigmoid and He (He et al. 2015) for ReLU keep it level and train."
)

ACTIVATIONS = ("sigmoid", "tanh", "relu")
INITS = ("normal", "default", "xavier", "he")
INIT_LABELS = {"normal": "N(0,1)", "default": "torch default", "xavier": "Xavier", "he": "He"}


#: the healthy runs (the initialization each activation is meant to train with; sigmoid does not train at
#: this depth whatever its init): the Guard at its defaults runs there too, to show that it costs nothing
HEALTHY_INIT = {"tanh": "xavier", "relu": "he"}
GUARD = {"name": "guard"}


def grid(quick: bool, seeds: int | None, steps: int | None) -> list[RunConfig]:
    configs = []
    for activation in ACTIVATIONS:
        variants: list[tuple[str, dict[str, Any] | None]] = [(init, None) for init in INITS]
        if activation in HEALTHY_INIT:
            variants.append((HEALTHY_INIT[activation], GUARD))
        for init, remedy in variants:
            for seed in seed_list(quick, seeds, quick_default=2, full_default=5):
                variant = f"{activation} / {INIT_LABELS[init]}"
                if remedy is not None:
                    variant += " / " + remedy_label(remedy)
                config: RunConfig = {
                    "scenario": NAME,
                    "variant": variant,
                    "seed": seed,
                    "activation": activation,
                    "init": init,
                    "depth": 12 if quick else 20,
                    "width": 64,
                    "steps": steps or (600 if quick else 2000),
                    "batch_size": 64,
                    "lr": 0.01,
                }
                if remedy is not None:  # configs without a remedy keep their cache keys
                    config["remedy"] = remedy
                configs.append(config)
    return configs


def apply_init(model: DeepMLP, init: str, activation: str) -> None:
    """Re-initialise the Linear layers: ``normal`` is N(0, 1) weights and zero biases (the naive init);
    ``default`` keeps torch's; ``xavier`` and ``he`` are ``gg.init``'s."""
    if init == "default":
        return
    if init == "normal":
        with torch.no_grad():
            for linear in model.linear_layers():
                nn.init.normal_(linear.weight, mean=0.0, std=1.0)
                nn.init.zeros_(linear.bias)
        return
    from gradguard import init as gg_init

    if init == "xavier":
        gg_init.xavier_(model)
    elif init == "he":
        gg_init.he_(model)
    else:
        raise ValueError(f"depth: init must be one of {INITS}, got {init!r}")


def run(config: RunConfig) -> Record:
    data = digits_split()
    model = DeepMLP(data.num_features, 10, config["depth"], config["width"], config["activation"])
    apply_init(model, config["init"], config["activation"])
    generator = torch.Generator().manual_seed(config["seed"])
    probe = torch.randperm(len(data.x_train), generator=generator)[:256]
    flow = gradient_flow_at_init(model, (data.x_train[probe], data.y_train[probe]), F.cross_entropy)

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(data.x_train), (config["batch_size"],), generator=generator)
        return data.x_train[index], data.y_train[index]

    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    remedy = make_remedy(config.get("remedy", {"name": "none"}), model, optimizer)
    log = train(model, remedy, next_batch, F.cross_entropy, config["steps"])
    train_accuracy = accuracy(model, data.x_train, data.y_train)
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    return make_record(
        config,
        log,
        layer_flow=flow,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        generalization_gap=train_accuracy - test_accuracy,
        test_loss=evaluate_loss(model, F.cross_entropy, data.x_test, data.y_test),
        remedy_summary=remedy.summary(),
        remedy_config=remedy.describe(),
    )

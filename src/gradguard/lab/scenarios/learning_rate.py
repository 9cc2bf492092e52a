"""Learning rate: a small causal transformer on a character-level language model at a too-high LR.

With a learning rate above the stable range, each update overshoots: the loss oscillates, grows, and the
weights can reach Inf/NaN. A gradient-norm cap bounds the size of each SGD update (``lr * max_norm``), so
clipping is expected to turn divergence into (slower) training; the scenario measures how much each
strategy buys at the same too-high learning rate, next to a run at a sane learning rate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradguard.lab.models import CausalTransformer
from gradguard.lab.record import make_record
from gradguard.lab.remedies import make_remedy, remedy_label
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import char_batch, char_corpus
from gradguard.lab.training import evaluate_loss, train

NAME = "learning_rate"
TITLE = "Learning rate: a causal transformer at a too-high learning rate"
CLAIM = (
    "At a learning rate far above the stable one, updates overshoot: the loss oscillates and diverges "
    "(non-finite weights). Clipping the gradient bounds each update, so clipped runs stay finite and "
    "keep learning at the same learning rate."
)

GOOD_LR = 0.3
HIGH_LRS = (3.0,)
REMEDIES: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "global_norm": {"name": "global_norm", "max_norm": 1.0},
    "zclip": {"name": "zclip"},
    "autoclip": {"name": "autoclip"},
    "agc": {"name": "agc", "exclude": ["head"]},
    "guard": {"name": "guard"},
    "guard_zclip": {"name": "guard", "clip": {"name": "zclip"}},
}


def _config(seed: int, lr: float, remedy: str, quick: bool, steps: int | None) -> RunConfig:
    return {
        "scenario": NAME,
        "variant": f"lr {lr:g} / {remedy_label(REMEDIES[remedy])}",
        "seed": seed,
        "lr": lr,
        "remedy": REMEDIES[remedy],
        "context": 32,
        "d_model": 48,
        "n_layer": 2,
        "n_head": 4,
        "batch_size": 16,
        "steps": steps or (200 if quick else 1000),
    }


def grid(quick: bool, seeds: int | None, steps: int | None) -> list[RunConfig]:
    configs = []
    for seed in seed_list(quick, seeds, quick_default=2, full_default=5):
        configs.append(_config(seed, GOOD_LR, "none", quick, steps))
        configs.append(_config(seed, GOOD_LR, "guard", quick, steps))  # a healthy run: the Guard costs nothing
        for lr in HIGH_LRS if quick else (*HIGH_LRS, 1.0):
            for remedy in REMEDIES:
                if quick and remedy == "guard_zclip":  # the quick grid keeps the Guard at its defaults only
                    continue
                configs.append(_config(seed, lr, remedy, quick, steps))
    return configs


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def run(config: RunConfig) -> Record:
    corpus = char_corpus()
    model = CausalTransformer(
        corpus.vocab_size, config["context"], config["d_model"], config["n_layer"], config["n_head"]
    )
    generator = torch.Generator().manual_seed(config["seed"])

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return char_batch(corpus.train_ids, config["batch_size"], config["context"], generator)

    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    remedy = make_remedy(config["remedy"], model, optimizer)
    log = train(model, remedy, next_batch, _lm_loss, config["steps"])
    val_inputs, val_targets = char_batch(corpus.val_ids, 256, config["context"], torch.Generator().manual_seed(1))
    return make_record(
        config,
        log,
        val_loss=evaluate_loss(model, _lm_loss, val_inputs, val_targets),
        remedy_summary=remedy.summary(),
        remedy_config=remedy.describe(),
    )

"""Transformers: the two small-scale instabilities of Wortsman et al. 2023, across a learning-rate sweep.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv
2309.14322) train small transformers with AdamW over a sweep of learning rates and find:

* attention-logit growth at high learning rates: the largest attention logit grows by orders of
  magnitude and the attention entropy collapses; qk-layernorm removes it (``gg.qk_norm``);
* output-logit divergence: ``log Z`` of the output softmax drifts far from 0; the z-loss
  ``1e-4 * log^2 Z`` removes it (``gg.regularize.z_loss``);
* their summary, the LR sensitivity ``E_lr[min(L(lr), L_0) - min_lr L(lr)]`` (final loss capped at the
  loss at initialisation ``L_0``), is much smaller with qk-layernorm.

Here: the lab's small GPT on the character corpus, AdamW (beta2 0.95, the paper's independent weight
decay 1e-4 per step), linear warm-up over the first quarter of the steps then cosine decay to a tenth;
each remedy at each learning rate. Every ``PROBE_EVERY`` steps the forward pass runs under the
doctor's :class:`~gradguard.explain.attention.AttentionRecorder` (largest attention logit, smallest head
entropy) and records ``log Z`` of the output. The early-warning detector (``gg.precursor``, at its defaults
and at the other operating points of ``PRECURSORS``) runs on the device alongside, on the gradient statistics
every step already has and the weight norm every 10th step; its first warning is read once, at the end of
the run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradguard.explain.attention import AttentionRecorder, log_z_tensor
from gradguard.lab.models import CausalTransformer
from gradguard.lab.record import json_float, make_record
from gradguard.lab.remedies import Batch, GuardRemedy, Remedy, make_remedy
from gradguard.lab.scenarios import Record, RunConfig, seed_list
from gradguard.lab.tasks import char_batch, char_corpus
from gradguard.lab.training import evaluate_loss, train
from gradguard.precursor import Precursor, weight_norm
from gradguard.regularize import z_loss
from gradguard.stats import GradStats

NAME = "transformers"
TITLE = "Transformers: attention-logit growth and output-logit divergence across learning rates"
CLAIM = (
    "Wortsman et al. 2023: in a small transformer trained with AdamW at high learning rates, the attention "
    "logits grow until attention is one-hot (qk-layernorm prevents it), and log Z of the output softmax drifts "
    "far from 0 (the z-loss 1e-4 log^2 Z prevents it); qk-layernorm makes the final loss less sensitive to the "
    "learning rate. Beyond the paper: a signal computed on the device, from statistics the Guard already has, "
    "warns at least 50 steps before a run diverges."
)

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # the range of Wortsman et al. 2023; 1.0 diverges
QUICK_LRS = (3e-3, 3e-2, 0.3, 1.0)
PROBE_EVERY = 10
Z_LOSS = 1e-4
#: the early-warning detector's defaults, and other operating points measured alongside (same runs)
PRECURSORS: dict[str, dict[str, float | None]] = {
    "default (weights x2.5 in 10 steps, or grad norm ratio 4, alpha 0.9)": {},
    "weights x2 in 10 steps, or grad norm ratio 4": {"weight_ratio": 2.0},
    "weights x2.5 in 20 steps, or grad norm ratio 4": {"weight_every": 20},
    "grad norm alone: ratio 4, alpha 0.9": {"weight_ratio": None},
    "grad norm alone: ratio 2, alpha 0.8, floor x2 in 50 steps": {"weight_ratio": None, "ratio": 2.0, "alpha": 0.8,
                                                                 "rate": math.log(2.0) / 50},
}

#: remedy key -> (label, the lab remedy between backward and step, qk-layernorm, z-loss coefficient)
REMEDIES: dict[str, dict[str, Any]] = {
    "none": {"label": "no remedy", "remedy": {"name": "none"}, "qk_norm": False, "z_loss": 0.0},
    "global_norm": {"label": "GlobalNorm(1)", "remedy": {"name": "global_norm", "max_norm": 1.0},
                    "qk_norm": False, "z_loss": 0.0},
    "qk_norm": {"label": "qk-layernorm", "remedy": {"name": "none"}, "qk_norm": True, "z_loss": 0.0},
    "z_loss": {"label": "z-loss", "remedy": {"name": "none"}, "qk_norm": False, "z_loss": Z_LOSS},
    "both": {"label": "qk-layernorm + z-loss", "remedy": {"name": "none"}, "qk_norm": True, "z_loss": Z_LOSS},
    "guard": {"label": "Guard (defaults)", "remedy": {"name": "guard"}, "qk_norm": False, "z_loss": 0.0},
}


def variant_name(remedy: str, lr: float) -> str:
    return f"{REMEDIES[remedy]['label']} / lr {lr:g}"


def _config(seed: int, lr: float, remedy: str, quick: bool, steps: int | None) -> RunConfig:
    spec = REMEDIES[remedy]
    total = steps or (200 if quick else 400)
    return {
        "scenario": NAME,
        "variant": variant_name(remedy, lr),
        "remedy_key": remedy,
        "seed": seed,
        "lr": lr,
        "remedy": spec["remedy"],
        "qk_norm": spec["qk_norm"],
        "z_loss": spec["z_loss"],
        "context": 32,
        "d_model": 48,
        "n_layer": 2,
        "n_head": 4,
        "batch_size": 16,
        "steps": total,
        "warmup": max(1, total // 4),
        "weight_decay": 1e-4,
        "precursors": PRECURSORS,
    }


def grid(quick: bool, seeds: int | None, steps: int | None) -> list[RunConfig]:
    configs = []
    for seed in seed_list(quick, seeds, quick_default=1, full_default=3):
        for remedy in REMEDIES:
            for lr in QUICK_LRS if quick else LRS:
                configs.append(_config(seed, lr, remedy, quick, steps))
    return configs


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class ProbedTransformer(CausalTransformer):
    """The lab's transformer, measured while it trains: every ``probe_every``-th training forward runs under
    the doctor's ``AttentionRecorder``; each training forward keeps its logits (for the z-loss)."""

    def __init__(self, *args: Any, probe_every: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.probe_every = probe_every
        self.calls = 0
        self.logits: Tensor | None = None
        self.probes: list[tuple[int, Tensor]] = []  # (step, [max logit, min entropy, mean log Z]) on device
        self.uniform_entropy: float | None = None

    def forward(self, ids: Tensor) -> Tensor:
        if not self.training:
            return super().forward(ids)
        step, self.calls = self.calls, self.calls + 1
        if step % self.probe_every:
            self.logits = super().forward(ids)
            return self.logits
        with AttentionRecorder(self) as recorder:
            self.logits = super().forward(ids)
        stats = recorder.device_stats()
        max_logit = torch.stack([value[0] for value in stats.values()]).max()
        min_entropy = torch.stack([value[1] for value in stats.values()]).min()
        self.probes.append((step, torch.stack([max_logit, min_entropy, log_z_tensor(self.logits).mean()])))
        if self.uniform_entropy is None:
            self.uniform_entropy = recorder.stats()[0].uniform_entropy
        return self.logits


class ScheduledStep(Remedy):
    """The run's remedy, then the LR schedule (the Guard steps the schedule itself, only on real steps),
    and the early-warning detectors fed with the step's gradient statistics (on the device)."""

    def __init__(self, remedy: Remedy, scheduler: Any, precursors: dict[str, Precursor]):
        super().__init__(remedy.optimizer)
        self.remedy = remedy
        self.scheduler = scheduler
        self.precursors = precursors

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        weights: Tensor | None = None
        for precursor in self.precursors.values():
            if precursor.wants_weights() and weights is None:
                weights = weight_norm(p for group in self.optimizer.param_groups for p in group["params"])
            precursor.update(stats.total_norm, weights if precursor.wants_weights() else None)
        self.remedy.step(loss, stats, batch=batch)
        if self.scheduler is not None:
            self.scheduler.step()

    def summary(self) -> dict[str, int]:
        return self.remedy.summary()


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def run(config: RunConfig) -> Record:
    cpu_start = time.process_time()
    corpus = char_corpus()
    model = ProbedTransformer(corpus.vocab_size, config["context"], config["d_model"], config["n_layer"],
                              config["n_head"], qk_norm=config["qk_norm"], probe_every=PROBE_EVERY)
    generator = torch.Generator().manual_seed(config["seed"])

    def next_batch(step: int) -> tuple[Tensor, Tensor]:
        return char_batch(corpus.train_ids, config["batch_size"], config["context"], generator)

    lr, steps, warmup = config["lr"], config["steps"], config["warmup"]
    # the paper's independent weight decay: AdamW multiplies weight_decay by the lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=config["weight_decay"] / lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps))
    precursors = {name: Precursor(**options) for name, options in config["precursors"].items()}
    if config["remedy"]["name"] == "guard":  # the Guard advances the schedule after each step it takes
        remedy: Remedy = GuardRemedy(model, optimizer, {"scheduler": scheduler})
        step = ScheduledStep(remedy, None, precursors)
    else:
        remedy = make_remedy(config["remedy"], model, optimizer)
        step = ScheduledStep(remedy, scheduler, precursors)
    coef = config["z_loss"]

    def penalty(module: torch.nn.Module) -> Tensor:
        assert model.logits is not None
        return z_loss(model.logits, coef)

    log = train(model, step, next_batch, _lm_loss, steps, penalty=penalty if coef else None)
    val_inputs, val_targets = char_batch(corpus.val_ids, 256, config["context"], torch.Generator().manual_seed(1))
    probe_steps = [s for s, _ in model.probes]
    probes = torch.stack([values for _, values in model.probes]).tolist() if model.probes else []
    max_logits = [json_float(p[0]) for p in probes]
    entropies = [json_float(p[1]) for p in probes]
    log_z = [json_float(p[2]) for p in probes]
    finite_log_z = [v for v in log_z if v is not None]
    warnings = {name: precursor.first_warning() for name, precursor in precursors.items()}
    record = make_record(
        config,
        log,
        val_loss=evaluate_loss(model, _lm_loss, val_inputs, val_targets),
        remedy_summary=remedy.summary(),
        max_attn_logit=max((v for v in max_logits if v is not None), default=None),
        min_attn_entropy=min((v for v in entropies if v is not None), default=None),
        final_attn_entropy=entropies[-1] if entropies else None,
        uniform_attn_entropy=model.uniform_entropy,
        log_z_initial=log_z[0] if log_z else None,
        log_z_final=log_z[-1] if log_z else None,
        log_z_drift=max((abs(v - finite_log_z[0]) for v in finite_log_z), default=None),
        warning_step=next(iter(warnings.values())),  # the defaults' (first in PRECURSORS)
        warning_steps=warnings,
        cpu_seconds=round(time.process_time() - cpu_start, 3),
    )
    record["curves"]["max_attn_logit"] = {"step": probe_steps, "value": max_logits}
    record["curves"]["min_attn_entropy"] = {"step": probe_steps, "value": entropies}
    record["curves"]["log_z"] = {"step": probe_steps, "value": log_z}
    return record

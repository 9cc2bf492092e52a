"""What the lab's training loop does with the gradients between ``loss.backward()`` and the parameter
update: nothing, one of the core's clipping strategies, or the Guard.

A remedy is named in a run's config as a dict, e.g. ``{"name": "zclip"}`` or
``{"name": "global_norm", "max_norm": "pascanu"}``, so that configs stay JSON and hashable. The clipping
itself is always the library's (``gradguard.clip``); nothing is re-implemented here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import clip as gg_clip
from gradguard.explain import suggest_clip_threshold
from gradguard.forensics import Forensics
from gradguard.guard import Guard
from gradguard.stats import GradStats

#: name -> label used in tables and plots
REMEDY_LABELS = {
    "none": "no remedy",
    "global_norm": "GlobalNorm",
    "value": "Value",
    "layer_norm": "LayerNorm",
    "zclip": "ZClip",
    "autoclip": "AutoClip",
    "agc": "AGC",
    "guard": "Guard",
}

#: remedy name -> the library's clipping strategy
CLIPPERS: dict[str, type[gg_clip.Clipper]] = {
    "global_norm": gg_clip.GlobalNorm,
    "value": gg_clip.Value,
    "layer_norm": gg_clip.LayerNorm,
    "zclip": gg_clip.ZClip,
    "autoclip": gg_clip.AutoClip,
    "agc": gg_clip.AGC,
}


def remedy_label(spec: dict[str, Any]) -> str:
    """The label of a remedy spec: ``{"name": "guard", "clip": {"name": "zclip"}}`` -> "Guard + ZClip";
    ``{"name": "guard"}`` -> "Guard (defaults)" (``gg.Guard(model, optimizer)``); forensics, which explains
    bad steps without changing what the Guard does, is added: "Guard (defaults) + forensics"."""
    label = REMEDY_LABELS[spec["name"]]
    if spec["name"] == "guard":
        label += " + " + REMEDY_LABELS[spec["clip"]["name"]] if spec.get("clip") else " (defaults)"
        if "forensics" in spec:
            label += " + forensics"
    return label


Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Remedy:
    """Apply the remedy to the gradients and update the parameters (or not)."""

    label = "no remedy"

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        del loss, stats, batch
        self.optimizer.step()

    def summary(self) -> dict[str, int]:
        return {}

    def describe(self) -> str:
        """What the remedy is, as code ("" for none): the report says what each row ran."""
        return ""


class ClipRemedy(Remedy):
    """One of ``gradguard.clip``'s strategies, then ``optimizer.step()``; counts the clipped steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: gg_clip.Clipper, label: str):
        super().__init__(optimizer)
        self.clipper = clipper
        self.label = label
        self.clipped = 0

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        del loss, batch
        result = self.clipper(stats.params, stats=stats)
        self.clipped += int(result.clipped)
        self.optimizer.step()

    def summary(self) -> dict[str, int]:
        return {"clipped": self.clipped}

    def describe(self) -> str:
        return repr(self.clipper)


class GuardRemedy(Remedy):
    """``gg.Guard``: measures, decides, clips, and calls ``optimizer.step()`` itself or skips the step."""

    label = "Guard"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: dict[str, Any]):
        super().__init__(optimizer)
        self.guard = Guard(model, optimizer, **options)
        self.options = options

    def step(self, loss: Tensor, stats: GradStats, batch: Batch | None = None) -> None:
        del stats
        self.guard.step(loss, batch=batch if self.guard.forensics is not None else None)

    def summary(self) -> dict[str, int]:
        return {key: int(value) for key, value in self.guard.summary().items()}

    def describe(self) -> str:
        """``gg.Guard(model, optimizer, <options>)``, and the clip strategy it runs (its default's choice)."""
        options = "".join(f", {key}={value!r}" for key, value in self.options.items() if key != "clip")
        return f"gg.Guard(model, optimizer{options}), clip={self.guard.clip!r}"


def pascanu_threshold(
    model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn, steps: int = 20
) -> float:
    """The clipping threshold heuristic of Pascanu, Mikolov & Bengio 2013 (section 3.2: "look at
    statistics on the average norm over a sufficiently large number of updates"), from the doctor's
    ``gg.suggest_clip_threshold``."""
    return float(suggest_clip_threshold(model, list(batches), loss_fn, steps=steps))


def make_remedy(
    spec: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    threshold_batches: Callable[[], Iterable[Batch]] | None = None,
    loss_fn: LossFn | None = None,
) -> Remedy:
    """Build the remedy a config names. ``spec["name"]`` is one of :data:`REMEDY_LABELS`; the other keys
    are the strategy's arguments. ``global_norm`` with ``max_norm="pascanu"`` measures the threshold on
    ``threshold_batches()`` with ``loss_fn`` before training starts."""
    options = {key: value for key, value in spec.items() if key != "name"}
    name = spec.get("name")
    if name == "none":
        return Remedy(optimizer)
    if name == "guard":
        return GuardRemedy(model, optimizer, guard_options(options, loss_fn))
    if name == "global_norm" and options.get("max_norm") == "pascanu":
        if threshold_batches is None or loss_fn is None:
            raise ValueError("remedy 'global_norm' with max_norm='pascanu' needs threshold_batches and loss_fn")
        options["max_norm"] = pascanu_threshold(model, threshold_batches(), loss_fn)
    if name not in CLIPPERS:
        raise ValueError(f"remedy: name must be one of {sorted(REMEDY_LABELS)}, got {name!r}")
    return ClipRemedy(optimizer, CLIPPERS[name](**options), REMEDY_LABELS[name])


def guard_options(options: dict[str, Any], loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Turn a JSON guard spec into ``gg.Guard`` keyword arguments: ``clip`` names a clipper spec;
    ``forensics`` (a dict of ``gg.Forensics`` arguments) turns forensics on, with the run's ``loss_fn``."""
    options = dict(options)
    forensics_spec = options.pop("forensics", None)
    if forensics_spec is not None:
        options["forensics"] = Forensics(loss_fn=loss_fn, **forensics_spec)
    clip_spec = options.pop("clip", None)
    if clip_spec is not None:
        if clip_spec.get("name") not in CLIPPERS:
            raise ValueError(f"remedy 'guard': clip name must be one of {sorted(CLIPPERS)}, got {clip_spec!r}")
        clip_options = {key: value for key, value in clip_spec.items() if key != "name"}
        options["clip"] = CLIPPERS[clip_spec["name"]](**clip_options)
    return options

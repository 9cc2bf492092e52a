"""The lab's scenarios: each one a claim about exploding gradients, tested by a grid of remedy x seed.

A scenario module defines ``NAME``, ``TITLE``, ``CLAIM``, ``grid(quick, seeds, steps)`` (the list of run
configs, plain JSON dicts) and ``run(config)`` (one training run -> its record). The runner executes the
configs; the report groups the records by ``config["variant"]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

RunConfig = dict[str, Any]
#: The record of one lab run (config, metrics, curves; made by ``gradguard.lab.record.make_record``): the lab's
#: one record type, imported by every lab module that handles records. (A guarded step's record is another
#: schema: ``gradguard.history.StepRecord``.)
Record = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    claim: str
    grid: Callable[[bool, int | None, int | None], list[RunConfig]]
    run: Callable[[RunConfig], Record]


def _load(module: ModuleType) -> Scenario:
    return Scenario(module.NAME, module.TITLE, module.CLAIM, module.grid, module.run)


def all_scenarios() -> dict[str, Scenario]:
    """Scenarios by name, in the order the report presents them."""
    from gradguard.lab.scenarios import depth, faults, learning_rate, recurrence, regularization, transformers

    modules = (depth, recurrence, learning_rate, regularization, faults, transformers)
    return {module.NAME: _load(module) for module in modules}


def get_scenario(name: str) -> Scenario:
    scenarios = all_scenarios()
    if name not in scenarios:
        raise ValueError(f"unknown scenario {name!r}; valid scenarios: {', '.join(scenarios)}")
    return scenarios[name]


def build_grid(
    names: list[str] | None = None, quick: bool = False, seeds: int | None = None, steps: int | None = None
) -> list[RunConfig]:
    """The run configs of the named scenarios (all when ``names`` is empty or None).

    ``seeds`` overrides each scenario's number of seeds, ``steps`` its number of training steps (tests).
    """
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    selected = [get_scenario(name) for name in dict.fromkeys(names)] if names else list(all_scenarios().values())
    configs: list[RunConfig] = []
    for scenario in selected:
        configs.extend(scenario.grid(quick, seeds, steps))
    return configs


def execute(config: RunConfig) -> Record:
    """Run one config (in a worker process): seed everything from ``config["seed"]``, then train."""
    seed_everything(config["seed"])
    return get_scenario(config["scenario"]).run(config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_list(quick: bool, seeds: int | None, quick_default: int, full_default: int) -> list[int]:
    count = seeds if seeds is not None else (quick_default if quick else full_default)
    return list(range(count))

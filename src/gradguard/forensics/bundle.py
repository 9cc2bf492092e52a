"""Replay bundles: everything needed to run a bad step again, somewhere else, later.

A bundle is one ``torch.save`` file (read back with ``weights_only=True``: no code is unpickled) holding

* ``model_state``: the model's ``state_dict`` at the bad step (before the optimizer step), on the CPU,
  keys without wrapper prefixes (``gradguard.names.user_name``);
* ``batches``: the step's micro-batches as given to ``guard.step`` (on the CPU), each with the state of
  torch's random-number generators its forward pass started from;
* ``guard``: the Guard's configuration; ``live``: what the Guard saw (events, loss, norms per layer);
  ``forensics``: the analysis of the step.

The model's code is not in the bundle: ``gradguard replay BUNDLE --model FILE.py:factory`` builds the
model with the user's factory (the doctor's ``(model, batch, loss_fn)`` convention), loads the weights,
and runs :func:`replay_step`: ``locate_nonfinite`` and the doctor on the bundled batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from gradguard.batch import Batch, LossFn, as_batch, to_device
from gradguard.explain.nonfinite import NonfiniteOrigin, locate_nonfinite
from gradguard.forensics import rng
from gradguard.names import user_name

__all__ = ["FORMAT", "Bundle", "Replay", "load_bundle", "load_weights", "replay_step", "write_bundle"]

FORMAT = "gradguard-replay"
VERSION = 1


class BundledBatch(TypedDict):
    batch: Any
    rng: rng.RngState | None


class Bundle(TypedDict):
    format: str
    version: int
    step: int
    model_state: dict[str, Tensor]
    batches: list[BundledBatch]
    guard: dict[str, Any]
    live: dict[str, Any]
    forensics: dict[str, Any]


def _plain(value: Any) -> Any:
    """Only what ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, containers."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def write_bundle(directory: str | os.PathLike[str], step: int, model: nn.Module,
                 window: list[tuple[Batch, rng.RngState | None]], guard: dict[str, Any], live: dict[str, Any],
                 forensics: dict[str, Any], rank: int | None = None) -> str:
    """Write ``directory/step{step:08d}.pt`` (``-rank{rank}`` before ``.pt`` when distributed); returns its
    path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"step{step:08d}" + ("" if rank is None else f"-rank{rank}") + ".pt")
    bundle: Bundle = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model_state": {user_name(k): v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "batches": [{"batch": to_device(batch.as_given(), "cpu"), "rng": state} for batch, state in window],
        "guard": _plain(guard),
        "live": _plain(live),
        "forensics": _plain(forensics),
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(bundle, tmp)
    os.replace(tmp, path)  # a bundle is complete or absent
    return str(path)


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle; ``ValueError`` when the file is not one."""
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no such bundle: {path}") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input, said as such
        raise ValueError(f"{path} is not a gradguard replay bundle ({type(error).__name__}: {error})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gradguard replay bundle (no format {FORMAT!r})")
    if bundle.get("version") != VERSION:
        raise ValueError(f"{path}: bundle version {bundle.get('version')!r}, this gradguard reads {VERSION}")
    return bundle  # type: ignore[return-value]


def load_weights(model: nn.Module, bundle: Bundle) -> None:
    """Load the bundled weights into ``model`` (names matched without wrapper prefixes); ``ValueError``
    naming the missing and unexpected entries when the model is not the bundle's."""
    own = {user_name(k): k for k in model.state_dict()}
    state = bundle["model_state"]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"the model does not match the bundle: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({own[k]: v for k, v in state.items()})


@dataclass
class Replay:
    """What a replay found: the first non-finite value (None: none), in which micro-batch of the step."""

    origin: NonfiniteOrigin | None
    micro_batch: int | None
    batch: Any


def replay_step(bundle: Bundle, model: nn.Module, loss_fn: LossFn | None,
           locate: Callable[..., NonfiniteOrigin | None] = locate_nonfinite) -> Replay:
    """Load the bundle's weights into ``model`` and run ``locate_nonfinite`` on each of its micro-batches,
    from the random-number state the live step had, until one holds a NaN/Inf."""
    load_weights(model, bundle)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first = None
    for i, item in enumerate(bundle["batches"]):
        batch = as_batch(to_device(item["batch"], device), "bundle batch")
        first = first if first is not None else batch
        with rng.replaying(item["rng"], device):
            origin = locate(model, batch, loss_fn)
        if origin is not None:
            return Replay(origin, i, batch)
    return Replay(None, None, first)

"""Replay bundles: everything needed to run a bad step again, somewhere else, later.

A bundle is one ``torch.save`` file (read back with ``weights_only=True``: no code is unpickled) holding

* ``model_state``: the model's ``state_dict`` at the bad step (before the optimizer step), on the CPU,
  keys without wrapper prefixes (``gradguard.names.user_name``);
* ``batches``: the step's micro-batches as given to ``guard.step`` (on the CPU), each with the state of
  torch's random-number generators its forward pass started from;
* ``guard``: the Guard's configuration; ``live``: what the Guard saw (events, loss, norms per layer);
  ``forensics``: the analysis of the step (its ``"bundle"``: the path the bundle was written to);
* ``checksum``: SHA-256 of everything above (:func:`checksum`: every tensor's dtype, shape and bytes, every
  key and value), so that a file changed after it was written (a flipped byte on a disk, an edit) is
  refused at load ("bundle corrupted"), never diagnosed.

:func:`load_bundle` checks, in order, that the file reads, is a bundle of this version, has exactly the keys
above, matches its checksum, and holds what each key should (a random-number state :func:`rng.capture`
writes); each failure is a :class:`BundleError` in one line naming the file and what is wrong.

The model's code is not in the bundle: ``gradguard replay BUNDLE --model FILE.py:factory`` builds the
model with the user's factory (the doctor's ``(model, batch, loss_fn)`` convention), loads the weights,
and diagnoses the step (``replay.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from gradguard.batch import Batch, LossFn, as_batch, to_device
from gradguard.explain.nonfinite import NonfiniteOrigin, locate_nonfinite
from gradguard.forensics import rng
from gradguard.names import user_name

__all__ = ["FORMAT", "Bundle", "BundleError", "Replay", "checksum", "load_bundle", "load_weights", "replay_step",
           "write_bundle"]

FORMAT = "gradguard-replay"
#: 2: a checksum of the contents; ``forensics["bundle"]`` holds the bundle's own path.
VERSION = 2


class BundleError(ValueError):
    """A file that cannot be replayed: unreadable, not a bundle, corrupted, or a model that is not its own."""


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
    checksum: str


KEYS = frozenset(Bundle.__annotations__)


def checksum(bundle: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of every entry of ``bundle`` but ``"checksum"``: keys in sorted order, each tensor's
    dtype, shape and bytes, each other value's type and ``repr`` (lists and tuples alike: a tuple may come
    back from ``torch.load`` as either)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(f"{key!r}:".encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed({k: v for k, v in bundle.items() if k != "checksum"})
    return digest.hexdigest()


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
    bundle: Bundle = {  # type: ignore[typeddict-item]  # the checksum is added below
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model_state": {user_name(k): v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "batches": [{"batch": to_device(batch.as_given(), "cpu"), "rng": state} for batch, state in window],
        "guard": _plain(guard),
        "live": _plain(live),
        "forensics": _plain({**forensics, "bundle": str(path)}),
    }
    bundle["checksum"] = checksum(bundle)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(bundle, tmp)
    os.replace(tmp, path)  # a bundle is complete or absent
    return str(path)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and verify a bundle (see the module docstring); :class:`BundleError` when it cannot be replayed."""
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"no such bundle: {path}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise BundleError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input, said as such
        with open(path, "rb") as file:
            zipped = file.read(4) == b"PK\x03\x04"  # torch.save's zip archive, damaged or cut short
        what = "bundle corrupted or truncated" if zipped else "not a gradguard replay bundle"
        raise BundleError(f"{path}: {what} ({_one_line(error)})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError(f"{path} is not a gradguard replay bundle (no format {FORMAT!r})")
    if bundle.get("version") != VERSION:
        raise BundleError(f"{path}: bundle version {bundle.get('version')!r}, this gradguard reads {VERSION}")
    missing, extra = sorted(KEYS - set(bundle)), sorted(set(bundle) - KEYS)
    if missing or extra:
        raise BundleError(f"{path}: not a complete bundle: missing keys {missing}, unexpected keys {extra}")
    found = checksum(bundle)
    if bundle["checksum"] != found:
        raise BundleError(f"{path}: bundle corrupted: its contents hash to {found[:16]}..., the checksum "
                          f"written with it is {str(bundle['checksum'])[:16]}...")
    _check_contents(path, bundle)
    return bundle  # type: ignore[return-value]


def _check_contents(path: str | os.PathLike[str], bundle: dict[str, Any]) -> None:
    """What each key holds (a bundle whose checksum was recomputed after an edit, or a buggy writer)."""
    if not isinstance(bundle["step"], int) or isinstance(bundle["step"], bool):
        raise BundleError(f"{path}: bad bundle: step must be an int, got {bundle['step']!r}")
    state = bundle["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BundleError(f"{path}: bad bundle: model_state must map names to tensors")
    batches = bundle["batches"]
    if not isinstance(batches, list) or not batches:
        raise BundleError(f"{path}: bad bundle: batches must be a non-empty list, got {type(batches).__name__}")
    for i, item in enumerate(batches):
        if not isinstance(item, dict) or set(item) != {"batch", "rng"}:
            raise BundleError(f"{path}: bad bundle: micro-batch {i} must hold 'batch' and 'rng'")
        try:
            rng.check(item["rng"], f"micro-batch {i}")
            as_batch(item["batch"], f"micro-batch {i}")
        except (TypeError, ValueError) as error:
            raise BundleError(f"{path}: {error}") from None
    for key in ("guard", "live", "forensics"):
        if not isinstance(bundle[key], dict):
            raise BundleError(f"{path}: bad bundle: {key} must be a dict, got {type(bundle[key]).__name__}")


def load_weights(model: nn.Module, bundle: Bundle) -> None:
    """Load the bundled weights into ``model`` (names matched without wrapper prefixes); :class:`BundleError`
    naming the missing, unexpected or differently shaped entries when the model is not the bundle's."""
    own_state = model.state_dict()
    own = {user_name(k): k for k in own_state}
    state = bundle["model_state"]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BundleError(f"the model does not match the bundle: missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = [(k, list(own_state[own[k]].shape), list(v.shape)) for k, v in state.items()
              if own_state[own[k]].shape != v.shape]
    if shapes:
        name, here, there = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise BundleError(f"the model does not match the bundle: {name!r} is {here} in the model, {there} in the "
                          f"bundle{more}")
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

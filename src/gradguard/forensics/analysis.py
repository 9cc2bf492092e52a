"""``gg.Forensics``: for every bad step, which layer, which samples, whether it reproduces, and a replay.

::

    guard = gg.Guard(model, opt, forensics=gg.Forensics(loss_fn=F.cross_entropy, bundle_dir="bad_steps"))
    for batch in loader:                       # (inputs, targets[, ids]) or a dict of keyword inputs
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        guard.step(loss, batch=batch)
    guard.history[...]["events"][...]["forensics"]   # {"layer", "samples", "scores", "reproducible", ...}
    guard.bad_samples                                # [{"id", "step", "score"}, ...]

**Healthy steps cost references only.** Each ``guard.step`` call appends a reference to its batch, and the
boundary step a reference to its per-layer norms, to rings of ``keep`` entries, and captures torch's
random-number state (a host-side copy, no device read). Nothing is computed on them. The analysis runs only
when the Guard's step read shows an event of ``ANALYSED_KINDS``: on the eager path the Guard reads its flags
every step anyway; a fused optimizer's step reads nothing, so forensics adds that one read per step.

**One analysis** (before the optimizer touches the weights; ``.grad``, buffers and the generators are left
as they were):

1. ``reproduce.py``: recompute the step (forward and backward of its micro-batches, each from its own
   random-number state); ``reproducible`` says whether the events come back; the recomputation also gives
   the backward order of the layers;
2. ``layer.py``: the origin layer, the first in backward order whose live norm left its own history;
3. ``samples.py``: each sample's loss and gradient norm against the rest of the batch; the samples that
   stand out, most responsible first;
4. for a non-finite event that reproduces, ``locate_nonfinite``: the module and pass where the NaN/Inf
   starts (``"origin"``);
5. ``bundle.py``: a replay bundle, when ``bundle_dir`` is set (at most ``max_bundles`` per run: the first
   bad steps, usually the ones that explain the rest).

One analysis costs about three training steps of the batch (2.7 for a 10M-parameter transformer on the CPU,
``benchmarks/bench_guard.py``); the bookkeeping of a healthy step, a few microseconds.

**Limits.** The random-number state is the one at the end of the previous ``guard.step`` call (or at the
framework's batch start): exact when nothing draws random numbers between that call and the forward pass.
Autocast is not replayed. Under DDP the step is recomputed through the wrapper, so every rank must analyse
(the Guard's decisions agree, so they do); FSDP2 models are not supported (the per-sample passes would enter
its collectives a different number of times per rank).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradguard.batch import Batch, LossFn, as_batch
from gradguard.explain.nonfinite import locate_nonfinite
from gradguard.explain.preserve import preserved
from gradguard.forensics import rng
from gradguard.forensics.bundle import write_bundle
from gradguard.forensics.layer import origin_layer
from gradguard.forensics.reproduce import recompute, reproduces
from gradguard.forensics.samples import per_sample, responsible, scores_of
from gradguard.stats import GradStats

__all__ = ["ANALYSED_KINDS", "BadSample", "Forensics", "ForensicsRecord"]

#: Events whose step is analysed.
ANALYSED_KINDS = ("nonfinite_grad", "nonfinite_loss", "grad_spike", "loss_spike")
_GRAD_KINDS = ("nonfinite_grad", "grad_spike", "growth")


class ForensicsRecord(TypedDict, total=False):
    """``event["forensics"]``.

    Keys:
        layer: the layer where the bad gradient starts (``layer.py``), or None.
        layer_z: its z-score against its own history (inf: non-finite).
        samples: ids of the samples responsible, most responsible first (``samples.py``); [] when no
            sample stands out (the step went bad for another reason than its data). Distributed: this
            rank's samples.
        samples_by_rank: distributed only: ``{rank: samples}`` of every rank.
        scores: their scores (robust z against the rest of the batch; inf: non-finite loss or gradient).
        reproducible: True when recomputing the step gives the same events (``reproduce.py``), False for
            a transient fault or nondeterminism; None when no batch was given.
        origin: for a reproducible non-finite event, ``locate_nonfinite``'s ``{"module", "phase", "kind"}``.
        bundle: path of the replay bundle, or None.
        method: how per-sample gradients were computed: ``"vmap"``, ``"loop"``, ``"loop-eval"``.
        seconds: wall time of the analysis.
        error: present when the analysis itself failed (the Guard's response is unaffected).
    """

    layer: str | None
    layer_z: float | None
    samples: list[Any]
    samples_by_rank: dict[int, list[Any]]
    scores: list[float]
    reproducible: bool | None
    origin: dict[str, str] | None
    bundle: str | None
    method: str | None
    seconds: float
    error: str


class BadSample(TypedDict):
    """One entry of ``guard.bad_samples``."""

    id: Any
    step: int
    score: float


def _user_model(model: nn.Module) -> nn.Module:
    """The module whose forward is the user's own: DDP's ``.module``, ``torch.compile``'s ``_orig_mod``
    (the analysis runs eagerly, on this rank's samples only: no collective is entered)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class Forensics:
    """Explains each bad step of a guarded run (see the module docstring).

    Args:
        loss_fn: ``loss_fn(output, targets)`` for ``(inputs, targets)`` batches; None for dict batches whose
            model output carries ``.loss`` (the batch convention of ``gradguard.batch``).
        keep: batches (micro-batches) and per-layer norm vectors kept as references; at least the Guard's
            ``accumulation_steps``. The layer history is the norms of the last ``keep`` steps.
        bundle_dir: folder for replay bundles; None: no bundles.
        max_bundles: bundles written at most (the first bad steps').
        top_k: samples named at most per step.
        z_thresh: how far above the rest of the batch (samples) or its own history (layers) counts as out
            of line, in robust standard deviations.
    """

    def __init__(self, loss_fn: LossFn | None = None, keep: int = 4, bundle_dir: str | None = None,
                 max_bundles: int = 20, top_k: int = 8, *, z_thresh: float = 4.0):
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Forensics: loss_fn must be callable or None, got {type(loss_fn).__name__}")
        for name, value, low in (("keep", keep, 1), ("max_bundles", max_bundles, 0), ("top_k", top_k, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Forensics: {name} must be an int >= {low}, got {value!r}")
        if not (isinstance(z_thresh, (int, float)) and z_thresh > 0 and math.isfinite(z_thresh)):
            raise ValueError(f"Forensics: z_thresh must be a finite number > 0, got {z_thresh!r}")
        self.loss_fn: Callable[[Any, Any], Tensor] | None = loss_fn
        self.keep = keep
        self.bundle_dir = None if bundle_dir is None else str(bundle_dir)
        self.max_bundles = max_bundles
        self.top_k = top_k
        self.z_thresh = float(z_thresh)
        self.bad_samples: list[BadSample] = []
        self.analyses: list[dict[str, Any]] = []  # {"step", "kinds", **record} per analysed step
        self.bundles: list[str] = []
        self._batches: deque[tuple[Batch, rng.RngState | None]] = deque(maxlen=keep)
        self._norms: deque[Tensor] = deque(maxlen=keep)
        self._device: torch.device | None = None
        self._group: Any = None  # the Guard's torch.distributed process group, when distributed
        self._rng_next: rng.RngState | None = None
        self._pending = 0  # micro-batches remembered since the last optimizer step
        self.analysing = False  # True while a bad step is recomputed: forward hooks see these passes too

    def start(self, device: torch.device | None, process_group: Any = None) -> None:
        """Called by the Guard when it is made: the generators as the first forward pass will find them.

        With a ``process_group`` (DDP) every rank analyses the same bad steps (the Guard's decisions agree):
        the step is recomputed through the DDP wrapper (gradients all-reduced, as live) with the loss averaged
        over the ranks, each rank names its own samples, and ``samples_by_rank`` gathers them all."""
        self._device = device
        self._group = process_group
        self._rng_next = rng.capture(device)

    # ------------------------------------------------------------------ every call: references only

    def remember(self, batch: Any, before_forward: bool = False) -> None:
        """Keep a reference to one micro-batch of the current step, with the generator state its forward
        pass started from: the state now when called ``before_forward`` (a framework's batch-start hook),
        else the state at the end of the previous ``guard.step`` call (:meth:`end_call`).

        ``ValueError`` when the batch fits no form of the convention, or needs a ``loss_fn`` not given."""
        if self.analysing:  # a forward pass of the analysis itself, seen by a framework's hook
            return
        split = as_batch(batch, "guard.step: batch")
        if not split.keyword and self.loss_fn is None:
            raise ValueError("Forensics: an (inputs, targets) batch needs Forensics(loss_fn=...); "
                             "without one, pass a dict batch whose model output carries .loss")
        self._batches.append((split, rng.capture(self._device) if before_forward else self._rng_next))
        self._pending += 1

    def end_call(self) -> None:
        """The end of a ``guard.step`` call: the generator state the next forward pass starts from."""
        self._rng_next = rng.capture(self._device)

    def end_step(self, healthy_norms: Tensor | None) -> None:
        """The end of an optimizer step; a healthy step's per-layer norms join the layers' history."""
        if healthy_norms is not None:
            self._norms.append(healthy_norms)
        self._pending = 0

    # ------------------------------------------------------------------ a bad step

    def analyse(self, model: nn.Module, stats: GradStats, kinds: list[str], step: int, loss: Tensor | None,
                guard_config: dict[str, Any] | None = None) -> ForensicsRecord:
        """Explain one bad step: the live ``stats`` (before clipping), its ``kinds`` of event and ``loss``;
        the micro-batches remembered since the last :meth:`end_step` make up the step (when some of them
        were not kept, ``keep`` too small, nothing is recomputed). Reads a few values to the host; leaves
        ``.grad``, buffers and the random-number generators as they were. An analysis that fails returns a
        record with ``"error"`` (and warns): the Guard's response to the step does not depend on it."""
        start = time.perf_counter()
        record: ForensicsRecord = {"layer": None, "layer_z": None, "samples": [], "scores": [],
                                   "reproducible": None, "origin": None, "bundle": None, "method": None}
        pending = self._pending
        window = list(self._batches)[-pending:] if 0 < pending <= len(self._batches) else []
        history = torch.stack([n.detach().float().cpu() for n in self._norms]) if self._norms else None
        live = torch.stack([stats.total_norm.float().reshape(()),
                            (loss if loss is not None else stats.total_norm.new_full((), math.nan))
                            .detach().float().reshape(()).to(stats.total_norm.device)]).tolist()
        self.analysing = True
        try:
            self._analyse(model, stats, kinds, step, live, window, history, record)
            if self.bundle_dir is not None and window and len(self.bundles) < self.max_bundles:
                rank = dist.get_rank(self._group) if self._group is not None else None
                bundle = write_bundle(
                    self.bundle_dir, step, model, window, guard_config or {},
                    {"kinds": kinds, "total_norm": live[0], "loss": live[1],
                     "layer_norms": dict(zip(stats.names, stats.norms.float().cpu().tolist()))},
                    dict(record), rank)
                record["bundle"] = bundle
                self.bundles.append(bundle)
        except Exception as error:  # noqa: BLE001 - a diagnosis must not stop the training it diagnoses
            record["error"] = f"{type(error).__name__}: {error}"
            warnings.warn(f"gradguard forensics: the analysis of step {step} failed: {record['error']}",
                          RuntimeWarning, stacklevel=3)
        finally:
            self.analysing = False
        record["seconds"] = time.perf_counter() - start
        self.bad_samples.extend({"id": i, "step": step, "score": s} for i, s in zip(record["samples"], record["scores"]))
        self.analyses.append({"step": step, "kinds": list(kinds), **record})
        return record

    def _analyse(self, wrapped: nn.Module, stats: GradStats, kinds: list[str], step: int, live: list[float],
                 window: list[tuple[Batch, rng.RngState | None]], history: Tensor | None,
                 record: ForensicsRecord) -> None:
        model = _user_model(wrapped)
        ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
        order = None
        with preserved(model), rng.replaying(None, self._device):
            if window:
                # through DDP's wrapper the recomputed gradients are all-reduced like the live ones
                recomputed = recompute(wrapped if ddp else model, stats, window, self.loss_fn)
                if self._group is not None:  # the live loss is the mean over the ranks
                    loss = torch.tensor([recomputed.loss], dtype=torch.float64, device=self._device)
                    dist.all_reduce(loss, group=self._group)
                    recomputed.loss = float(loss[0]) / dist.get_world_size(self._group)
                order = recomputed.order
                record["reproducible"] = reproduces(kinds, live[1], live[0], recomputed, len(window))
        fallback = any(k in _GRAD_KINDS for k in kinds)
        record["layer"], record["layer_z"] = origin_layer(stats.names, stats.norms, history, order,
                                                          self.z_thresh, fallback)
        if not window:
            return
        ids: list[Any] = []
        scores: list[Tensor] = []
        for batch, state in window:
            with preserved(model), rng.replaying(state, self._device):
                sample_stats = per_sample(model, batch, self.loss_fn)
            record["method"] = sample_stats.method
            own = batch.sample_ids()
            # without ids, positions count across the micro-batches of the step
            ids.extend(own if batch.ids is not None else [len(ids) + i for i in own])
            scores.append(scores_of(sample_stats))
        record["samples"], record["scores"] = responsible(torch.cat(scores), ids, self.z_thresh, self.top_k)
        if self._group is not None:
            gathered: list[Any] = [None] * dist.get_world_size(self._group)
            dist.all_gather_object(gathered, record["samples"], group=self._group)
            record["samples_by_rank"] = dict(enumerate(gathered))
        nonfinite = "nonfinite_grad" in kinds or "nonfinite_loss" in kinds
        if nonfinite and record["reproducible"]:
            for batch, state in window:
                with rng.replaying(state, self._device):
                    origin = locate_nonfinite(model, batch, self.loss_fn)
                if origin is not None:
                    record["origin"] = {"module": origin.module, "phase": origin.phase, "kind": origin.kind}
                    break

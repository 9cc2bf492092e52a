"""``gg.forensics.DataWatch``: a watch on the data, every step, from the per-sample losses the loop computes.

Bad rows that do not spike the step go unseen by the detector and so by forensics: a row of one repeated
character, a padding-only row, random bytes or shuffled labels move a batch's gradient norm by a percent or
two. Their *loss* stands out, though, within their batch and against the run: too high (garbage, shuffled
labels) or too low (padding and repeated characters are trivially predictable; OLMo 2 traced loss spikes
to repeated n-grams, Team OLMo et al. 2024, "2 OLMo 2 Furious", section 3.2). Two checks, one condition
each, both robust (median and MAD, Hampel's outlier rule; ``1.4826 MAD`` estimates a normal's sigma):

    too high:  z_i = (l_i - median_j l_j) / max(1.4826 MAD_j l_j, 0.05 median)  > high_z   on the losses
    too low:   z_i = (x_i - median_j x_j) / max(1.4826 MAD_j x_j, SIGMA_FLOOR)   < -low_z   on x = log(loss)

each within the batch *and* against the run (the same z with the run's ``level`` and ``spread``: moving
averages, factor ``alpha``, of the batches' median and scale, so a bad row barely moves them), after
``warmup_steps`` calls. High on the losses, low on their logs, because a loss is bounded below by 0: a row
whose loss is 50x below the median is only a few of the losses' own MADs below it, but many of their
logs'; above the median the logs would compress random bytes (7.5 against 1.5) into the spread of ordinary
rows. Both within the batch and against the run, because each alone misleads: a batch of hard samples
sits high against the run with nothing out of line within it; one row of an easy batch stands out within
it and not against the run. The defaults (``high_z`` 5, ``low_z`` 6) were set on one run of
``benchmarks/bench_data_watch.py`` (seed 0) and checked on seeds it was not set on (the README gives both).

**Cost**: about a dozen small device ops per call, on tensors of the batch's size, and one row written into a
device ring buffer; no host read (``gg.count_host_syncs`` counts 0). The flagged samples are read once per
flush (:meth:`drain`): the ring is ``capacity`` calls deep, at most ``per_step`` samples each (the most
extreme first); a flush that comes later than ``capacity`` calls loses the oldest rows and says so.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any, TypedDict

import torch
from torch import Tensor

from gradguard.batch import Batch, as_batch
from gradguard.forensics.samples import SIGMA_FLOOR

__all__ = ["DataWatch", "SuspectSample"]

_TINY = 1e-8  # floor of a loss before its log: a loss of exactly 0 is far below any median, not -inf
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
_REL_FLOOR = 0.05  # the losses' spread is at least 5% of their median (a batch of identical losses)


class SuspectSample(TypedDict):
    """One sample the watch flagged: ``{"id", "step", "loss", "z", "side"}``; ``z`` is its robust z within
    its batch (of the loss when ``"high"``, of its log when ``"low"``: the sign gives the side). ``gg.forensics.exclude`` takes a list of
    them as it is."""

    id: Any
    step: int
    loss: float
    z: float
    side: str


class DataWatch:
    """Flags samples whose loss is a robust outlier within its batch and against the run (module docstring).

    .. important:: The caller's contract.
       Give the watch to the Guard (``gg.Guard(..., data_watch=gg.forensics.DataWatch())``) and pass every
       micro-batch's per-sample losses with the batch they came from, in the same call::

           losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)  # (B,)
           losses.mean().backward()
           guard.step(losses.mean(), batch=batch, sample_losses=losses)

       ``sample_losses``: one loss per sample, shape ``(B,)``, the same order as the batch (the reduction
       the loop already does, before its mean; detached here). ``batch``: carries the samples' dataset ids
       (``(inputs, targets, ids)`` or a dict with ``"ids"``/``"index"``, ``gradguard.batch``'s convention);
       without ids, samples are named by their position in the batch, which ``gg.forensics.exclude``
       cannot use. A call without ``sample_losses`` is not watched. Outside a Guard, call
       :meth:`observe` every step and :meth:`drain` when you want the flagged samples.

    The losses should be means over many terms (a row's tokens, a sample's outputs): one squared error per
    sample has no "suspiciously low" (a residual near 0 is common, its log far below the others').

    Each check owns one condition and leaves the others to their own checks: a NaN/Inf loss is not a data
    outlier here (it is excluded from the medians and never flagged; the Guard's ``nonfinite_loss`` check
    and forensics name it); a step whose total loss spikes is the detector's. The watch only names samples;
    it changes nothing in the step.

    Args:
        high_z: robust standard deviations of the losses above the median (of the batch, of the run) from
            which a loss is too high.
        low_z: robust standard deviations of the log-losses below the median from which a loss is too low.
        warmup_steps: calls observed before any flag (the run's level and spread settle).
        alpha: the weight of each batch in the run's moving level and spread.
        per_step: samples kept per call at most (the most extreme first).
        capacity: calls held in the ring buffer between two :meth:`drain`.
    """

    def __init__(self, high_z: float = 5.0, low_z: float = 6.0, warmup_steps: int = 20, alpha: float = 0.05,
                 per_step: int = 4, capacity: int = 256):
        for name, value in (("high_z", high_z), ("low_z", low_z)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"DataWatch: {name} must be a finite number > 0, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"DataWatch: alpha must be a number in (0, 1], got {alpha!r}")
        for name, value, low in (("warmup_steps", warmup_steps, 0), ("per_step", per_step, 1),
                                 ("capacity", capacity, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DataWatch: {name} must be an int >= {low}, got {value!r}")
        self.high_z = float(high_z)
        self.low_z = float(low_z)
        self.warmup_steps = warmup_steps
        self.alpha = float(alpha)
        self.per_step = per_step
        self.capacity = capacity
        self.suspects: list[SuspectSample] = []  # every sample flagged so far, oldest first
        self.dropped = 0  # ring rows overwritten before a drain read them
        self._ring: Tensor | None = None  # (capacity, per_step, 4): id (or position), loss, z, flagged
        self._rows: deque[tuple[int, int, Any]] = deque()  # host: (ring row, step, ids when not in the ring)
        self._written = 0
        self._level: Tensor | None = None  # (2,) device: the run's level of [loss, log loss]
        self._spread: Tensor | None = None  # (2,) device: and their spread
        self._seen = 0

    # ------------------------------------------------------------------ every call: device ops only

    def observe(self, sample_losses: Tensor, batch: Any = None, step: int = 0) -> None:
        """Watch one micro-batch's per-sample losses (see the class docstring); no host read.

        ``ValueError`` when ``sample_losses`` is not a 1-d tensor of the batch's size."""
        split = as_batch(batch, "DataWatch: batch") if batch is not None else None
        losses = self._checked(sample_losses, split).detach().float()
        ids, lookup = self._ids(split.ids if split is not None else None, losses)
        # [loss, log loss] per sample; a NaN/Inf loss is left out of every median and never flagged
        both = torch.stack([losses, torch.log(losses.clamp(min=_TINY))])
        both = torch.where(torch.isfinite(losses), both, math.nan)
        median = both.nanmedian(dim=1).values
        scale = _MAD_TO_SIGMA * (both - median[:, None]).abs().nanmedian(dim=1).values
        floor = torch.stack([_REL_FLOOR * median[0].abs(), torch.full_like(median[0], SIGMA_FLOOR)])
        z_batch = (both - median[:, None]) / torch.maximum(scale, floor).nan_to_num(SIGMA_FLOOR)[:, None]
        z_run = self._against_run(both, median, scale, floor)
        high = self._too_high(z_batch[0], z_run[0])
        low = self._too_low(z_batch[1], z_run[1])
        flagged = (high | low) & (self._seen > self.warmup_steps)
        z = torch.where(high, z_batch[0], torch.where(low, z_batch[1], 0.0))
        top = torch.topk(torch.where(flagged, z.abs(), -1.0), min(self.per_step, losses.numel())).indices
        row = torch.stack([ids[top].to(torch.float64), losses[top].double(), z[top].double(),
                           flagged[top].double()], dim=-1)
        self._write(row, step, lookup)

    def _too_high(self, z_batch: Tensor, z_run: Tensor) -> Tensor:
        """A loss too high: ``high_z`` above the batch's median and the run's level, on the losses."""
        return (z_batch > self.high_z) & (z_run > self.high_z)

    def _too_low(self, z_batch: Tensor, z_run: Tensor) -> Tensor:
        """A loss too low: ``low_z`` below the batch's median and the run's level, on the log-losses."""
        return (z_batch < -self.low_z) & (z_run < -self.low_z)

    def _against_run(self, both: Tensor, median: Tensor, scale: Tensor, floor: Tensor) -> Tensor:
        """z against the run's moving level and spread (before this batch); then this batch's median and
        scale join them (a non-finite one is not learned)."""
        if self._level is None or self._spread is None:
            self._level, self._spread = median.nan_to_num(0.0), scale.nan_to_num(0.0)
        z = (both - self._level[:, None]) / torch.maximum(self._spread, floor).nan_to_num(SIGMA_FLOOR)[:, None]
        weight = max(self.alpha, 1.0 / (self._seen + 1))  # a plain mean while few batches were seen
        self._level = torch.where(torch.isfinite(median), torch.lerp(self._level, median, weight), self._level)
        self._spread = torch.where(torch.isfinite(scale), torch.lerp(self._spread, scale, weight), self._spread)
        self._seen += 1
        return z

    def _checked(self, sample_losses: Any, split: Batch | None) -> Tensor:
        if not isinstance(sample_losses, Tensor) or sample_losses.dim() != 1 or sample_losses.numel() == 0:
            shape = list(sample_losses.shape) if isinstance(sample_losses, Tensor) else type(sample_losses).__name__
            raise ValueError(f"DataWatch: sample_losses must be a 1-d tensor of per-sample losses "
                             f"(reduction='none'), got {shape}")
        if split is not None and split.size != sample_losses.numel():
            raise ValueError(f"DataWatch: {sample_losses.numel()} sample_losses for a batch of {split.size} samples")
        return sample_losses

    def _ids(self, given: Any, losses: Tensor) -> tuple[Tensor, Any]:
        """The batch's ids as a device tensor when they are integers (written in the ring), else positions
        and the ids kept on the host to name them at the drain."""
        positions = torch.arange(losses.numel(), device=losses.device)
        if isinstance(given, Tensor) and not given.is_floating_point() and given.dim() == 1:
            return given.to(losses.device, non_blocking=True), None
        if isinstance(given, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in given):
            return torch.tensor(given, device=losses.device), None
        return positions, (list(given) if given is not None else "positions")

    def _write(self, row: Tensor, step: int, lookup: Any) -> None:
        if self._ring is None or self._ring.device != row.device:
            self._ring = torch.zeros(self.capacity, self.per_step, 4, dtype=torch.float64, device=row.device)
        slot = self._written % self.capacity
        self._ring[slot].zero_()
        self._ring[slot, : row.shape[0]] = row
        self._rows.append((slot, step, lookup))
        if len(self._rows) > self.capacity:
            self._rows.popleft()
            self.dropped += 1
        self._written += 1

    # ------------------------------------------------------------------ state

    FORMAT = "gradguard-datawatch/1"

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "level", "spread", "seen"}``: the run's level and spread (device tensors) and the
        calls seen, so a resumed run does not start its warm-up again. The ring and the suspects are not
        kept: flush (``drain``) before saving."""
        return {"format": self.FORMAT, "level": self._level, "spread": self._spread, "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back :meth:`state_dict`; ``ValueError`` naming what differs when it is not one."""
        if not isinstance(state, dict) or state.get("format") != self.FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"DataWatch.load_state_dict: format {found!r}, this DataWatch reads {self.FORMAT!r}")
        seen = state.get("seen")
        if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
            raise ValueError(f"DataWatch.load_state_dict: seen must be an int >= 0, got {seen!r}")
        for key in ("level", "spread"):
            value = state.get(key)
            if value is not None and not (isinstance(value, Tensor) and value.shape == (2,)):
                raise ValueError(f"DataWatch.load_state_dict: {key} must be None or a tensor of shape (2,), got {value!r}")
        self._level, self._spread, self._seen = state["level"], state["spread"], seen

    # ------------------------------------------------------------------ the flush: one host read

    def drain(self) -> list[SuspectSample]:
        """The samples flagged since the last drain (one host read), oldest first; they are also added to
        :attr:`suspects`."""
        if not self._rows or self._ring is None:
            return []
        if self.dropped:
            warnings.warn(f"DataWatch: {self.dropped} call(s) overwritten before a drain read them: "
                          f"raise capacity (now {self.capacity}) or flush more often", RuntimeWarning,
                          stacklevel=2)
            self.dropped = 0
        rows = list(self._rows)
        self._rows.clear()
        values = self._ring[[slot for slot, _, _ in rows]].tolist()
        found: list[SuspectSample] = []
        for (_, step, lookup), entries in zip(rows, values):
            for key, loss, z, flagged in entries:
                if flagged < 0.5:
                    continue
                sample: Any = int(key)
                if isinstance(lookup, list):
                    sample = lookup[sample]
                found.append({"id": sample, "step": step, "loss": loss, "z": z, "side": "high" if z > 0 else "low"})
        self.suspects.extend(found)
        return found

"""Recovery: what the Guard does on the host when skipping a step is not enough.

One object, :class:`Recovery`, owns it all: the policy (:class:`RecoveryPolicy`, what the user configures
with ``gg.Guard(..., recovery=gg.RecoveryPolicy(...))``), the last good :class:`Snapshot`, the
:class:`TrainingState` it covers (model, optimizer, scheduler), the escalation counters and the log of the
actions it took.

Recovery's state has a name (:class:`RecoveryState`: ``healthy``, ``backing_off``, ``rolling_back``,
``recovered``, ``diverged``), changed in one method (:meth:`Recovery._enter`), saved in ``state_dict`` and
written into each action event. Escalation, one rung at a time (and back down once training is healthy
again). Each step's evidence
(:class:`Evidence`: skipped or not, and whether it shows the weights *sound*) goes through one pure rule,
:func:`escalate`, which returns an :class:`Action`; :meth:`Recovery.after_step` carries it out.

1. **LR back-off, earned**: ``backoff_after`` *suspect* skipped steps (below) within ``skip_window`` steps,
   with no sound step between them, cut the LR: one number, ``lr_scale`` <= 1, is multiplied by
   ``lr_backoff`` (every group's learning rate and an attached scheduler's ``base_lrs`` with it, so that
   schedulers that recompute the rate from them keep the cut). Isolated bad batches after which the run is
   healthy never cut it, and neither does a ``GradScaler`` overflow (a skip whose only event is a
   non-finite gradient under a scaler: the scaler halves its scale, that is its job).
2. **Rollback**: a response ``"rollback"``, non-finite weights, or ``rollback_after`` *suspect* skipped
   steps within ``skip_window`` steps restore the last good snapshot (model, optimizer state, scheduler)
   and cut the learning rate by ``rollback_lr_factor``, except for non-finite weights that no update is to
   blame for (:meth:`Recovery.weights_nonfinite`: only quiet real steps moved them since they were last
   known finite, so the NaN came from outside the optimizer step, and a lower LR would not have kept it
   out). Non-finite weights are found at the flush, and on the plain path at the first NaN/Inf loss they
   cause (the Guard checks the weights then), so that they are not counted as suspect skips first (before:
   a back-off after 5 NaN losses, a rollback after 10, both cutting the LR; the soak's AdamW seed 30015
   stacked 6 cuts in one 50-step window of faults and ended at 1.49x the clean loss, 1.02x now).
   A skipped step is suspect unless it shows the
   weights sound: its loss finite and not a spike, on weights that the last real step made without any
   event. Such a step (a skipped NaN gradient on a healthy run, say) clears the count: skipping is working,
   and a rollback would only throw away the progress since the snapshot. A loss that is missing, NaN/Inf or
   a spike says nothing good of the weights, and neither does a loss "at its level" after a real step that
   was clipped, grew or warned: the level may have drifted up with a slow divergence. The learning rate
   itself is not taken from the snapshot: it stays what it was (the user's schedule, earlier cuts), times
   the cut. The detector's and the clip strategy's statistics are *not* restored: they are the run's
   memory of what healthy gradients look like, and a rollback to an earlier point must not put the
   detector back into its warm-up (a fault soon after would then go unflagged). One exception: the loss's
   moving level is put at the restored weights' own loss (``Snapshot.loss``, the loss of the step that ran
   on them, read from the history's unflushed rows when that step was not flushed yet; the Guard calls
   ``Detector.set_loss_level``), since the level belongs to the weights: kept, it
   would score every step after a rollback to an older snapshot as a loss spike. A GradScaler keeps its
   current scale: it describes the gradients' range, not the weights.
   **A level that moved is relearned.** A rollback called for while the weights are still the restored
   snapshot's (no real step since the last rollback) would put back the weights already in place. When the
   suspect skips since were all loss spikes whose losses agree (:meth:`Recovery._level_moved`), the weights
   that gave a healthy loss before give these on today's batches: the data or the loss changed for good (a
   harder data mixture, a loss term switched on), so the detector's loss level is put at their median (a
   ``loss_relevel`` event) instead. Before, a healthy run whose loss floor rose x10 was rolled back 16 times
   to the same snapshot and ended in ``TrainingDiverged``.
3. **TrainingDiverged**: a rollback needed when the rollback budget is spent (or none is possible),
   ``max_skip_streak`` skipped steps in a row, or a ``"raise"`` response, raises, with an account of what
   happened. Before raising, the model and the optimizer are put back to the last good snapshot, so that a
   checkpoint saved in the handler holds finite weights; the exception names that snapshot's step.

**The rollback budget refills with progress.** ``max_rollbacks`` counts the rollbacks to the current
snapshot, not those of the whole run. A newer snapshot is kept only once training went on from the
restored state and proved healthy (below): the rollbacks before it helped, and it starts a fresh budget.
So a burst of faults that each need a rollback (NaN written into the weights, a learning rate that wrecks
them for a few steps) is survived when the burst needs at most ``max_rollbacks`` of them, and a run can
meet any number of bursts; a divergence that rollbacks do not cure (the restored state goes bad again
and again, e.g. a learning rate the training loop sets back at every step) never reaches a newer snapshot
and ends after ``max_rollbacks``. Skipping alone ends training only when it is all that happens:
``max_skip_streak`` skipped steps in a row (a backward that always returns NaN) raise. The test is the
one Megatron-LM's rerun state machine applies to a single step: a failure that comes back each time
training resumes from the same state is persistent, one that does not is transient.

Cuts are not for good: after ``lr_recover_after`` real steps at a scale below 1 (counted across
interleaved skips, which do not reset the count, as ``GradScaler`` counts its growth interval),
``lr_scale`` grows by ``1 / min(lr_backoff, rollback_lr_factor)``, capped at 1, so that a transient fault
costs a transient slow-down (``benchmarks/lr_ratchet.py``: 1000 steps with a NaN batch every 10th, or fp16
with ``GradScaler(growth_interval=5)``, end at the starting LR).

**Good snapshots only.** A snapshot is the state rollbacks return to, so it is kept only when known to be
good. When one is due (``snapshot_every`` steps after the previous one), the state is captured as the
last step before a flush begins; the flush keeps it if that step, which ran on it, and the ones before it
make ``snapshot_clean_steps`` steps in a row without event or skip (a skip for its batch's fault alone, a
non-finite gradient with a finite loss that is no spike, as a NaN batch or a GradScaler overflow, neither
counts nor breaks the streak: the weights did not move, and their loss vouched for them; so a run with a
NaN batch every 10th step still refreshes its snapshot), over which the loss stayed near its
healthy level: the mean of their z-scores of the log loss (the detector's, against its moving average)
is at most ``snapshot_loss_z`` (a mean, so that one harder batch does not count, while a loss that stays
above its level does), and so is the z-score of the step run on the captured state itself (the only one
that judges those weights; it must be a real step without event: a harder batch or a batch's skip there
only delays the snapshot to the next flush). Every
snapshot's weights have thus been run and gave a healthy step, and were checked finite at that flush.
(The weights after the flush's own last step have not been run: an update that wrecked them, the first
step of an LR burst, shows only in the next step's loss.) Weights that an event damaged are therefore never
kept. The first snapshot holds the weights as training starts. Snapshots live in memory (a clone of every
tensor, on its device) or, with ``snapshot_dir``, in one file on disk written atomically (large models:
raise ``snapshot_every`` there, each snapshot writes the whole state), whose bytes are also held in host
memory (none on the device): a file found damaged at a rollback (truncated, replaced, deleted) is never
restored, the bytes it was written from are, so that there is always a finite state to go back to (the
older file is the fallback after a resume, before any bytes are held). From the capture to its flush (one
step) two copies exist, as while a snapshot is written.

**The cut covers every group.** A parameter group added mid-run (``add_param_group``) comes in at the
user's LR; the cut in force (``lr_scale``) is applied to it at once, so that growing the scale back brings
it to its own LR, never past it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from gradguard.detect import MAD_TO_STD
from gradguard.stats import is_dtensor, per_tensor_norms

if TYPE_CHECKING:  # for annotations only
    from gradguard.decide import Responses
    from gradguard.history import Event, StepRecord

#: the most the logs of the losses behind a relevel may spread (``1.4826 * MAD``, a normal's sigma): a level is a
#: plateau, the losses within a factor e of each other (:meth:`Recovery._level_moved`); scaled batches differ by
#: orders of magnitude
LEVEL_SPREAD = 1.0

__all__ = ["Recovery", "RecoveryPolicy", "RecoveryState", "Snapshot", "TrainingDiverged", "TrainingState"]


class TrainingDiverged(RuntimeError):
    """Raised when training cannot be kept finite: the rollback budget is spent, rollback is impossible, or
    an event's response is ``"raise"``. The model and optimizer then hold the last good snapshot.

    Attributes:
        step: the optimizer step at which the Guard gave up.
        events: the last events recorded (dicts in the history format).
        summary: the Guard's counters (``guard.summary()``) at that point.
        snapshot_step: the step of the snapshot now in the model and optimizer (None: there was none, and
            they were left as they were).
    """

    def __init__(self, message: str, step: int, events: list[Event], summary: dict[str, int],
                 snapshot_step: int | None = None):
        super().__init__(message)
        self.step = step
        self.events = events
        self.summary = summary
        self.snapshot_step = snapshot_step


class GiveUp(Exception):
    """Internal: a recovery decision that ends training. The Guard turns it into :class:`TrainingDiverged`
    (after publishing its history), with :meth:`Recovery.diverged`."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason = reason
        self.step = step


def _host_values(values: Sequence[Tensor | float]) -> list[float]:
    """The values as floats: device tensors stacked and read at once."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    read = iter(torch.stack([t.reshape(()).double() for t in tensors]).tolist()) if tensors else iter(())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def clone_tree(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples where every tensor is detached and cloned."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v) for v in obj)
    return obj


def _int_at_least(value: Any, low: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"RecoveryPolicy: {name} must be an int >= {low}, got {value!r}")
    return value


def _factor(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"RecoveryPolicy: {name} must be a number in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RecoveryPolicy:
    """How the Guard escalates when skipping is not enough (see the module docstring).

    Args:
        lr_backoff: factor on the learning rate after ``backoff_after`` suspect skips within ``skip_window``
            steps (at most one back-off per ``skip_window`` steps).
        backoff_after: suspect skips (their loss NaN/Inf, a spike or not given, with no sound step since)
            within ``skip_window`` steps that call for an LR back-off.
        rollback_after: skips within ``skip_window`` steps that call for a rollback, counting only those
            whose loss was NaN/Inf or a spike (or not given), since the last step whose loss was healthy.
        skip_window: the window, in steps, over which skips are counted.
        rollback_lr_factor: factor on the learning rate after a rollback.
        max_rollbacks: rollbacks to the same snapshot allowed before ``TrainingDiverged``; each newer good
            snapshot starts a fresh budget (16: a burst of 50 faulty steps that writes NaN into the weights
            at one step in six, each rolled back at the first NaN loss it causes, needs 4 to 12 rollbacks to
            one snapshot in ``benchmarks/soak.py``, seeds 40000-40079 with SGD and AdamW; at 8, half of the
            dense windows of seeds 30000-30019 and 10000-10019 ended in ``TrainingDiverged``).
        max_skip_streak: skipped steps in a row before ``TrainingDiverged`` (training makes no progress);
            None: no limit.
        lr_recover_after: real steps at a cut LR (back-off or rollback; skips in between do not reset the
            count) before the LR scale grows back by one cut, capped at 1; None: cuts are kept for good. 20: a
            dense window of faults stacks 5-9 cuts, which at 50 steps each outlasted a 300-step run (the soak's
            AdamW seed 20016 ended at 12x the clean loss, the LR still cut; at 20, 1.06x).
        snapshot_every: least steps between two snapshots (kept at a flush, from good state only; 25: at
            every flush with the Guard's default ``log_every``, so that a rollback loses little); None: no
            snapshots (no memory for them), and a needed rollback raises ``TrainingDiverged``.
        snapshot_dir: keep the snapshot in this folder instead of memory.
        snapshot_clean_steps: steps in a row without event or skip before a snapshot may be taken (the
            last of them runs on the snapshot's state).
        snapshot_loss_z: the largest mean z-score of the log loss over those steps (against its moving
            average) that counts as "near its healthy level", and the largest of the last one.
    """

    lr_backoff: float = 0.5
    backoff_after: int = 5
    rollback_after: int = 10
    skip_window: int = 50
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 16
    max_skip_streak: int | None = 200
    lr_recover_after: int | None = 20
    snapshot_every: int | None = 25
    snapshot_dir: str | os.PathLike[str] | None = None
    snapshot_clean_steps: int = 10
    snapshot_loss_z: float = 1.0

    def __post_init__(self) -> None:
        _factor(self.lr_backoff, "lr_backoff")
        _int_at_least(self.backoff_after, 1, "backoff_after")
        _int_at_least(self.rollback_after, 1, "rollback_after")
        _int_at_least(self.skip_window, 1, "skip_window")
        _factor(self.rollback_lr_factor, "rollback_lr_factor")
        _int_at_least(self.max_rollbacks, 0, "max_rollbacks")
        if self.max_skip_streak is not None:
            _int_at_least(self.max_skip_streak, 1, "max_skip_streak")
        if self.lr_recover_after is not None:
            _int_at_least(self.lr_recover_after, 1, "lr_recover_after")
        if self.snapshot_every is not None:
            _int_at_least(self.snapshot_every, 1, "snapshot_every")
        if self.snapshot_dir is not None and not isinstance(self.snapshot_dir, (str, os.PathLike)):
            raise ValueError(f"RecoveryPolicy: snapshot_dir must be a path or None, got {self.snapshot_dir!r}")
        _int_at_least(self.snapshot_clean_steps, 0, "snapshot_clean_steps")
        if isinstance(self.snapshot_loss_z, bool) or not isinstance(self.snapshot_loss_z, (int, float)) or not (
            self.snapshot_loss_z > 0 and math.isfinite(self.snapshot_loss_z)
        ):
            raise ValueError(f"RecoveryPolicy: snapshot_loss_z must be a finite number > 0, got {self.snapshot_loss_z!r}")


def nonfinite_flag(tree: Any) -> Tensor | None:
    """A device bool, True when a floating tensor anywhere in ``tree`` (nested dicts / lists) holds NaN or
    Inf; None when it holds none. One fused inf-norm pass per device and dtype, no host read."""
    tensors: list[Tensor] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point() and obj.numel():
                tensors.append(obj.detach().to_local() if is_dtensor(obj) else obj.detach())  # type: ignore[attr-defined]
        elif isinstance(obj, dict):
            for value in obj.values():
                collect(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                collect(value)

    collect(tree)
    if not tensors:
        return None
    device = tensors[0].device
    norms = torch.stack([n.to(device) for n in per_tensor_norms(tensors, math.inf)])
    return ~torch.isfinite(norms).all()


#: The layout of a snapshot file: one JSON header line, then the payload (``torch.save`` bytes). 1: the first.
SNAPSHOT_FORMAT = "gradguard.Snapshot/1"


class SnapshotError(RuntimeError):
    """A snapshot file that cannot be trusted: missing, truncated, corrupted, of another run or step."""


class Snapshot:
    """The last good training state, in memory or in a file of ``directory``.

    ``save`` clones (memory) or writes (disk); ``load`` returns a fresh copy each time, because
    ``optimizer.load_state_dict`` keeps the tensors it is given and would otherwise mutate the snapshot.

    **A file proves itself.** It starts with one JSON line, ``{"format", "step", "fingerprint", "sha256",
    "size"}`` (the Guard's fingerprint of the run: parameter names, shapes, optimizer kind, rank), followed
    by the payload. It is written to ``<file>.partial``, read back and checked, then renamed (``os.replace``:
    a crash never leaves half a snapshot under the final name). Before a restore it is checked again: the
    format, the step and checksum this object expects, the fingerprint and the payload's SHA-256; any
    difference raises :class:`SnapshotError` naming the file, the value expected and the value found. Files
    are named by step (``<prefix>.step<N>.pt``), so that a run resumed from an older checkpoint looks for
    its own snapshot and never restores a later run's; the previous good file is kept as a fallback
    (``previous``), older ones are removed. The bytes of the file in use are held in host memory (as written
    and checked, or as read back by :meth:`verify` after a resume): a file that fails its check gives way
    to them (:meth:`load_held`), never the reverse.
    """

    PREFIX = "gradguard_snapshot"

    def __init__(self, directory: str | os.PathLike[str] | None = None, prefix: str = PREFIX,
                 fingerprint: str = ""):
        self.directory = None if directory is None else os.fspath(directory)
        self.prefix = prefix
        self.fingerprint = fingerprint
        self.step: int | None = None
        self.loss: float | None = None  # the loss of the step that ran on these weights, once flushed
        self.checksum: str | None = None  # the payload's SHA-256 (disk)
        #: the older good file kept as a fallback: ``(step, checksum)`` (disk)
        self.previous: tuple[int, str] | None = None
        #: device bool: whether any floating tensor saved (weights, buffers, optimizer state) holds NaN/Inf
        self.nonfinite: Tensor | None = None
        self._state: dict[str, Any] | None = None
        #: disk: the bytes of this step's file, as written and checked (or as read back after a resume): what
        #: a rollback restores when the file no longer passes its check (truncated, replaced, deleted)
        self._held: bytes | None = None

    def file(self, step: int) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{self.prefix}.step{step}.pt")

    @property
    def path(self) -> str | None:
        return None if self.directory is None or self.step is None else self.file(self.step)

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.nonfinite = nonfinite_flag(state)  # read by the Guard with its next flush, never on its own
        if self.directory is None:
            self._state = clone_tree(state)
        else:
            self._held = None
            self.checksum, self._held = self._write(step, state)
        self.step, self.loss = step, None

    def _write(self, step: int, state: dict[str, Any]) -> tuple[str, bytes]:
        """Write, check and rename the file of ``step``; its checksum and payload."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        checksum = hashlib.sha256(payload).hexdigest()
        header = {"format": SNAPSHOT_FORMAT, "step": step, "fingerprint": self.fingerprint, "sha256": checksum,
                  "size": len(payload)}
        os.makedirs(self.directory or ".", exist_ok=True)
        final = self.file(step)
        partial = f"{final}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        self._read(partial, step, checksum)  # verified after it is written
        os.replace(partial, final)  # atomic: a crash never leaves half a snapshot under the final name
        return checksum, payload

    def _read(self, path: str, step: int, checksum: str | None) -> dict[str, Any]:
        """The state in ``path``, after checking its header and checksum; raises :class:`SnapshotError`."""
        return self._unpack(self._read_payload(path, step, checksum), path)

    def _read_payload(self, path: str, step: int, checksum: str | None) -> bytes:
        """The payload of ``path``, after checking its header and checksum; raises :class:`SnapshotError`."""
        try:
            with open(path, "rb") as f:
                head = f.readline()
                payload = f.read()
            header = json.loads(head)
        except (OSError, ValueError) as error:
            raise SnapshotError(f"Snapshot: cannot read {path!r}: {error}") from error
        expected = {"format": SNAPSHOT_FORMAT, "step": step, "fingerprint": self.fingerprint}
        if checksum is not None:
            expected["sha256"] = checksum
        for key, value in expected.items():
            if not isinstance(header, dict) or header.get(key) != value:
                found = header.get(key) if isinstance(header, dict) else header
                raise SnapshotError(f"Snapshot: {path!r} has {key} {found!r}, expected {value!r}")
        if header.get("size") != len(payload):
            raise SnapshotError(f"Snapshot: {path!r} is truncated or padded: its header gives a payload of "
                                f"{header.get('size')!r} bytes, the file holds {len(payload)}")
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise SnapshotError(f"Snapshot: {path!r} is corrupted: its payload's sha256 is not the "
                                f"{header['sha256']!r} its header holds")
        return payload

    @staticmethod
    def _unpack(payload: bytes, source: str) -> dict[str, Any]:
        try:
            state: dict[str, Any] = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as error:
            raise SnapshotError(f"Snapshot: {source!r} holds no loadable state: {error}") from error
        return state

    def load(self) -> dict[str, Any]:
        """A fresh copy of the state; a file is checked first (:class:`SnapshotError` when it fails), and its
        bytes are held from then on (after a resume, the first check is :meth:`verify`'s)."""
        if self.step is None:
            raise RuntimeError("Snapshot: nothing saved yet")
        if self.directory is None:
            assert self._state is not None
            return clone_tree(self._state)
        path = self.file(self.step)
        payload = self._read_payload(path, self.step, self.checksum)
        self._held = payload
        return self._unpack(payload, path)

    def load_held(self) -> dict[str, Any] | None:
        """Disk: the state from the bytes held of this step's file (checked against its checksum), for when
        the file itself fails its check; None when none are held or they do not match."""
        if self._held is None or self.step is None or hashlib.sha256(self._held).hexdigest() != self.checksum:
            return None
        return self._unpack(self._held, f"{self.file(self.step)} (the bytes held in memory)")

    def fall_back(self) -> bool:
        """Drop the current file (it failed its check) for the previous good one; False when there is none."""
        if self.directory is None or self.previous is None:
            return False
        self._remove(self.step)
        (self.step, self.checksum), self.previous = self.previous, None
        self.loss, self._held = None, None
        return True

    def verify(self) -> None:
        """Check the file(s) this object expects (after a resume) and hold the bytes of the one in use; drop
        what fails, with a warning."""
        if self.directory is None:
            return
        if self.previous is not None:
            try:
                self._read_payload(self.file(self.previous[0]), *self.previous)
            except SnapshotError as error:
                warnings.warn(f"gradguard: the fallback snapshot is not usable ({error}); it is dropped",
                              RuntimeWarning, stacklevel=3)
                self.previous = None
        if self.step is None:
            return
        try:
            self.load()  # holds its bytes
        except SnapshotError as error:
            if self.fall_back():
                warnings.warn(f"gradguard: the checkpoint's snapshot is not usable ({error}); the older one, of "
                              f"step {self.step}, is used", RuntimeWarning, stacklevel=3)
                self.load()  # checked just above: holds its bytes
            else:
                warnings.warn(f"gradguard: the checkpoint's snapshot is not usable ({error}); a new one "
                              "is taken of the weights as training resumes", RuntimeWarning, stacklevel=3)
                self.step, self.checksum, self.loss, self._held = None, None, None, None

    def take(self, other: Snapshot) -> None:
        """Hold ``other``'s state from now on; ``other`` is left empty. On disk this snapshot's file becomes
        the fallback (``previous``) and the one before it is removed."""
        if other.step is None:
            raise RuntimeError("Snapshot: nothing to take")
        if self.directory is None:
            self._state, other._state = other._state, None
        else:
            if self.previous is not None:
                self._remove(self.previous[0])
            self.previous = None if self.step is None or self.checksum is None else (self.step, self.checksum)
            self.checksum, other.checksum = other.checksum, None
            self._held, other._held = other._held, None  # the previous file is kept on disk only
        self.step, other.step = other.step, None
        self.loss, other.loss = other.loss, None
        self.nonfinite, other.nonfinite = other.nonfinite, None

    def _remove(self, step: int | None) -> None:
        if self.directory is not None and step is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file(step))

    def clear(self) -> None:
        self._remove(self.step)
        self.step, self.loss, self._state, self.nonfinite, self.checksum = None, None, None, None, None
        self._held = None

    def state_dict(self) -> dict[str, Any]:
        # a memory snapshot travels with the checkpoint; a disk snapshot stays in its file, named by its
        # step and checked against its checksum when restored
        return {"step": self.step, "loss": self.loss, "state": self._state if self.directory is None else None,
                "checksum": self.checksum, "previous": None if self.previous is None else list(self.previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = None if state["step"] is None else int(state["step"])
        self.loss = state.get("loss")
        self.checksum = state.get("checksum")
        previous = state.get("previous")
        self.previous = None if previous is None else (int(previous[0]), str(previous[1]))
        self._held = None  # read back by verify()
        if self.directory is None:
            self._state = None if state["state"] is None else clone_tree(state["state"])


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each parameter group, as floats (tensor learning rates are read)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def scale_lr_(optimizer: torch.optim.Optimizer, factor: float, scheduler: Any = None,
              groups: Sequence[dict[str, Any]] | None = None) -> None:
    """Multiply every group's learning rate (or only those of ``groups``) by ``factor``, and the scheduler's
    ``base_lrs`` with it."""
    for group in optimizer.param_groups if groups is None else groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].mul_(factor)
        else:
            group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


@dataclass
class TrainingState:
    """The objects a snapshot covers: the model, the optimizer and, when given, the LR scheduler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    #: parameters the optimizer holds outside the model (their values are in no ``state_dict``)
    outside: list[Tensor] = field(default_factory=list)

    def capture(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.outside:
            state["outside"] = [p.detach() for p in self.outside]
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Load ``state``; the learning rates in force (and the scheduler's ``base_lrs``) are kept."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        base_lrs = list(getattr(self.scheduler, "base_lrs", []))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for p, value in zip(self.outside, state.get("outside", [])):
                p.copy_(value)
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        if base_lrs:
            self.scheduler.base_lrs = base_lrs


class RecoveryState(str, Enum):
    """Where recovery stands; its value goes into ``state_dict`` and into each action event (``"state"``).

    Transitions (all in :meth:`Recovery._enter`; the evidence for each is in the module docstring):

    * ``healthy`` -> ``backing_off`` (an LR back-off) | ``rolling_back`` (a rollback);
    * ``backing_off`` -> ``rolling_back`` (a rollback) | ``recovered`` (the LR scale grew back to 1);
    * ``rolling_back`` -> ``recovered`` (a newer good snapshot: training went on from the restored state
      and proved healthy) | ``backing_off`` (the same, with the LR still cut: it grows back from there);
    * ``recovered`` -> ``healthy`` (the next real step) | ``backing_off`` | ``rolling_back``;
    * any -> ``diverged`` (giving up); ``diverged`` is final.
    """

    #: training runs at the user's LR, no rollback outstanding.
    HEALTHY = "healthy"
    #: the LR is cut (``lr_scale`` < 1) because skips said the weights or the LR were at fault.
    BACKING_OFF = "backing_off"
    #: a snapshot was restored, and no newer good one has been kept since (the budget is in use).
    ROLLING_BACK = "rolling_back"
    #: a back-off was undone or a rollback's restored state proved healthy; healthy at the next real step.
    RECOVERED = "recovered"
    #: TrainingDiverged was raised; no way out.
    DIVERGED = "diverged"


class Trigger(str, Enum):
    """What moves recovery from one :class:`RecoveryState` to another."""

    LR_BACKOFF = "lr_backoff"
    ROLLBACK = "rollback"
    SCALE_RESTORED = "scale_restored"
    SNAPSHOT_KEPT = "snapshot_kept"
    SNAPSHOT_KEPT_LR_CUT = "snapshot_kept_lr_cut"
    REAL_STEP = "real_step"
    GAVE_UP = "gave_up"


class Action(str, Enum):
    """What one step's evidence calls for (:func:`escalate`); its value is the event kind logged."""

    NONE = "none"
    LR_BACKOFF = "lr_backoff"
    LR_RECOVER = "lr_recover"
    ROLLBACK = "rollback"
    STALL = "stall"


class Evidence(NamedTuple):
    """One step, as recovery sees it.

    Attributes:
        step: the optimizer step.
        skipped: the step was skipped.
        sound: the step shows the weights sound: its loss finite and not a spike, on weights that the last
            real step made without any event (or a GradScaler overflow: no evidence either way).
    """

    step: int
    skipped: bool
    sound: bool


class EscalationCounts(NamedTuple):
    """The counters :func:`escalate` reads: suspect skips in the window since the last sound step, skips
    in a row, the step of the last back-off, the LR cut in force and the real steps taken at it."""

    suspect: int
    skip_streak: int
    last_backoff: int | None
    lr_scale: float
    real_steps_at_scale: int


def batch_skip(record: StepRecord, loss_z: float) -> bool:
    """Whether a flushed step was skipped for its batch's fault alone: its only events are non-finite
    gradients (a NaN batch, a GradScaler overflow) and its loss, run on the same weights, was finite and no
    spike. Such a step neither counts toward a snapshot's quiet streak nor breaks it (the weights did not
    move, and their loss vouched for them), as real steps at a cut LR are counted across such skips."""
    return bool(record["skipped"] and record["events"]) and all(
        event["kind"] == "nonfinite_grad" for event in record["events"]) and math.isfinite(loss_z) and (
        math.isfinite(record["loss"]))


def lr_growth(policy: RecoveryPolicy) -> float:
    """The factor by which the LR scale grows back, ``1 / min(lr_backoff, rollback_lr_factor)``: one
    growth undoes one cut (capped at 1)."""
    return 1.0 / min(policy.lr_backoff, policy.rollback_lr_factor)


def escalate(policy: RecoveryPolicy, counts: EscalationCounts, evidence: Evidence) -> Action:
    """The escalation rule, a pure function of the counters before this step and the step's evidence.

    1. A real step: after ``lr_recover_after`` real steps at a scale below 1 (counted across interleaved
       skips, as ``GradScaler`` counts its growth interval), grow the scale back (``LR_RECOVER``).
    2. A skip: ``max_skip_streak`` in a row -> ``STALL``; one not ``sound`` joins the suspect skips;
       ``rollback_after`` suspect skips within ``skip_window`` -> ``ROLLBACK``; ``backoff_after`` of them
       -> ``LR_BACKOFF`` (at most once per ``skip_window``). A sound skip (a NaN batch on a healthy run, a
       GradScaler overflow) clears the suspect count: the batch was at fault, not the weights or the LR.
    """
    p = policy
    if not evidence.skipped:
        due = p.lr_recover_after is not None and counts.real_steps_at_scale + 1 >= p.lr_recover_after
        return Action.LR_RECOVER if counts.lr_scale < 1.0 and due else Action.NONE
    if p.max_skip_streak is not None and counts.skip_streak + 1 >= p.max_skip_streak:
        return Action.STALL
    if evidence.sound:
        return Action.NONE
    suspect = counts.suspect + 1  # this skip too
    if suspect >= p.rollback_after:
        return Action.ROLLBACK
    cooling = counts.last_backoff is not None and evidence.step - counts.last_backoff < p.skip_window
    if suspect >= p.backoff_after and not cooling:
        return Action.LR_BACKOFF
    return Action.NONE


class Recovery:
    """The host side of the Guard: escalation (back-off, rollback, give up), snapshots and their log.

    The Guard calls :meth:`start` before its first step, :meth:`after_step` with each step's events (every
    step on the plain path, at the flush on the fused path), and :meth:`at_flush` when it has read the
    weights' finite check and the flushed records. Decisions that end training raise :class:`GiveUp`;
    :meth:`diverged` then restores the last good snapshot and builds the :class:`TrainingDiverged`.

    Its state (:attr:`phase`, a :class:`RecoveryState`) moves only in :meth:`_enter`, on this evidence:

    | from | evidence (the trigger) | to |
    |---|---|---|
    | healthy, recovered | ``backoff_after`` suspect skips within ``skip_window`` (``lr_backoff``) | backing_off |
    | any but diverged | ``rollback_after`` suspect skips, non-finite weights or optimizer state (at a flush, or at a NaN/Inf loss on the plain path), or a ``"rollback"`` response (``rollback``) | rolling_back |
    | backing_off | ``lr_recover_after`` real steps at each cut, counted across skips, brought ``lr_scale`` back to 1 (``scale_restored``) | recovered |
    | rolling_back | a newer snapshot kept: training went on from the restored state and proved healthy (``snapshot_kept``) | recovered |
    | rolling_back | the same, with ``lr_scale`` still below 1 (``snapshot_kept_lr_cut``) | backing_off |
    | recovered | the next real step (``real_step``) | healthy |
    | any | the rollback budget spent, ``max_skip_streak`` skips in a row, a ``"raise"`` response (``gave_up``) | diverged (final) |

    Neither a skip for its batch's fault (a NaN batch whose loss is healthy) nor a ``GradScaler`` overflow
    is suspect: such a skip clears the suspect count (skipping works) and adds to the skip streak only.

    A rollback called for while the restored weights are untouched, by loss spikes that agree, is a
    *relevel* instead (:meth:`_level_moved`): no transition, the state stays where it is (``rolling_back``
    until a newer snapshot is kept), the rollback budget is not used.
    """

    def __init__(self, policy: RecoveryPolicy, state: TrainingState, fingerprint: str = "", name_suffix: str = ""):
        """``fingerprint``: the run's (written into and checked against each snapshot file); ``name_suffix``:
        added to the files' names (``.rank<r>`` for the ranks of a distributed run sharing one folder)."""
        self.policy = policy
        self.state = state
        self.snapshot = Snapshot(policy.snapshot_dir, prefix=f"{Snapshot.PREFIX}{name_suffix}", fingerprint=fingerprint)
        # the state as the last step before a flush began, kept if the flush finds that step healthy
        self.candidate = Snapshot(policy.snapshot_dir, prefix=f"{Snapshot.PREFIX}{name_suffix}",
                                  fingerprint=fingerprint)
        self.initial_lrs = group_lrs(state.optimizer)
        # escalation
        self.phase = RecoveryState.HEALTHY
        self.suspect: deque[int] = deque()  # skips whose loss did not vouch for the weights, since one did
        self.skip_streak = 0  # skipped steps in a row
        # the weights come from a real step without event (or a snapshot); "quiet": no event and no skip,
        # "at its level": a loss near the detector's moving level (the two words are used for nothing else)
        self.weights_from_quiet_step = True
        self.last_backoff: int | None = None
        self.lr_scale = 1.0  # the LR cut in force: the LR is the user's (or the schedule's) times this
        self.real_steps_at_scale = 0  # real steps since lr_scale last changed (skips in between do not reset it)
        self.rollbacks = 0
        self.rollbacks_to_snapshot = 0  # rollbacks since the last snapshot was taken (the budget's use)
        self.lr_backoffs = 0
        # snapshots: healthy steps in a row, counted from the flushed records after the last restore
        self.quiet_steps = 0  # flushed steps in a row without event or skip (toward the next snapshot)
        self.quiet_loss_z: deque[float] = deque(maxlen=max(1, policy.snapshot_clean_steps))
        self.restored_after: int = -1  # records of steps <= this came from state a rollback abandoned
        # a rollback replaced the weights: before the next step the Guard puts the detector's loss level at
        # the restored weights' loss (Detector.set_loss_level); saved, so that a resume right after a
        # rollback does it too
        self.loss_level_due = False
        self.loss_level: float | None = None  # the level to put there instead of the snapshot's loss (a relevel)
        # the weights are the restored snapshot's, untouched: no real step since the rollback; and the losses
        # of the suspect skips since, each finite and a spike (a device tensor on the plain path, read only
        # when they call for a rollback: :meth:`_level_moved`)
        self.restored_untouched = False
        self.untouched_losses: list[Tensor | float] = []
        # the action log: events of host actions, by step, until the Guard attaches them to their records
        self.actions: dict[int, list[Event]] = {}
        self.recent: deque[Event] = deque(maxlen=20)

    # ------------------------------------------------------------------ the rungs

    def start(self, step: int, before_flush: bool) -> None:
        """Before a step: the first snapshot, the weights as training starts (taken here, not when the Guard
        is made, so that weights loaded after it, e.g. a pretrained checkpoint, are the ones kept); and, when
        a snapshot is due and this step is the last before a flush (``before_flush``), the candidate: the
        state as this step begins, which :meth:`at_flush` keeps only if this step, run on it, was healthy."""
        every = self.policy.snapshot_every
        if every is None:
            return
        if self.snapshot.step is None:
            self.snapshot.save(step, self.state.capture())
        elif before_flush and step + 1 - self.snapshot.step >= every:
            self.candidate.save(step, self.state.capture())

    def after_step(self, step: int, kinds: Sequence[str], responses: Responses, skipped: bool, now: int,
                   loss_given: bool, scaler_overflow: bool = False, nonfinite_weight: str | None = None,
                   loss: Tensor | float | None = None) -> bool:
        """One step's host decisions: ``"raise"`` / ``"rollback"`` responses, then the escalation rungs.

        ``loss_given``: the step had a loss (its events then say whether it was finite and at its level).
        ``now`` is the last step taken (the fused path decides at the flush, after later steps ran).
        ``scaler_overflow``: a GradScaler's overflow (its non-finite gradients and nothing else): the scaler
        halves its scale, that is its job; the skip is no evidence against the weights or the LR.
        ``nonfinite_weight``: the weight found NaN/Inf at this step (the Guard checks them at a NaN/Inf loss):
        rolled back at once (:meth:`weights_nonfinite`), not counted as a suspect skip, so that one corrupted
        weight costs one rollback, not a back-off after 5 NaN losses and a rollback after 10.
        ``loss``: the step's loss (a device tensor, never read here, or a float), kept while the weights are
        the restored ones and its skip a loss spike (:meth:`_level_moved`).
        Returns True when it rolled back or relearned the loss's level (the steps after this one, decided
        already on the fused path, were judged against what was replaced). Raises :class:`GiveUp`.
        """
        for kind in kinds:
            if responses[kind] == "raise":
                raise GiveUp(f"a {kind} event at step {step}, whose response is 'raise'", step)
        for kind in kinds:
            if responses[kind] == "rollback":
                self.rollback(step, f"a {kind} event", now)
                return True
        if nonfinite_weight is not None:  # the weights that the last real step left: blamed if it had events
            self.weights_nonfinite(step, nonfinite_weight, responses["nonfinite_param"], now,
                                   update_blamed=not self.weights_from_quiet_step)
            return True
        if not skipped:
            self.weights_from_quiet_step = not kinds
            self.restored_untouched = False
            self.untouched_losses.clear()
        loss_healthy = loss_given and not any(kind in ("nonfinite_loss", "loss_spike") for kind in kinds)
        sound = (loss_healthy and self.weights_from_quiet_step) or scaler_overflow
        if sound:
            self.untouched_losses.clear()
        elif skipped and self.restored_untouched and loss is not None and "loss_spike" in kinds:
            # a loss spike is finite by construction (the detector scores finite logs only)
            self.untouched_losses.append(loss.detach() if isinstance(loss, Tensor) else float(loss))
        evidence = Evidence(step=step, skipped=skipped, sound=sound)
        while self.suspect and self.suspect[0] <= step - self.policy.skip_window:
            self.suspect.popleft()  # out of the window
        action = escalate(self.policy, self.counts(), evidence)
        self._count(evidence)
        if not skipped and self.phase is RecoveryState.RECOVERED:
            self._enter(Trigger.REAL_STEP)
        return self._act(step, action, now)

    def _enter(self, trigger: Trigger) -> None:
        """The one place :attr:`phase` changes: one branch per state; an impossible transition raises."""
        state, new = self.phase, self.phase
        if state is RecoveryState.DIVERGED:
            raise RuntimeError(f"Recovery: no transition out of {state.value!r} (on {trigger.value!r}): training "
                               "diverged; load a checkpoint to go on")
        if trigger is Trigger.GAVE_UP:
            new = RecoveryState.DIVERGED
        elif state is RecoveryState.HEALTHY:  # is the run still healthy?
            new = {Trigger.LR_BACKOFF: RecoveryState.BACKING_OFF, Trigger.ROLLBACK: RecoveryState.ROLLING_BACK,
                   }.get(trigger, state)
        elif state is RecoveryState.BACKING_OFF:  # is the cut still needed?
            new = {Trigger.ROLLBACK: RecoveryState.ROLLING_BACK, Trigger.SCALE_RESTORED: RecoveryState.RECOVERED,
                   }.get(trigger, state)
        elif state is RecoveryState.ROLLING_BACK:  # did training from the restored state prove healthy?
            new = {Trigger.SNAPSHOT_KEPT: RecoveryState.RECOVERED,
                   Trigger.SNAPSHOT_KEPT_LR_CUT: RecoveryState.BACKING_OFF}.get(trigger, state)
        elif state is RecoveryState.RECOVERED:  # does it stay so?
            new = {Trigger.REAL_STEP: RecoveryState.HEALTHY, Trigger.LR_BACKOFF: RecoveryState.BACKING_OFF,
                   Trigger.ROLLBACK: RecoveryState.ROLLING_BACK}.get(trigger, state)
        else:
            raise RuntimeError(f"Recovery: unknown state {state!r} (on {trigger.value!r})")
        self.phase = new

    def counts(self) -> EscalationCounts:
        """The counters :func:`escalate` reads (a copy)."""
        return EscalationCounts(suspect=len(self.suspect), skip_streak=self.skip_streak,
                                last_backoff=self.last_backoff, lr_scale=self.lr_scale,
                                real_steps_at_scale=self.real_steps_at_scale)

    def _count(self, evidence: Evidence) -> None:
        """Advance the windows and counters by one step (what :func:`escalate` already judged)."""
        if evidence.sound:
            self.suspect.clear()  # the weights gave a healthy loss: the skips so far were the batches' fault
        if not evidence.skipped:
            self.skip_streak = 0
            self.real_steps_at_scale += 1
            return
        self.skip_streak += 1
        if not evidence.sound:
            self.suspect.append(evidence.step)

    def _act(self, step: int, action: Action, now: int) -> bool:
        """Carry out :func:`escalate`'s action: change the LR scale, roll back, or give up."""
        p = self.policy
        if action is Action.STALL:
            raise GiveUp(f"{self.skip_streak} steps in a row were skipped (max_skip_streak="
                         f"{p.max_skip_streak}): training is not progressing", step)
        if action is Action.ROLLBACK:
            if self.restored_untouched and self._level_moved(step):
                # the rollback's target is in place already: the loss's level moved instead; the steps after
                # this one were judged against the old level (the fused path's later records)
                self.restored_after = now
                return True
            self.rollback(step, f"{len(self.suspect)} skipped steps within {p.skip_window} with a NaN/Inf "
                                "or spiking loss", now)
            return True
        if action is Action.LR_BACKOFF:
            self.last_backoff = step
            self._enter(Trigger.LR_BACKOFF)
            self._set_lr_scale(step, "lr_backoff", self.lr_scale * p.lr_backoff)
            self.lr_backoffs += 1
        elif action is Action.LR_RECOVER:
            scale = min(1.0, self.lr_scale * lr_growth(p))
            if scale == 1.0:
                self._enter(Trigger.SCALE_RESTORED)
            self._set_lr_scale(step, "lr_recover", scale)
        return False

    def _set_lr_scale(self, step: int, kind: str, scale: float) -> tuple[float, float]:
        """Put the LR cut at ``scale`` (<= 1): every group's LR (and the scheduler's ``base_lrs``) is
        multiplied by ``scale / lr_scale``; the count of real steps at this scale restarts."""
        optimizer = self.state.optimizer
        before = float(optimizer.param_groups[0]["lr"])
        scale_lr_(optimizer, scale / self.lr_scale, self.state.scheduler)
        self.lr_scale = scale
        self.real_steps_at_scale = 0
        after = float(optimizer.param_groups[0]["lr"])
        if kind != "rollback":
            self.note({"step": step, "kind": kind, "layer": None, "action": kind,
                       "lr_before": before, "lr_after": after, "lr_scale": scale, "state": self.phase.value})
        return before, after

    def rollback(self, step: int, reason: str, now: int, cut: bool = True) -> None:
        """Restore the last good snapshot and cut the learning rate (``cut=False``: keep it, for weights that
        no update damaged, see :meth:`weights_nonfinite`); raises :class:`GiveUp` when impossible."""
        if self.snapshot.step is None:
            raise GiveUp(f"{reason} at step {step} called for a rollback, and snapshots are off "
                         "(snapshot_every=None)", step)
        if self.rollbacks_to_snapshot >= self.policy.max_rollbacks:
            raise GiveUp(f"{reason} at step {step} called for a rollback, and the rollback budget is spent "
                         f"({self.rollbacks_to_snapshot} of max_rollbacks={self.policy.max_rollbacks}): every rollback to the "
                         f"snapshot of step {self.snapshot.step} went bad again before a newer one was good", step)
        self.state.restore(self._checked_snapshot(step, reason))
        self._enter(Trigger.ROLLBACK)
        if cut:
            before, after = self._set_lr_scale(step, "rollback", self.lr_scale * self.policy.rollback_lr_factor)
        else:
            before = after = float(self.state.optimizer.param_groups[0]["lr"])
        self.rollbacks += 1
        self.rollbacks_to_snapshot += 1
        self.suspect.clear()
        self.quiet_steps = 0
        self.quiet_loss_z.clear()
        self.restored_after = now
        self.loss_level_due = True
        self.loss_level = None  # the snapshot's own loss
        self.restored_untouched = True
        self.untouched_losses.clear()
        self.weights_from_quiet_step = True  # the snapshot's weights gave a healthy step
        self.candidate.clear()  # taken from the state just abandoned
        self.note({"step": step, "kind": "rollback", "layer": None, "action": "rollback", "reason": reason,
                   "to_step": self.snapshot.step, "lr_before": before, "lr_after": after,
                   "state": self.phase.value})

    def _level_moved(self, step: int) -> bool:
        """Whether the skips that call for a rollback say the loss's level moved, not the weights: the weights
        are the restored snapshot's, untouched since the rollback (no real step), and every suspect skip since
        was a loss spike, the losses agreeing with each other (``1.4826 * MAD`` of their logs at most
        ``LEVEL_SPREAD``). A rollback would put back the weights already in place; weights that gave a healthy
        loss before now give these losses on the batches of today: the data or the loss changed (a harder data
        mixture, a loss term switched on), and their median is the new level (:meth:`Detector.set_loss_level`).
        Faults do not agree so (a dense window's scaled batches differ by orders of magnitude), and a loss that
        is NaN/Inf is no level. When it moved: an event ``loss_relevel``, no rollback, no cut; returns True.
        One read of the losses kept, at this rare moment only."""
        if not self.untouched_losses or len(self.untouched_losses) < len(self.suspect):  # not all finite spikes
            return False
        logs = torch.tensor(_host_values(self.untouched_losses), dtype=torch.float64).log()
        level = float(logs.median())
        spread = MAD_TO_STD * float((logs - level).abs().median())
        if not (math.isfinite(level) and spread <= LEVEL_SPREAD):
            return False
        before = self.snapshot.loss
        self.loss_level = math.exp(level)
        self.loss_level_due = True
        self.note({"step": step, "kind": "loss_relevel", "layer": None, "action": "relevel",
                   "reason": f"{len(logs)} losses in a row, on the weights of the snapshot of step {self.snapshot.step} "
                             "untouched since the rollback, spiked and agree: the loss's level moved, not the weights",
                   "loss_before": before if before is not None else math.nan, "loss_after": self.loss_level,
                   "state": self.phase.value})
        self.suspect.clear()
        self.untouched_losses.clear()
        return True

    def weights_nonfinite(self, step: int, bad_param: str, response: str, now: int, update_blamed: bool) -> None:
        """NaN/Inf found in ``bad_param`` (a weight or an optimizer-state tensor): roll back, or give up when the
        ``nonfinite_param`` response is ``"raise"``.

        The learning rate is cut only when an update may have put the NaN there (``update_blamed``: a real step
        with an event since the weights were last known finite). An update computed from finite gradients
        (NaN/Inf ones are skipped) is finite unless it overflows, and an update that large is a spike the
        detector flags first; so NaN in weights that only quiet steps moved came from outside the optimizer
        step (a corrupted write, a bit flip, the loop's own code), and a lower LR would not have kept it out:
        it would only slow the rest of the run (a 50-step window of such faults stacked 5-6 cuts)."""
        self.note({"step": step, "kind": "nonfinite_param", "layer": bad_param, "action": response})
        if response == "raise":
            raise GiveUp(f"non-finite weights in {bad_param!r} after step {step}", step)
        self.rollback(step, f"non-finite weights in {bad_param!r}", now, cut=update_blamed)

    def parameters_changed(self, step: int, added: Sequence[str]) -> None:
        """The model's or the optimizer's parameters changed before ``step``: the snapshots of the old set
        are dropped, and :meth:`start` takes a new first one of the state as this step begins (it cannot be
        restored into the new optimizer, so no rollback crosses the change); a fresh rollback budget."""
        if self.snapshot.previous is not None:
            self.snapshot._remove(self.snapshot.previous[0])
            self.snapshot.previous = None
        self.snapshot.clear()
        self.candidate.clear()
        self.rollbacks_to_snapshot = 0
        # a group added (add_param_group) comes at the user's LR: the cut in force applies to it too, so that
        # growing the scale back brings it to the user's LR, never past it
        added_groups = self.state.optimizer.param_groups[len(self.initial_lrs):]
        self.initial_lrs.extend(float(group["lr"]) for group in added_groups)
        if added_groups and self.lr_scale < 1.0:
            scale_lr_(self.state.optimizer, self.lr_scale, groups=added_groups)
        self.note({"step": step, "kind": "params_changed", "layer": None, "action": "snapshot",
                   "reason": f"parameters added: {', '.join(added[:5]) or '?'}{', ...' if len(added) > 5 else ''}"})

    def _checked_snapshot(self, step: int, reason: str) -> dict[str, Any]:
        """The snapshot's state, its file checked first; a file that fails gives way to the older good one,
        and with none left the run gives up (the weights are not touched)."""
        while True:
            try:
                return self.snapshot.load()
            except SnapshotError as error:
                failed = str(error)
                held = self.snapshot.load_held()
                if held is not None:  # the file is damaged, the bytes it was written from are not
                    self.note({"step": step, "kind": "snapshot_fallback", "layer": None, "action": "rollback",
                               "reason": f"{failed}; restored from the bytes held in memory",
                               "to_step": self.snapshot.step})
                    return held
                if not self.snapshot.fall_back():
                    self.snapshot.step = None
                    raise GiveUp(f"{reason} at step {step} called for a rollback, and no snapshot file can be "
                                 f"trusted ({failed})", step) from None
                self.note({"step": step, "kind": "snapshot_fallback", "layer": None, "action": "rollback",
                           "reason": failed, "to_step": self.snapshot.step})

    def note(self, event: Event) -> None:
        """Log a host action (attached to its step's record by the Guard)."""
        self.actions.setdefault(event["step"], []).append(event)
        self.recent.append(event)

    # ------------------------------------------------------------------ flush: weights and snapshots

    def note_losses(self, records: Sequence[StepRecord]) -> None:
        """Keep the loss of the steps that ran on the snapshot's and the candidate's weights (their own steps),
        from the records just flushed: after a rollback, the detector's loss level is put there."""
        for record in records:
            for snapshot in (self.snapshot, self.candidate):
                if record["step"] == snapshot.step:
                    snapshot.loss = record["loss"]

    def at_flush(self, records: Sequence[StepRecord], loss_z: Sequence[float], bad_param: str | None,
                 nonfinite_param_response: str, step_count: int, candidate_finite: bool = True) -> None:
        """After a flush read: roll back (or give up) on non-finite weights or optimizer state, else snapshot
        if due and good.

        ``records`` are the steps flushed, ``loss_z`` their z-scores of the log loss, ``bad_param`` the first
        parameter (or optimizer-state tensor) holding NaN/Inf (None: all finite), ``step_count`` the steps
        taken so far, ``candidate_finite`` whether every tensor of the snapshot candidate is finite (a
        candidate with NaN/Inf in its optimizer state is never kept).
        """
        for record, z in zip(records, loss_z):
            if record["step"] <= self.restored_after:
                continue
            if batch_skip(record, z):  # the weights did not move, and their loss vouched for them
                self.quiet_loss_z.append(z)
            elif record["events"] or record["skipped"]:
                self.quiet_steps = 0
                self.quiet_loss_z.clear()
            else:
                self.quiet_steps += 1
                self.quiet_loss_z.append(z if math.isfinite(z) else 0.0)
        if bad_param is not None:  # an update is blamed if a real step since the last flush had an event
            blamed = any(record["events"] and not record["skipped"] for record in records
                         if record["step"] > self.restored_after)
            self.weights_nonfinite(step_count - 1, bad_param, nonfinite_param_response, step_count - 1, blamed)
            return
        if self.candidate.step is None:
            return
        p = self.policy
        loss_near_level = not sum(self.quiet_loss_z) > p.snapshot_loss_z * len(self.quiet_loss_z)
        # the last record is the step run on the candidate's weights: a real step without event (a batch's
        # skip there does not do: weights whose gradients overflow while their loss looks fine would be kept),
        # and near the level on its own
        last = records[-1]
        ran_well = last["step"] == self.candidate.step and not (last["events"] or last["skipped"]) and (
            self.quiet_steps >= 1 and not self.quiet_loss_z[-1] > p.snapshot_loss_z)
        if ran_well and candidate_finite and self.quiet_steps >= p.snapshot_clean_steps and loss_near_level:
            self.snapshot.take(self.candidate)
            if self.phase is RecoveryState.ROLLING_BACK:  # the rollback helped; a cut left grows back from here
                self._enter(Trigger.SNAPSHOT_KEPT if self.lr_scale >= 1.0 else Trigger.SNAPSHOT_KEPT_LR_CUT)
            self.rollbacks_to_snapshot = 0  # training went on from the last restore and proved healthy: fresh budget
        else:
            self.candidate.clear()

    # ------------------------------------------------------------------ giving up

    def diverged(self, give_up: GiveUp, summary: dict[str, int]) -> TrainingDiverged:
        """Put the last good snapshot back into the model and optimizer; the exception that says so."""
        self.candidate.clear()
        if self.phase is not RecoveryState.DIVERGED:
            self._enter(Trigger.GAVE_UP)
        if self.snapshot.step is not None:
            with contextlib.suppress(GiveUp):
                self.state.restore(self._checked_snapshot(give_up.step, "giving up"))
        restored = self.snapshot.step
        lines = [f"gradguard: training diverged at step {give_up.step}: {give_up.reason}."]
        if self.recent:
            lines.append("What happened (latest events):")
            for event in list(self.recent)[-10:]:
                values = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in event.items() if k not in ("step", "kind", "layer", "action")
                )
                where = f" in {event['layer']!r}" if event.get("layer") else ""
                lines.append(f"  step {event['step']}: {event['kind']}{where} ({values}) -> {event['action']}")
        lr_now = float(self.state.optimizer.param_groups[0]["lr"])
        lines.append(
            f"Counters: {summary['steps']} steps, {summary['skipped']} skipped, {summary['clipped']} clipped, "
            f"{summary['rollbacks']} rollbacks, {summary['lr_backoffs']} LR back-offs; "
            f"lr {self.initial_lrs[0]:.3g} -> {lr_now:.3g}."
        )
        if restored is not None:
            lines.append(f"The model and optimizer now hold the last good snapshot, of step {restored}.")
        else:
            lines.append("There is no snapshot to restore (snapshot_every=None, or no file could be trusted): the "
                         "model and optimizer were left as they are.")
        lines.append("Try a lower learning rate, gradient clipping (gg.clip.GlobalNorm), a better-scaled init "
                     "(gg.init.auto_), or gg.doctor(model, batch, loss_fn) to find the layer.")
        return TrainingDiverged("\n".join(lines), give_up.step, list(self.recent), summary, restored)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "suspect": list(self.suspect),
            "skip_streak": self.skip_streak,
            "weights_from_quiet_step": self.weights_from_quiet_step,
            "last_backoff": self.last_backoff,
            "real_steps_at_scale": self.real_steps_at_scale,
            "state": self.phase.value,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "rollbacks_to_snapshot": self.rollbacks_to_snapshot,
            "lr_backoffs": self.lr_backoffs,
            "quiet_steps": self.quiet_steps,
            "quiet_loss_z": list(self.quiet_loss_z),
            "restored_after": self.restored_after,
            "loss_level_due": self.loss_level_due,
            "loss_level": self.loss_level,
            "restored_untouched": self.restored_untouched,
            "untouched_losses": _host_values(self.untouched_losses),
            "snapshot": self.snapshot.state_dict(),
            "actions": {step: list(events) for step, events in self.actions.items()},
            "initial_lrs": list(self.initial_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.suspect = deque(int(s) for s in state["suspect"])
        self.skip_streak = int(state["skip_streak"])
        self.weights_from_quiet_step = bool(state["weights_from_quiet_step"])
        self.last_backoff = None if state["last_backoff"] is None else int(state["last_backoff"])
        self.real_steps_at_scale = int(state["real_steps_at_scale"])
        self.lr_scale = float(state["lr_scale"])
        self.phase = RecoveryState(state["state"])
        self.rollbacks = int(state["rollbacks"])
        self.rollbacks_to_snapshot = int(state["rollbacks_to_snapshot"])
        self.lr_backoffs = int(state["lr_backoffs"])
        self.quiet_steps = int(state["quiet_steps"])
        self.quiet_loss_z.clear()
        self.quiet_loss_z.extend(float(z) for z in state["quiet_loss_z"])
        self.restored_after = int(state["restored_after"])
        self.loss_level_due = bool(state["loss_level_due"])
        # absent from states saved before the relevel (issue 17): as after a step that left nothing pending
        self.loss_level = None if state.get("loss_level") is None else float(state["loss_level"])
        self.restored_untouched = bool(state.get("restored_untouched", False))
        self.untouched_losses = [float(x) for x in state.get("untouched_losses", [])]
        self.snapshot.load_state_dict(state["snapshot"])
        self.snapshot.verify()  # a resumed run restores its checkpoint's snapshot file, never another's
        self.actions = {int(step): list(events) for step, events in state["actions"].items()}
        self.initial_lrs = [float(lr) for lr in state["initial_lrs"]]

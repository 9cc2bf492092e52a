"""Silent bad data: a character model on Python source with 1% of its rows corrupted, and the data watch.

The corpus is the standard library's own ``.py`` files (read from this Python's installation, nothing is
downloaded), cut into rows of ``length + 1`` bytes; a model reads ``length`` bytes and predicts each next
one. A fraction of the rows is corrupted, in four kinds, equally often:

* ``"repeated"``: one character repeated over the whole row (a deduplication bug, a stuck writer; OLMo 2's
  repeated n-grams): trivially predictable, a suspiciously *low* loss;
* ``"padding"``: padding only (byte 0): as predictable, as low;
* ``"shuffled"``: the row's targets shuffled (labels that do not belong to their inputs): high;
* ``"garbage"``: random bytes (a binary file in a text corpus): high.

At 1% a batch of 32 holds one bad row about every third step, and it moves the batch's gradient norm by a
percent or two: the detector, which watches the whole batch, is not built to see it, and forensics runs
only on the steps the detector flags; :class:`gradguard.forensics.DataWatch` reads the per-sample losses. :func:`train_watched` trains
one run with a Guard and a watch and scores the watch: precision (flagged rows that are corrupted) and
recall (corrupted rows seen after the watch's warm-up that it flagged), per kind.
"""

from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.forensics.watch import DataWatch, SuspectSample
from gradguard.guard import Guard

__all__ = ["KINDS", "CharConvLM", "WatchRun", "corrupt", "source_rows", "train_watched"]

KINDS = ("repeated", "padding", "shuffled", "garbage")
PAD = 0


def source_rows(n_rows: int, length: int = 64) -> Tensor:
    """``(n_rows, length + 1)`` int64 bytes of the standard library's ``.py`` files, in sorted path order,
    cut into consecutive rows. ``ValueError`` when the installation holds fewer bytes."""
    need = n_rows * (length + 1)
    chunks: list[bytes] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= need:
            break
    if total < need:
        raise ValueError(f"source_rows: the standard library holds {total} bytes of .py, {need} needed")
    raw = torch.frombuffer(bytearray(b"".join(chunks)[:need]), dtype=torch.uint8)
    return raw.to(torch.int64).reshape(n_rows, length + 1)


def corrupt(rows: Tensor, fraction: float, seed: int) -> tuple[Tensor, dict[int, str]]:
    """A copy of ``rows`` with ``fraction`` of them corrupted (module docstring), the kinds in turn, and
    ``{row: kind}``."""
    generator = torch.Generator().manual_seed(seed)
    out = rows.clone()
    count = max(len(KINDS), round(fraction * len(rows)))
    chosen = torch.randperm(len(rows), generator=generator)[:count].tolist()
    kinds: dict[int, str] = {}
    for i, row in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        kinds[row] = kind
        if kind == "repeated":
            out[row] = int(torch.randint(33, 127, (1,), generator=generator))
        elif kind == "padding":
            out[row] = PAD
        elif kind == "shuffled":  # inputs kept, targets (positions 1..) shuffled
            order = torch.randperm(out.shape[1] - 1, generator=generator) + 1
            out[row, 1:] = out[row, order]
        else:
            out[row] = torch.randint(0, 256, (out.shape[1],), generator=generator)
    return out, kinds


class CharConvLM(nn.Module):
    """Bytes in, next-byte logits out: an embedding, ``layers`` causal convolutions with GELU and a
    residual, a linear read-out."""

    def __init__(self, width: int = 128, layers: int = 3, kernel: int = 5):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel) for _ in range(layers))
        self.kernel = kernel
        self.out = nn.Linear(width, 256)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).transpose(1, 2)  # (B, width, T)
        for conv in self.convs:
            h = h + F.gelu(conv(F.pad(h, (self.kernel - 1, 0))))  # left padding: causal
        return self.out(h.transpose(1, 2))  # (B, T, 256)


def sample_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each row's mean next-byte cross-entropy, ``(B,)`` (``reduction="none"``, then the mean over time)."""
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(dim=1)


@dataclass
class WatchRun:
    """One watched run: what was flagged, what was corrupted, and the scores."""

    suspects: list[SuspectSample]
    corrupted_seen: dict[int, str]  # corrupted rows seen after the warm-up: {row: kind}
    precision: float | None
    recall: float | None
    recall_by_kind: dict[str, float | None]
    flagged_by_kind: dict[str, int]
    false_positives: int
    spikes: int  # steps the Guard's detector flagged (grad or loss spike, NaN)
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # per step, as the Guard recorded them
    grad_norms: list[float] = field(default_factory=list)


def train_watched(seed: int = 0, steps: int = 600, batch_size: int = 32, length: int = 64, fraction: float = 0.01,
                  watch: DataWatch | None = None, width: int = 128, lr: float = 3e-3) -> WatchRun:
    """Train :class:`CharConvLM` for ``steps`` steps on corrupted Python source, one pass over
    ``steps * batch_size`` rows in a shuffled order, with a Guard and ``watch`` (default ``DataWatch()``),
    and score the watch against the corrupted rows (module docstring)."""
    torch.manual_seed(seed)
    rows, kinds = corrupt(source_rows(steps * batch_size, length), fraction, seed)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1))
    model = CharConvLM(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    watch = watch if watch is not None else DataWatch()
    guard = Guard(model, optimizer, data_watch=watch, log_every=50)
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(steps):
        ids = order[step * batch_size:(step + 1) * batch_size]
        x, y = rows[ids, :-1], rows[ids, 1:]
        losses = sample_losses(model, x, y)
        loss = losses.mean()
        loss.backward()
        guard.step(loss, batch=(x, y, ids), sample_losses=losses)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    seconds = time.perf_counter() - start
    after = order[(watch.warmup_steps + 1) * batch_size:steps * batch_size].tolist()
    seen = {row: kinds[row] for row in after if row in kinds}
    flagged = {s["id"] for s in watch.suspects}
    hits = flagged & set(seen)
    spikes = sum(1 for r in guard.history for e in r["events"] if e["kind"] in (
        "grad_spike", "loss_spike", "nonfinite_grad", "nonfinite_loss"))
    return WatchRun(
        suspects=list(watch.suspects),
        corrupted_seen=seen,
        precision=len(hits) / len(flagged) if flagged else None,
        recall=len(hits) / len(seen) if seen else None,
        recall_by_kind={k: (sum(1 for r in hits if seen[r] == k) / n if (n := sum(1 for v in seen.values() if v == k))
                            else None) for k in KINDS},
        flagged_by_kind={k: sum(1 for r in hits if seen[r] == k) for k in KINDS},
        false_positives=len(flagged - set(seen)),
        spikes=spikes,
        seconds=seconds,
        final_loss=float(loss.detach()),
        losses=[r["loss"] for r in guard.history],
        grad_norms=[r["total_norm"] for r in guard.history],
    )

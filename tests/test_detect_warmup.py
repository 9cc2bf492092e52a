"""The detector's warm-up cannot be fooled by bad data (issue 17, item 2): a batch holding one row with a x100
loss is flagged in the warm-up as often as later in the run, and a healthy warm-up raises nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import Detector

ROWS = 16
ROW_X100 = (ROWS - 1 + 100) / ROWS  # a batch of 16 with one row's loss x100: its loss x7.2
WARMUP_OUTLIERS = (4, 6, 9, 12, 15, 18, 21, 24)  # 8 steps before the warm-up's end (25 steps)
LATER_OUTLIERS = (130, 140, 150, 160, 170, 180, 190, 199)


def _train(seed: int, optimizer_name: str, outliers: tuple[int, ...] = (), steps: int = 200,
           ) -> tuple[dict[int, list[str]], list[tuple[gg.GradStats, torch.Tensor]]]:
    """Guarded steps of a classifier (4 Gaussian classes in 8 dimensions, 10% of labels flipped, 16 rows a batch).
    At the ``outliers`` steps row 0's loss is 100 times the batch's mean and its gradient unchanged: a mislabeled
    row under cross-entropy, whose loss is unbounded while its gradient is not (``|softmax - onehot| <= sqrt 2``),
    so that only the loss can tell. Returns each step's events and what the detector saw (statistics, loss)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer_name == "SGD"
                 else torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1))
    guard = gg.Guard(model, optimizer, log_every=50)
    centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(123))
    data = torch.Generator().manual_seed(seed)
    seen = []
    for step in range(steps):
        y = torch.randint(0, 4, (ROWS,), generator=data)
        x = centers[y] + torch.randn(ROWS, 8, generator=data)
        y = torch.where(torch.rand(ROWS, generator=data) < 0.1, torch.randint(0, 4, (ROWS,), generator=data), y)
        per_row = nn.functional.cross_entropy(model(x), y, reduction="none")
        if step in outliers:
            lift = (100.0 * per_row.mean() - per_row[0]).detach()
            per_row = per_row + torch.cat([lift.reshape(1), torch.zeros(ROWS - 1)])
        loss = per_row.mean()
        loss.backward()
        seen.append((gg.grad_stats(model), loss.detach()))
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    return {r["step"]: [e["kind"] for e in r["events"]] for r in guard.history}, seen


def _spikes(events: dict[int, list[str]], steps) -> list[int]:
    return [step for step in steps if {"loss_spike", "grad_spike"} & set(events[step])]


@pytest.mark.parametrize("optimizer_name", ["SGD", "AdamW"])
def test_x100_loss_rows_in_the_warmup_are_flagged(optimizer_name: str) -> None:
    """Regression: the warm-up scored against the median and MAD of every value so far, floored at 0.5 (a spike
    had to be e^2 = 7.4 times that median): 0 or 1 of these 8 steps flagged, under the Guard at its defaults."""
    events, _ = _train(0, optimizer_name, WARMUP_OUTLIERS, steps=30)
    flagged = _spikes(events, WARMUP_OUTLIERS)
    assert len(flagged) >= 7, f"{len(flagged)} of 8 x100-loss rows in the warm-up flagged: {flagged}"
    assert not _spikes(events, set(events) - set(WARMUP_OUTLIERS)), events  # and nothing else


@pytest.mark.parametrize("optimizer_name", ["SGD", "AdamW"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_x100_loss_row_is_flagged_in_the_warmup_as_often_as_later(seed: int, optimizer_name: str) -> None:
    """On a healthy run (no spike in its warm-up: no false flag), the detector as it stood before a step is shown
    that step with one row's loss x100, 8 times in the warm-up and 8 times later in the run. Regression: 0 or 1 of
    the 8 in the warm-up were flagged against 5 to 7 of the 8 later. (At SGD seed 1, step 29's gradient norm is 2.7x
    the median of the warm-up's last steps, z 5 against their variance: a grad_spike, before and now.)"""
    events, seen = _train(seed, optimizer_name)
    spikes = {step: kinds for step, kinds in events.items() if {"loss_spike", "grad_spike"} & set(kinds)}
    assert not {step for step in spikes if step < 25}, f"spikes in a healthy warm-up: {spikes}"
    detector, flagged = Detector(), {}
    assert detector.warmup_steps == 25
    for step, (stats, loss) in enumerate(seen):
        if step in WARMUP_OUTLIERS + LATER_OUTLIERS:
            probe = Detector()
            probe.load_state_dict(detector.state_dict())
            verdict = probe.update(stats, loss * ROW_X100)
            flagged[step] = bool(verdict.flag("loss_spike"))
        detector.update(stats, loss)
    warmup = sum(flagged[step] for step in WARMUP_OUTLIERS)
    later = sum(flagged[step] for step in LATER_OUTLIERS)
    print(f"x100-loss row flagged: warm-up {warmup} of 8, later {later} of 8")
    assert later >= 4, f"later in the run {later} of 8 flagged"
    assert warmup >= later - 1, f"in the warm-up {warmup} of 8 flagged, later {later}"


def test_the_warmup_reference_and_its_handover_read_nothing_on_the_host() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    noise, detector = torch.Generator().manual_seed(0), Detector()
    for step in range(detector.warmup_steps + 3):  # the warm-up, its last step (the handover), after it
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=noise)
        stats = gg.grad_stats(model)
        with gg.count_host_syncs() as syncs:
            detector.update(stats, torch.tensor(1.0 + 0.1 * step))
        assert syncs.count == 0, (step, syncs.reads)


def _loss_spikes_after_a_fast_fall(detector: Detector, outlier: int) -> list[int]:
    """Steps flagged ``loss_spike`` on a loss whose log falls 0.03 a step for 80 steps (as Adam's does early on the
    soak's model) and then stays, with noise (sd 0.1), and a x7.2 loss at ``outlier``."""
    model = nn.Linear(4, 1)
    noise = torch.Generator().manual_seed(0)
    slot = gg.detect.DETECTOR_KINDS.index("loss_spike")
    flagged = []
    for step in range(outlier + 20):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=noise)
        log_loss = 0.5 - 0.03 * min(max(step - 20, 0), 80) + 0.1 * float(torch.randn((), generator=noise))
        loss = torch.tensor(2.718281828 ** log_loss * (ROW_X100 if step == outlier else 1.0))
        if bool(detector.update(gg.grad_stats(model), loss).flags[slot]):
            flagged.append(step)
    return flagged


@pytest.mark.parametrize("outlier", [130, 160])
def test_a_faster_loss_level_flags_a_x7_loss_after_a_fast_fall(outlier):
    """The soak's ``warmup_outlier`` family under AdamW flags 11 of 51 later x7 batches: the loss's EMA at 0.98 lags a
    fast fall by ~1.4 (log) and its variance swells with the lag, decaying for a hundred steps after the fall (here
    30 and 60 steps after it, the x7 loss is no spike). ``loss_alpha=0.95`` flags it, and only it (10 steps after
    the fall not yet). Not the default yet (``Detector``'s docstring says why)."""
    assert _loss_spikes_after_a_fast_fall(Detector(loss_alpha=0.95), outlier) == [outlier]
    assert outlier not in _loss_spikes_after_a_fast_fall(Detector(), outlier)


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_small_batch_warmup_raises_nothing(seed: int) -> None:
    """The other side of the warm-up's trade-off. Batches of 16 from a linear teacher under Adam: healthy losses
    swing x4 between batches (log 0.38 to 1.86 at steps 8-11), as wide as a x7 batch sits above an SGD warm-up's
    fall. A center at the lower of the medians of the last 8 and of the last 3 values (which follows such a fall,
    and flagged 42 of 51 of the soak's SGD warm-up outliers against 38 of 51, seeds 30000-30019) raised a loss spike
    at step 11 here at seeds 0, 3 and 4 of these 5; the median of the last 8 raises none."""
    teacher_data = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=teacher_data)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, log_every=50)
    for _ in range(40):
        x = torch.randn(16, 8, generator=teacher_data)
        y = x @ teacher + 0.1 * torch.randn(16, 1, generator=teacher_data)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    events = {r["step"]: [e["kind"] for e in r["events"]] for r in guard.history if r["events"]}
    assert not events, events

"""The data watch (issue 18.5): per-sample losses in, suspect samples out, no host read on the step path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import gradguard as gg
from gradguard.forensics import DataWatch
from gradguard.report.run import render_run_report, suspect_rows


def healthy(step: int, size: int = 32) -> torch.Tensor:
    """Per-sample losses of an ordinary batch: log-normal around 2, 10% spread."""
    g = torch.Generator().manual_seed(step)
    return 2.0 * torch.exp(0.1 * torch.randn(size, generator=g))


def batch_of(step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, ids)``, the ids those of the dataset's rows."""
    return torch.zeros(size, 1), torch.zeros(size), torch.arange(step * size, (step + 1) * size)


def test_a_loss_too_high_and_one_too_low_are_flagged_by_id_after_the_warmup() -> None:
    watch = DataWatch(warmup_steps=10)
    for step in range(30):
        losses = healthy(step)
        if step in (5, 20):  # step 5 is in the warm-up: nothing is flagged
            losses[3], losses[17] = 30.0, 0.01
        watch.observe(losses, batch_of(step), step)
    found = watch.drain()
    assert [(s["id"], s["step"], s["side"]) for s in found] == [(20 * 32 + 3, 20, "high"), (20 * 32 + 17, 20, "low")]
    assert found[0]["loss"] == pytest.approx(30.0) and found[0]["z"] > 5 and found[1]["z"] < -6
    assert watch.suspects == found and watch.drain() == []  # drained once


def test_each_check_owns_one_condition() -> None:
    """A NaN loss is the Guard's (never flagged, nor does it move the medians); a whole batch that is high is
    high against the run but not within its batch (not flagged); a row high within an easy batch but not
    against the run is not flagged either."""
    watch = DataWatch(warmup_steps=5)
    for step in range(10):
        watch.observe(healthy(step), None, step)
    nan_batch = healthy(10)
    nan_batch[0] = math.nan
    watch.observe(nan_batch, None, 10)
    watch.observe(healthy(11) * 20, None, 11)  # every row 20x: a hard batch, nothing out of line within it
    easy = healthy(12) * 0.2
    easy[4] = 2.6  # 13x its batch's median, ordinary for the run
    watch.observe(easy, None, 12)
    assert watch.drain() == []


def test_observe_reads_nothing_to_the_host() -> None:
    watch = DataWatch(warmup_steps=2)
    for step in range(3):
        watch.observe(healthy(step), batch_of(step), step)
    losses = healthy(3)
    losses[0] = 50.0
    with gg.count_host_syncs() as syncs:
        watch.observe(losses, batch_of(3), 3)
    assert syncs.count == 0, syncs.reads
    assert [s["id"] for s in watch.drain()] == [96]


def test_bad_input_is_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match="DataWatch: high_z must be a finite number > 0, got -1"):
        DataWatch(high_z=-1)
    with pytest.raises(ValueError, match="DataWatch: capacity must be an int >= 1, got 0"):
        DataWatch(capacity=0)
    watch = DataWatch()
    with pytest.raises(ValueError, match=r"sample_losses must be a 1-d tensor .* got \[\]"):
        watch.observe(torch.tensor(1.0))
    with pytest.raises(ValueError, match="3 sample_losses for a batch of 4 samples"):
        watch.observe(torch.ones(3), (torch.ones(4, 2), torch.ones(4)))


def test_a_ring_overwritten_before_its_drain_warns() -> None:
    watch = DataWatch(capacity=4, warmup_steps=0)
    for step in range(6):
        watch.observe(healthy(step), None, step)
    with pytest.warns(RuntimeWarning, match="2 call"):
        watch.drain()


def test_guard_reports_suspects_at_the_flush_and_exclude_takes_them(tmp_path) -> None:
    """In a guarded loop: the flagged rows are "data_outlier" events of their step's record (the JSONL file,
    the run report), and gg.forensics.exclude leaves them out."""
    torch.manual_seed(0)
    x = torch.randn(640, 8)
    y = 0.3 * x @ torch.randn(8, 16) + torch.randn(640, 16)  # 16 noisy outputs: a row's loss is a mean
    y[333] = 40.0  # labels far off: its loss is too high
    dataset = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, data_watch=DataWatch(warmup_steps=5), log_every=5,
                     sinks=[gg.sinks.JSONL(tmp_path / "run.jsonl")])
    lone = nn.Linear(2, 1)
    lone(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="sample_losses is for a data watch"):
        gg.Guard(lone, torch.optim.SGD(lone.parameters(), lr=0.1)).step(torch.tensor(1.0), sample_losses=torch.ones(2))
    for step in range(20):
        ids = torch.arange(step * 32, (step + 1) * 32)
        losses = F.mse_loss(model(x[ids]), y[ids], reduction="none").mean(dim=1)
        losses.mean().backward()
        guard.step(losses.mean(), batch=(x[ids], y[ids], ids), sample_losses=losses)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    assert [s["id"] for s in guard.data_watch.suspects] == [333]
    events = [e for r in guard.history for e in r["events"] if e["kind"] == "data_outlier"]
    assert [(e["step"], e["samples"], e["action"]) for e in events] == [(10, [333], "log")]
    records = gg.report.run.read_jsonl(tmp_path / "run.jsonl")
    assert suspect_rows(records)[0]["id"] == "333"
    page = render_run_report(records)
    assert "Data watch" in page and "gg.forensics.exclude(dataset, [333])" in page
    kept = gg.forensics.exclude(dataset, guard.data_watch.suspects)
    assert len(kept) == 639 and 333 not in kept.indices


def test_state_dict_carries_the_run_level_so_a_resumed_watch_needs_no_new_warmup() -> None:
    watch = DataWatch(warmup_steps=10)
    for step in range(15):
        watch.observe(healthy(step), None, step)
    resumed = DataWatch(warmup_steps=10)
    resumed.load_state_dict(watch.state_dict())
    losses = healthy(15)
    losses[7] = 40.0
    resumed.observe(losses, None, 15)
    assert [s["id"] for s in resumed.drain()] == [7]  # a fresh watch would still be warming up
    with pytest.raises(ValueError, match="format None, this DataWatch reads 'gradguard-datawatch/1'"):
        resumed.load_state_dict({"seen": 3})

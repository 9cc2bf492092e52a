"""Restore first, then anything that can fail: a sink (a full disk, a tracker) never stops training nor
replaces TrainingDiverged, and every give-up path puts the last good snapshot back before a sink runs
(issue 17 point 5)."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _loss(model: nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=g)
    loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
    loss.backward()
    return loss


class _FullDisk:
    """A sink whose writes fail as a full disk does; it records whether the weights were finite then."""

    def __init__(self, model: nn.Module | None = None, close_fails: bool = False):
        self.model = model
        self.close_fails = close_fails
        self.weights_finite_at_write: list[bool] = []
        self.closed = False

    def write(self, records) -> None:
        if self.model is not None:
            self.weights_finite_at_write.append(all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True
        if self.close_fails:
            raise OSError(28, "No space left on device")

    def __repr__(self) -> str:
        return "FullDisk()"


class _Kept:
    def __init__(self) -> None:
        self.records: list = []
        self.closed = False

    def write(self, records) -> None:
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("where", ["step", "flush"])
def test_a_failing_sink_while_giving_up_leaves_training_diverged_and_the_snapshot(where):
    """Regression: the disk full while giving up raised OSError out of guard.step with NaN weights left
    (the records were published before the snapshot was put back)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = _FullDisk(model)
    responses = {"nonfinite_grad": "raise"} if where == "step" else {"nonfinite_param": "raise"}
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[sink], responses=responses)
    guard.step(_loss(model, 0))
    optimizer.zero_grad()
    with warnings.catch_warnings(record=True), pytest.raises(gg.TrainingDiverged) as info:
        for i in range(1, 5):
            loss = _loss(model, i)
            if where == "step" and i == 3:
                model[0].weight.grad.fill_(math.nan)
            guard.step(loss)
            optimizer.zero_grad()
            if where == "flush":
                with torch.no_grad():
                    model[0].bias.fill_(math.nan)
    assert info.value.snapshot_step == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert sink.weights_finite_at_write == [True]  # the sink ran after the restore
    assert guard.summary()["dropped_records"] >= 1


def test_a_sink_that_always_fails_is_warned_once_counted_and_training_goes_on():
    """Regression: on a healthy run every flush raised the sink's OSError out of guard.step."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kept = _Kept()
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[_FullDisk(close_fails=True), kept])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(20):
            guard.step(_loss(model, i))
            optimizer.zero_grad()
        guard.close()
    messages = [str(w.message) for w in caught if "sink" in str(w.message)]
    assert len(messages) == 1 and "FullDisk()" in messages[0] and "No space left on device" in messages[0]
    assert guard.step_count == 20 and guard.summary()["dropped_records"] == 20
    assert len(kept.records) == 20 and kept.closed  # the other sink got everything, and was closed


def test_a_callback_that_raises_does_not_stop_training():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def broken(record):
        raise KeyError("tracker gone")

    guard = gg.Guard(model, optimizer, log_every=2, sinks=[gg.sinks.Callback(broken)])
    with pytest.warns(RuntimeWarning, match="Callback"):
        for i in range(6):
            guard.step(_loss(model, i))
            optimizer.zero_grad()
    assert guard.summary()["dropped_records"] == 6


def _ddp_with_failing_log_on_rank0(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: a rank stopped by its sink must fail the other's collective, not hang the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        result = _ddp_steps(rank)
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {error}"}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _ddp_steps(rank: int) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sinks = [_FullDisk()] if rank == 0 else []
    guard = gg.Guard(model, optimizer, log_every=3, sinks=sinks)
    g = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(9):
            x = torch.randn(8, 4, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
    guard.close()
    return {"steps": guard.step_count, "dropped": guard.summary()["dropped_records"]}


def test_rank_0s_logging_failure_never_stops_the_other_ranks(tmp_path):
    """Regression: under DDP, rank 0's sink raised out of guard.step and the job died."""
    if not dist.is_available() or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs torch.distributed with gloo and fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_with_failing_log_on_rank0, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results == [{"steps": 9, "dropped": 9}, {"steps": 9, "dropped": 0}]


def test_jsonl_reopens_a_deleted_or_rotated_file(tmp_path):
    """Regression: a deleted log file lost every later record silently."""
    path = tmp_path / "run.jsonl"
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[gg.sinks.JSONL(path)])
    for i in range(5):
        guard.step(_loss(model, i))
        optimizer.zero_grad()
    os.rename(path, tmp_path / "run.jsonl.1")  # logrotate
    for i in range(5, 10):
        guard.step(_loss(model, i))
        optimizer.zero_grad()
    os.remove(path)  # deleted
    for i in range(10, 15):
        guard.step(_loss(model, i))
        optimizer.zero_grad()
    guard.close()
    assert len((tmp_path / "run.jsonl.1").read_text().splitlines()) == 5
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(10, 15))

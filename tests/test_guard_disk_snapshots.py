"""Snapshots on disk that can be trusted (issue 17 point 6): each file carries its step, the run's
fingerprint and a checksum, is checked after it is written and before it is restored; a corrupted or
foreign file is never restored; a resumed run restores its checkpoint's snapshot, never a later run's; one
snapshot_dir shared by the ranks of a distributed run works."""

from __future__ import annotations

import datetime
import io
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


def _model(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 1))


def _loss(model: nn.Module, i: int) -> torch.Tensor:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
    loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
    loss.backward()
    return loss


def _guard(model: nn.Module, folder, **policy) -> gg.Guard:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    options = {"snapshot_every": 2, "snapshot_clean_steps": 2, "snapshot_dir": str(folder), **policy}
    return gg.Guard(model, optimizer, log_every=2, recovery=gg.RecoveryPolicy(**options))


def _train(guard: gg.Guard, steps: range) -> None:
    for i in steps:
        guard.step(_loss(guard.model, i))
        guard.optimizer.zero_grad()


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].bias.fill_(math.nan)


def _break(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # another run's file (same layout, its own fingerprint)
        head, _, payload = data.partition(b"\n")
        header = json.loads(head)
        header["fingerprint"] = "0123456789abcdef"
        data = json.dumps(header).encode() + b"\n" + payload
    open(path, "wb").write(data)


def _finite(guard: gg.Guard) -> bool:
    tensors = [*guard.model.parameters(), *(v for s in guard.optimizer.state.values() for v in s.values())]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _events(guard: gg.Guard, kind: str) -> list[dict]:
    return [e for r in guard.history for e in r["events"] if e["kind"] == kind]


@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_a_corrupted_or_foreign_file_is_never_restored_the_bytes_it_was_written_from_are(tmp_path, how):
    """Regression: a truncated snapshot file gave a raw error at the rollback, with NaN weights left."""
    model = _model()
    guard = _guard(model, tmp_path)
    _train(guard, range(6))
    snapshot = guard.recovery.snapshot
    assert snapshot.step == 5 and snapshot.previous is not None and snapshot.previous[0] == 3
    kept = snapshot.load()
    _break(snapshot.path, how)
    _poison(model)
    _train(guard, range(6, 7))  # step 6's NaN loss has the weights checked: the NaN is found, a rollback
    guard.flush()  # the records (and the rollback's events) published
    fallback = _events(guard, "snapshot_fallback")
    assert len(fallback) == 1 and fallback[0]["to_step"] == 5 and "gradguard_snapshot.step5.pt" in fallback[0]["reason"]
    assert "held in memory" in fallback[0]["reason"]
    assert [e["to_step"] for e in _events(guard, "rollback")] == [5]
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept["model"][name]), name


def test_with_no_file_left_to_trust_the_run_still_rolls_back_and_gives_up_finite(tmp_path):
    """Regression: with every snapshot file truncated (soak's disk_snapshot family, SGD: 4 of seeds 10000-10005),
    the rollback found nothing to restore and the run ended in TrainingDiverged with NaN weights."""
    model = _model()
    guard = _guard(model, tmp_path)
    _train(guard, range(6))
    snapshot = guard.recovery.snapshot
    kept = snapshot.load()
    for name in os.listdir(tmp_path):
        _break(str(tmp_path / name), "truncated")
    _poison(model)
    _train(guard, range(6, 7))
    guard.flush()
    assert [e["to_step"] for e in _events(guard, "rollback")] == [5] and _finite(guard)
    assert all(torch.equal(v, kept["model"][k]) for k, v in model.state_dict().items())

    # the budget spent: TrainingDiverged, with the snapshot's weights and optimizer state back, finite
    model = _model()
    guard = _guard(model, tmp_path / "spent", max_rollbacks=0)
    _train(guard, range(6))
    for name in os.listdir(tmp_path / "spent"):
        _break(str(tmp_path / "spent" / name), "truncated")
    _poison(model)
    with pytest.raises(gg.TrainingDiverged, match="rollback budget is spent") as info:
        _train(guard, range(6, 7))
    assert info.value.snapshot_step == 5 and _finite(guard)


def test_a_damaged_file_at_resume_gives_way_to_the_older_good_one(tmp_path):
    """A resumed run holds no bytes of its own yet: its checkpoint's file is checked as it loads, and one that
    fails gives way to the older good file; from then on that file's bytes are held."""
    model = _model()
    guard = _guard(model, tmp_path)
    _train(guard, range(6))
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": guard.optimizer.state_dict(), "guard": guard.state_dict()}
    snapshot = guard.recovery.snapshot
    older = torch.load(io.BytesIO(open(snapshot.file(3), "rb").read().partition(b"\n")[2]), weights_only=True)
    _break(snapshot.path, "truncated")

    resumed_model = _model()
    resumed = _guard(resumed_model, tmp_path)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    with pytest.warns(RuntimeWarning, match="the older one, of step 3, is used"):
        resumed.load_state_dict(checkpoint["guard"])
    assert resumed.recovery.snapshot.step == 3
    os.remove(resumed.recovery.snapshot.path)  # and then that file goes too: its bytes are held
    _poison(resumed_model)
    _train(resumed, range(6, 7))
    resumed.flush()
    assert [e["to_step"] for e in _events(resumed, "rollback")] == [3] and _finite(resumed)
    assert all(torch.equal(v, older["model"][k]) for k, v in resumed_model.state_dict().items())


def test_a_resumed_run_restores_its_checkpoints_snapshot_never_a_later_runs(tmp_path):
    """Regression: the file carried no step: a run resumed from an older checkpoint rolled back to "step 4"
    with the later run's weights."""
    model = _model()
    guard = _guard(model, tmp_path)
    _train(guard, range(6))
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": guard.optimizer.state_dict(), "guard": guard.state_dict()}
    _train(guard, range(6, 40))  # the run goes on, and writes its later snapshots into the same folder
    assert guard.recovery.snapshot.step > 30
    later = guard.recovery.snapshot.load()["model"]  # what the later run would roll back to

    resumed_model = _model()
    resumed = _guard(resumed_model, tmp_path)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(checkpoint["guard"])
    assert resumed.recovery.snapshot.step is None  # its file is gone: a new one of the weights as it resumes
    assert any("checkpoint's snapshot is not usable" in str(w.message) for w in caught)
    _train(resumed, range(6, 7))
    resumed.flush()
    _poison(resumed_model)
    _train(resumed, range(7, 8))  # the flush after step 7 finds the NaN and rolls back
    assert resumed.summary()["rollbacks"] == 1
    restored = resumed_model.state_dict()
    assert not any(torch.equal(restored[k], later[k]) for k in later)  # never the later run's
    # its own snapshot's file is gone (the later run kept its two newest): the resume's weights were taken
    assert resumed.recovery.snapshot.step == 6
    assert all(torch.equal(restored[k], checkpoint["model"][k]) for k in restored)


def _ddp_shared_folder(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        guard = gg.Guard(model, optimizer, log_every=2, recovery=gg.RecoveryPolicy(
            snapshot_every=2, snapshot_clean_steps=2, snapshot_dir=os.path.join(out_dir, "snapshots")))
        for i in range(12):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * rank + i))
            loss = model(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
            if i == 8 and rank == 1:
                with torch.no_grad():
                    model.module[0].bias.fill_(math.nan)
        result = {"rollbacks": guard.summary()["rollbacks"], "snapshot": guard.recovery.snapshot.step,
                  "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {error}"}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_sharing_one_snapshot_dir_work(tmp_path):
    """Regression: two DDP ranks given one snapshot_dir crashed at the first snapshot (os.replace: file
    not found)."""
    if not dist.is_available() or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs torch.distributed with gloo and fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_shared_folder, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results[0] == results[1] and results[0]["rollbacks"] == 1 and results[0]["finite"]
    names = sorted(os.listdir(tmp_path / "snapshots"))
    assert any(".rank0." in n for n in names) and any(".rank1." in n for n in names)

"""Two CPU processes on gloo: every rank takes the same decision, and sharded norms are global."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg
from gradguard import dist as gg_dist

WORLD = 2
NAN_STEP = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CollectiveCounter:
    """Counts the torch.distributed collectives called (from Python) while ``active``."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_to_all_single", "barrier")

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        self._real = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self) -> _CollectiveCounter:
        for name, real in self._real.items():
            def counted(*args, _real=real, **kwargs):
                self.count += self.active
                return _real(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._real.items():
            setattr(dist, name, real)


def _ddp_run(rank: int, fused: bool) -> dict:
    """DDP training where rank 1 alone sees a NaN gradient at NAN_STEP (after the gradient all-reduce)."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, optimizer, clip=gg.clip.ZClip(warmup_steps=3), log_every=3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: losses differ across ranks
    skipped, collectives = [], []
    with _CollectiveCounter() as counter:
        for step in range(8):
            x = torch.randn(8, 4, generator=g)
            loss = nn.functional.mse_loss(model(x), x[:, :1])
            loss.backward()
            if rank == 1 and step == NAN_STEP:
                model.module[0].weight.grad[0, 0] = math.nan
            counter.count, counter.active = 0, True
            guard.step(loss)
            counter.active = False
            flushed = guard.step_count % guard.log_every == 0
            collectives.append((counter.count, flushed))
            optimizer.zero_grad()
            skipped.append(guard.last_step_skipped)
    guard.close()
    return {
        "skipped": skipped,
        "params": [p.detach().clone() for p in model.parameters()],
        "norms": [r["total_norm"] for r in guard.history],
        "losses": [r["loss"] for r in guard.history],
        "collectives": collectives,
    }


def _ddp_bit_flip(rank: int, fused: bool) -> dict:
    """DDP where NaN is written into rank 1's copy of ``module.2.weight`` after step 9 (a bit flip on one rank):
    the global loss is NaN at step 10, and both ranks roll back together, the LR kept (only quiet steps moved
    those weights): at step 10 on the plain path (the weights checked at the NaN loss, all-reduced), at the
    flush on the fused one."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, optimizer, log_every=6, recovery=gg.RecoveryPolicy(snapshot_every=6, snapshot_clean_steps=3,
                                                                             snapshot_loss_z=3.0))
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(12):
        x = torch.randn(8, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
        if rank == 1 and step == 9:
            with torch.no_grad():
                model.module[2].weight[0, 3] = math.nan
    guard.close()
    events = [(r["step"], e["kind"], e["layer"]) for r in guard.history for e in r["events"]
              if e["kind"] in ("nonfinite_param", "rollback")]
    return {"events": events, "lr": optimizer.param_groups[0]["lr"], "rollbacks": guard.summary()["rollbacks"],
            "params": [p.detach().clone() for p in model.parameters()]}


def _ddp_level_shift(rank: int, fused: bool) -> dict:
    """DDP where rank 1's labels carry noise of std 3 from step 120 on (a harder data mixture on one rank): the
    global loss rises for good. Both ranks skip, roll back once, then relevel the loss together (the losses they
    judge are the all-reduced ones) and train on; before, 16 rollbacks and TrainingDiverged."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    guard = gg.Guard(model, optimizer)
    g = torch.Generator().manual_seed(100 + rank)
    diverged = False
    try:
        for step in range(200):
            x = torch.randn(32, 4, generator=g)
            noise = 3.0 if rank == 1 and step >= 120 else 0.1  # the global loss's floor x~200 from step 120
            y = torch.sin(x[:, :1]) + x[:, 1:2] + noise * torch.randn(32, 1, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
        guard.close()
    except gg.TrainingDiverged:
        diverged = True
    events = [(r["step"], e["kind"]) for r in guard.history for e in r["events"]
              if e["kind"] in ("rollback", "loss_relevel")]
    return {"events": events, "diverged": diverged, "params": [p.detach().clone() for p in model.parameters()]}


def _ddp_forensics(rank: int, bundle_dir: str) -> dict:
    """DDP with forensics: at NAN_STEP rank 1's batch holds a NaN sample at position 2 (id 102)."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, optimizer, log_every=3,
                     forensics=gg.Forensics(loss_fn=nn.functional.mse_loss, bundle_dir=bundle_dir))
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(6):
        x = torch.randn(8, 4, generator=g)
        if rank == 1 and step == NAN_STEP:
            x[2, 1] = math.nan
        ids = torch.arange(8) + 100 * rank
        loss = nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()
        guard.step(loss, batch=(x, x[:, :1], ids))
        optimizer.zero_grad()
    guard.close()
    return {"forensics": [e["forensics"] for r in guard.history for e in r["events"] if "forensics" in e],
            "bad_samples": guard.bad_samples}


def _sharded_norm(rank: int) -> dict:
    """DTensor gradients sharded on dim 0: the Guard's view of the norms is the norm of the full gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # the same full tensors on both ranks
    full = {"a.weight": torch.randn(6, 3), "a.bias": torch.randn(6), "b.weight": torch.randn(2, 6)}
    named = []
    for name, grad in full.items():
        placement = Replicate() if name == "a.bias" else Shard(0)
        param = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, [placement]))
        param.grad = distribute_tensor(grad, mesh, [placement])
        named.append((name, param))
    holder = nn.Module()
    for name, param in named:
        holder.register_parameter(name.replace(".", "_"), param)
    try:
        gg.Guard(holder, torch.optim.SGD(holder.parameters(), lr=0.1),
                 forensics=gg.Forensics(loss_fn=nn.functional.mse_loss))
        refused = ""
    except ValueError as error:
        refused = str(error)
    local, sharded = gg_dist.local_named_parameters(named)
    stats = gg.grad_stats(local)
    stats, loss = gg_dist.all_reduce_stats(stats, torch.tensor(float(rank)), dist.group.WORLD, sharded)
    with _CollectiveCounter() as counter:  # the inf-norm: a max for the norms, a sum for the rest
        counter.active = True
        inf_stats, inf_loss = gg_dist.all_reduce_stats(
            gg.grad_stats(local, norm_type=math.inf), torch.tensor(float(rank)), dist.group.WORLD, sharded)
    expected_layers = [
        torch.cat([full["a.weight"].flatten(), full["a.bias"]]).norm(),
        full["b.weight"].norm(),
    ]
    return {
        "sharded": sharded,
        "total": float(stats.total_norm),
        "expected_total": float(torch.cat([g.flatten() for g in full.values()]).norm()),
        "layers": stats.norms.tolist(),
        "expected_layers": [float(n) for n in expected_layers],
        "loss": float(loss),
        "forensics_refused": refused,
        "inf_total": float(inf_stats.total_norm),
        "expected_inf_total": float(torch.cat([g.flatten() for g in full.values()]).abs().max()),
        "inf_loss": float(inf_loss),
        "inf_collectives": counter.count,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {"plain": _ddp_run(rank, fused=False), "fused": _ddp_run(rank, fused=True),
                  "forensics": _ddp_forensics(rank, out_dir),
                  "bit_flip": {"plain": _ddp_bit_flip(rank, fused=False), "fused": _ddp_bit_flip(rank, fused=True)},
                  "level_shift": {"plain": _ddp_level_shift(rank, fused=False),
                                  "fused": _ddp_level_shift(rank, fused=True)}}
        result["dtensor"] = _sharded_norm(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs torch.distributed with gloo and fork")
    out_dir = str(tmp_path_factory.mktemp("dist"))
    # fork, as tests/test_stacks_matrix.py: spawned children aborted at exit in about 1 run in 4 under pytest
    # ("terminate called without an active exception" from a gloo thread, at interpreter teardown)
    mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, start_method="fork")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_a_nan_on_one_rank_makes_every_rank_skip_and_params_stay_identical(results, path):
    rank0, rank1 = results[0][path], results[1][path]
    expected = [step == NAN_STEP for step in range(8)]
    assert rank0["skipped"] == expected and rank1["skipped"] == expected
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in rank0["params"])
    # the Guard saw global numbers: the same norm history and the mean loss on both ranks
    assert repr(rank0["norms"]) == repr(rank1["norms"]) and math.isnan(rank0["norms"][NAN_STEP])
    assert rank0["losses"] == rank1["losses"]


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_nan_written_into_one_ranks_weight_rolls_every_rank_back_with_the_lr_kept(results, path):
    rank0, rank1 = results[0]["bit_flip"][path], results[1]["bit_flip"][path]
    assert rank0["rollbacks"] == rank1["rollbacks"] == 1 and rank0["lr"] == rank1["lr"] == pytest.approx(1e-2)
    # both name the step of the first NaN loss; the rank that holds the NaN names the parameter
    assert [e[:2] for e in rank0["events"]] == [e[:2] for e in rank1["events"]] == [(10, "nonfinite_param"),
                                                                                        (10, "rollback")]
    assert rank1["events"][0][2] == "2.weight"  # the name in the model the user wrapped
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_a_loss_that_rises_for_good_on_one_rank_is_relevelled_on_every_rank_together(results, path):
    rank0, rank1 = results[0]["level_shift"][path], results[1]["level_shift"][path]
    assert not rank0["diverged"] and not rank1["diverged"]
    assert rank0["events"] == rank1["events"] and [kind for _, kind in rank0["events"]] == ["rollback", "loss_relevel"]
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_sharded_dtensor_gradients_give_the_norm_of_the_full_gradient(results):
    for rank in results:
        r = rank["dtensor"]
        assert r["sharded"] == [True, False, True]
        assert "forensics does not support FSDP2" in r["forensics_refused"]
        assert r["total"] == pytest.approx(r["expected_total"], rel=1e-5)
        assert r["layers"] == pytest.approx(r["expected_layers"], rel=1e-5)
        assert r["loss"] == pytest.approx(0.5)
        assert r["inf_total"] == r["expected_inf_total"] and r["inf_loss"] == pytest.approx(0.5)
        assert r["inf_collectives"] == 1


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_one_collective_per_guarded_step(results, path):
    # norms, non-finite count and loss travel in one all-reduce; every rank derives the same decision from
    # them (no second all-reduce of the decision). A flush adds one: the check that the weights are finite.
    for rank in results:
        counts = rank[path]["collectives"]
        assert [n for n, flushed in counts if not flushed] == [1] * 6
        assert [n for n, flushed in counts if flushed] == [2, 2]


def test_ddp_forensics_each_rank_names_its_own_samples_and_every_rank_has_them_all(results):
    for rank, result in enumerate(results):
        found = result["forensics"]["forensics"]
        assert found and all(f == found[0] for f in found)  # one analysis of step NAN_STEP, on both events
        record = found[0]
        assert record["reproducible"] is True  # recomputed through DDP: the NaN comes back on every rank
        assert record["samples"] == ([102] if rank == 1 else [])
        assert record["samples_by_rank"] == {0: [], 1: [102]}
        assert record["bundle"].endswith(f"step{NAN_STEP:08d}-rank{rank}.pt")
    assert results[1]["forensics"]["bad_samples"] == [{"id": 102, "step": NAN_STEP, "score": math.inf}]

"""The Ray executor on a real local Ray instance (2 CPUs, one per module): a sweep through it gives the local
numbers, a worker killed during the sweep is retried and every result comes back, and ``gradguard lab
--ray`` runs the lab's grid through it into the same cache."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradguard.cli import app
from gradguard.lab.executors import LocalExecutor, RayExecutor
from gradguard.lab.runner import run_grid, run_one
from gradguard.lab.scenarios import build_grid
from gradguard.lab.sweep import run_sweep

ray = pytest.importorskip("ray")

FACTORY = """
import os, time
import torch
from torch import nn

def build(lr, seed=0):
    trigger = os.path.join(os.path.dirname(__file__), "kill-at-0.1")  # only the Ray tests' copy has it
    if lr == 0.1 and os.path.exists(trigger) and not os.path.exists(trigger + ".pid"):
        with open(trigger + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(trigger + ".tmp", trigger + ".pid")
        time.sleep(120)  # the test kills this worker now
    if lr == 1.0 and os.path.exists(os.path.join(os.path.dirname(__file__), "die-at-1")):
        os._exit(1)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs.sum(dim=1, keepdim=True)
    data = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    return model, optimizer, data, nn.functional.mse_loss
"""

OPTIONS = dict(lr_min=1e-3, lr_max=1.0, points=4, remedies=["none", "global_norm"], seeds=1, steps=12,
               progress=False)


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield RayExecutor(max_retries=2)
    finally:
        ray.shutdown()


def write_factory(folder: Path, *triggers: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "factory.py").write_text(FACTORY)
    for trigger in triggers:
        (folder / trigger).write_text("")
    return f"{folder / 'factory.py'}:build"


def numbers(records: list[dict]) -> dict[str, tuple]:
    return {f"{r['config']['variant']} seed {r['config']['seed']}": (r["val_loss"], r["initial_loss"],
            r["curves"]["loss"]["value"]) for r in records}


@pytest.fixture(scope="module")
def local_numbers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The sweep run in this process, without any trigger: the numbers every Ray sweep must give."""
    folder = tmp_path_factory.mktemp("local")
    records = run_sweep(write_factory(folder), out=folder / "out", executor=LocalExecutor(1), **OPTIONS).records
    assert all("error" not in r for r in records)
    return numbers(records)


def test_a_sweep_through_ray_gives_the_local_numbers_into_the_same_cache(
    executor: RayExecutor, local_numbers: dict, tmp_path: Path
) -> None:
    factory = write_factory(tmp_path)
    through_ray = run_sweep(factory, out=tmp_path / "out", executor=executor, **OPTIONS)
    assert through_ray.executed == 8 and all("error" not in r for r in through_ray.records)
    assert numbers(through_ray.records) == local_numbers
    assert run_sweep(factory, out=tmp_path / "out", executor=LocalExecutor(1), **OPTIONS).executed == 0
    assert "Ray tasks on a local Ray instance (2 CPUs" in executor.describe()


def test_a_worker_killed_during_the_sweep_is_retried_and_every_result_comes_back(
    executor: RayExecutor, local_numbers: dict, tmp_path: Path
) -> None:
    factory = write_factory(tmp_path, "kill-at-0.1")
    pid_file = tmp_path / "kill-at-0.1.pid"
    killed: list[int] = []

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    result = run_sweep(factory, out=tmp_path / "out", executor=executor, **OPTIONS)
    killer.join(timeout=5)
    assert killed and killed[0] != os.getpid(), "no worker was killed"
    assert all("error" not in r for r in result.records), [r.get("error") for r in result.records]
    assert numbers(result.records) == local_numbers


def test_out_of_retries_the_run_becomes_an_error_record_and_is_not_cached(
    executor: RayExecutor, tmp_path: Path
) -> None:
    factory = write_factory(tmp_path, "die-at-1")
    options = {**OPTIONS, "remedies": ["none"]}
    result = run_sweep(factory, out=tmp_path / "out", executor=RayExecutor(max_retries=0), **options)
    errors = {r["config"]["lr"]: r.get("error") for r in result.records}
    assert [lr for lr, error in errors.items() if error] == [1.0]
    assert errors[1.0].startswith("run lost: ")
    (tmp_path / "die-at-1").unlink()
    assert run_sweep(factory, out=tmp_path / "out", executor=executor, **options).executed == 1


def test_the_lab_grid_runs_through_ray(executor: RayExecutor, tmp_path: Path) -> None:
    configs = build_grid(["learning_rate"], quick=True, seeds=1, steps=4)
    through_ray = run_grid(configs, tmp_path, executor=executor)
    assert through_ray.executed == len(configs) == 8 and all("error" not in r for r in through_ray.records)
    assert run_grid(configs, tmp_path, workers=1).executed == 0, "the local executor reads the cache Ray filled"
    assert [r["curves"] for r in through_ray.records[:2]] == [run_one(c)["curves"] for c in configs[:2]]


def test_lab_ray_hands_the_lab_a_ray_executor(executor: RayExecutor, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gradguard.lab.run

    seen = []

    def run_lab(*args, executor=None, **kwargs):
        seen.append(executor)
        raise SystemExit(0)

    monkeypatch.setattr(gradguard.lab.run, "run_lab", run_lab)
    CliRunner().invoke(app, ["lab", "faults", "--ray", "--out", str(tmp_path)])
    assert isinstance(seen[0], RayExecutor)

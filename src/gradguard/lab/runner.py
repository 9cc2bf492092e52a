"""Run a grid of configs through an executor, with a resumable on-disk cache.

* Cached: a finished run is stored as ``OUT/cache/<scenario>-<key>.json``, ``key`` a hash of its config
  (and of :data:`LAB_VERSION`). A second run of the same grid executes nothing; changing one config
  reruns only that one. A run that raised is not cached (its record holds the error), so it runs again.
* Executed elsewhere: :func:`run_grid` hands the configs missing from the cache to an executor
  (``gradguard.lab.executors``: local processes by default, Ray tasks with ``--ray``) and stores what
  comes back, so every backend resumes and fills the same cache.
* Deterministic: each run seeds torch, numpy and ``random`` from its config's seed and uses one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradguard.lab.executors import Executor, LocalExecutor, Task
from gradguard.lab.scenarios import Record, RunConfig, execute

#: bump when a change to the lab's code changes results, so that old cached runs are not reused
LAB_VERSION = 6  # 2: the Guard's defaults (issue 10); 3: its recovery defaults (rollback budget per snapshot); 4: the loss level after a rollback; 5: the doctor's start at the one layer off its peers' scale (issue 18); 6: ZClip() without a fixed cap (issue 17.10)

ProgressCallback = Callable[[RunConfig, Record], None]


def config_key(config: RunConfig) -> str:
    """A short stable hash of a config (JSON with sorted keys) and the lab version."""
    payload = json.dumps({"lab_version": LAB_VERSION, "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(out_dir: Path, config: RunConfig) -> Path:
    return out_dir / "cache" / f"{config['scenario']}-{config_key(config)}.json"


def load_cached(out_dir: Path, config: RunConfig) -> Record | None:
    path = cache_path(out_dir, config)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:  # a run killed while writing: run it again
        return None
    return record if record.get("config") == config else None


def store(out_dir: Path, record: Record) -> None:
    path = cache_path(out_dir, record["config"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, allow_nan=False))
    os.replace(temporary, path)  # atomic: a killed run never leaves half a file


def run_one(config: RunConfig, task: Task = execute) -> Record:
    """Execute one config (``task(config)``, a lab scenario's run by default); never raises: an error
    becomes the record's ``error``."""
    start = time.perf_counter()
    try:
        record = task(config)
    except Exception as error:  # one failing run must not lose the grid
        record = {
            "config": config,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=5),
        }
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    return record


@dataclass
class GridResult:
    records: list[Record]  # one per config, in the configs' order
    executed: int  # how many runs this call actually executed (the others came from the cache)
    seconds: float


def run_grid(
    configs: list[RunConfig],
    out_dir: Path,
    workers: int = 2,
    on_record: ProgressCallback | None = None,
    executor: Executor | None = None,
    task: Task = execute,
) -> GridResult:
    """Run every config not already in ``out_dir``'s cache; return all records in config order.

    The missing runs go to ``executor`` (default: ``LocalExecutor(workers)``), each as ``task(config)``
    (default: the lab scenario's run). ``on_record(config, record)`` is called once per config as its
    record becomes available (cached ones first), e.g. to advance a progress bar; each finished run is
    stored as soon as it comes back, so an interrupted grid resumes where it stopped.
    """
    executor = executor if executor is not None else LocalExecutor(workers)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    keys = [config_key(config) for config in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_grid: two configs in the grid are identical")
    records: dict[str, Record] = {}
    pending: list[RunConfig] = []
    for key, config in zip(keys, configs):
        cached = load_cached(out_dir, config)
        if cached is None:
            pending.append(config)
        else:
            records[key] = cached
            if on_record:
                on_record(config, cached)

    for index, record in executor.map(task, pending):
        config = pending[index]
        if "error" not in record:
            store(out_dir, record)
        records[config_key(config)] = record
        if on_record:
            on_record(config, record)
    return GridResult([records[key] for key in keys], len(pending), time.perf_counter() - start)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def describe_config(config: RunConfig) -> str:
    return f"{config['scenario']}: {config['variant']} (seed {config['seed']})"


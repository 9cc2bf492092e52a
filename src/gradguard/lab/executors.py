"""Where the runs of a grid execute: one :class:`Executor` interface, two backends.

An executor takes a *task* (a module-level function ``config -> record``, e.g. a lab scenario's
``execute`` or the sweep's ``train_one``) and a list of configs, and yields ``(index, record)`` as each run
finishes, in whatever order they finish. It knows nothing of the cache: ``runner.run_grid`` looks each
config up in the cache, hands the executor only the missing ones and stores what comes back, so every
backend resumes an interrupted grid the same way and fills the same cache.

Every backend keeps :func:`gradguard.lab.runner.run_one`'s contract: a run never raises, its error becomes
its record (``record["error"]``), and a run that could not execute at all (a worker process that died,
a Ray task out of retries) becomes such a record too. Every run executes on one torch thread, seeded from
its config, so the backends give the same numbers for the same configs.

* :class:`LocalExecutor`: processes on this machine (``concurrent.futures`` with ``spawn``); the default.
* :class:`RayExecutor`: one Ray task per run, on a running Ray cluster or a local Ray instance, with
  per-run resources and retries when a worker dies. The only module that imports ``ray``, lazily, in its
  constructor: ``pip install 'gradguard[ray]'``.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, Protocol

import torch

from gradguard.lab.scenarios import Record, RunConfig

Task = Callable[[RunConfig], Record]


class Executor(Protocol):
    """Runs a task on many configs; see :class:`LocalExecutor` and :class:`RayExecutor`."""

    def map(self, task: Task, configs: Sequence[RunConfig]) -> Iterator[tuple[int, Record]]:
        """Run ``task`` on every config through ``run_one``; yield ``(index in configs, record)`` as each
        finishes. Never raises for a run: a run that failed or was lost yields a record with ``"error"``."""
        ...

    def describe(self) -> str:
        """One line for the terminal: where the runs execute."""
        ...


def run_in_worker(task: Task, config: RunConfig) -> Record:
    """``run_one(config, task)`` on one torch thread (what every backend runs per config)."""
    from gradguard.lab.runner import run_one

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_one(config, task)
    finally:
        torch.set_num_threads(threads)


def lost_record(config: RunConfig, error: BaseException) -> Record:
    """The record of a run that did not come back (its worker died, its retries were spent)."""
    return {
        "config": config,
        "error": f"run lost: {type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception_only(type(error), error)),
    }


class LocalExecutor:
    """Runs on this machine: ``workers`` processes (``spawn``, one torch thread each), or in this process
    when ``workers`` is 1 or there is one run. A worker process that dies (killed, out of memory) breaks
    the pool: its run and the runs still queued become error records, and the next call runs them again.
    The other backend, for a cluster: :class:`RayExecutor`."""

    def __init__(self, workers: int = 2):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"LocalExecutor: workers must be an int >= 1, got {workers!r}")
        self.workers = workers

    def describe(self) -> str:
        return f"{self.workers} local process{'es' if self.workers > 1 else ''}"

    def map(self, task: Task, configs: Sequence[RunConfig]) -> Iterator[tuple[int, Record]]:
        if self.workers == 1 or len(configs) <= 1:
            for index, config in enumerate(configs):
                yield index, run_in_worker(task, config)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(configs)), mp_context=context) as pool:
            futures: dict[Future[Record], int] = {
                pool.submit(run_in_worker, task, config): index for index, config in enumerate(configs)
            }
            for future in as_completed(futures):
                index = futures[future]
                try:
                    record = future.result()
                except Exception as error:  # BrokenProcessPool: the worker died; the record says so
                    record = lost_record(configs[index], error)
                yield index, record


class RayExecutor:
    """Runs each config as a Ray task (``ray.remote``), on the cluster at ``address`` (``"auto"``: the one
    ``ray start`` started on this machine; ``"ray://host:10001"``: a remote one) or, with ``address`` None,
    on a Ray instance started here with ``num_cpus`` CPUs (None: all of them). The local backend:
    :class:`LocalExecutor`.

    Args:
        address: the cluster to connect to; None starts a local instance (unless Ray is already initialised
            in this process, whose instance is then used).
        cpus_per_run, gpus_per_run: the resources each run reserves (``gpus_per_run=0.25``: four runs share
            a GPU). A run uses one torch thread whatever ``cpus_per_run`` says.
        max_retries: how many times Ray reruns a task whose worker process died (killed, node lost); a
            task that raises is not retried (``run_one`` turns errors into records, so tasks do not raise).
        num_cpus: CPUs of the local instance started when ``address`` is None.
        runtime_env: Ray's runtime environment for this executor's tasks (e.g. ``{"working_dir": "."}`` so that
            a remote cluster sees the factory's file, ``{"env_vars": {...}}``); None: the workers share this
            machine's files and the environment the cluster was started with.

    The workers import gradguard and the task's module: on a remote cluster, install gradguard there.
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: float = 1.0,
        gpus_per_run: float = 0.0,
        max_retries: int = 3,
        num_cpus: int | None = None,
        runtime_env: dict[str, Any] | None = None,
    ):
        if cpus_per_run <= 0:
            raise ValueError(f"RayExecutor: cpus_per_run must be > 0, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise ValueError(f"RayExecutor: gpus_per_run must be >= 0, got {gpus_per_run}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"RayExecutor: max_retries must be an int >= 0, got {max_retries!r}")
        try:
            import ray
        except ImportError as error:
            raise ImportError("RayExecutor needs Ray: pip install 'gradguard[ray]'") from error
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self._remote = ray.remote(run_in_worker).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries, retry_exceptions=False,
            **({"runtime_env": runtime_env} if runtime_env else {}),
        )

    def describe(self) -> str:
        cpus = self._ray.cluster_resources().get("CPU", 0)
        where = self.address or "a local Ray instance"
        return f"Ray tasks on {where} ({cpus:g} CPUs; {self.cpus_per_run:g} CPU, {self.gpus_per_run:g} GPU per run)"

    def map(self, task: Task, configs: Sequence[RunConfig]) -> Iterator[tuple[int, Record]]:
        ray = self._ray
        pending = {self._remote.remote(task, config): index for index, config in enumerate(configs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as error:  # retries spent (WorkerCrashedError, node lost): a record
                        record = lost_record(configs[index], error)
                    yield index, record
        finally:
            for ref in pending:  # interrupted (Ctrl-C, the caller stopped iterating): cancel the rest
                ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        """Disconnect from the cluster (stops a local instance this executor started)."""
        self._ray.shutdown()

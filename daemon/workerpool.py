"""The service's workers: one per executor slot, each a thread with its own warm generator, all on one queue.

Split from `service.py`, which composes it: the pool loads every slot's generator in parallel (a failure closes the
others and propagates: the daemon cannot start), starts the worker threads, answers what supervision and status
ask (alive, idle, running jobs, per-worker views for metrics), and stops them in order: grace period, interrupt
between denoising steps, join, then close the generation processes (killed at once on a forced stop) and any
ffmpeg still running.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from daemon import __version__
from daemon.config import DaemonConfig
from daemon.encode import kill_running
from daemon.executor import WorkerSlot, close_generator, plan_generators, plan_local_slots
from daemon.generate.base import Generator
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker

log = structlog.get_logger(__name__)
JOIN_SECONDS = 0.5


def model_alive(generator: Generator) -> bool:
    """A generator's model is usable: in-process ones always are; a process generator while its child runs."""
    alive = getattr(generator, "model_alive", None)
    return True if alive is None else bool(alive())


@dataclass(frozen=True)
class WorkerView:
    """One worker as the per-worker metrics and `i2vd status` see it."""

    name: str
    device: str
    worker: Worker
    thread: threading.Thread
    generator: Generator

    def up(self) -> bool:
        """The worker thread and its generator run (a generation process that died counts as down)."""
        return self.thread.is_alive() and model_alive(self.generator)

    def busy(self) -> bool:
        return self.worker.busy.is_set()

    def restarts(self) -> int:
        return int(getattr(self.generator, "restarts", 0))

    def describe(self) -> dict[str, object]:
        step, total = self.worker.progress or (0, 0)
        return {
            "name": self.name,
            "device": self.device,
            "up": self.up(),
            "running_job": self.worker.current_job,
            "step": step,
            "steps": total,
            "restarts": self.restarts(),
            "pid": getattr(self.generator, "pid", None),
        }


class WorkerPool:
    """`load()`, then `start()`; `stop()` once. `generator_factory` (tests) replaces the executor's generators."""

    def __init__(
        self,
        config: DaemonConfig,
        store: JobStore,
        queue: JobQueue[ClaimedJob],
        metrics: DaemonMetrics,
        *,
        interrupt: threading.Event,
        force: threading.Event,
        on_status: Callable[[str], object],
        generator_factory: Callable[[DaemonConfig], Generator] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._interrupt = interrupt
        self._force = force
        self._on_status = on_status
        self._generator_factory = generator_factory
        self.slots: list[WorkerSlot] = []
        self.generators: list[Generator] = []
        self.workers: list[Worker] = []
        self.threads: list[threading.Thread] = []

    @property
    def generator(self) -> Generator | None:
        """The first worker's generator: model identity for build_info, status and manifests."""
        return self.generators[0] if self.generators else None

    def load(self) -> None:
        """Build every slot's generator in parallel (each loads its own copy of the model); any failure is fatal."""
        plan: list[tuple[WorkerSlot, Callable[[], Generator]]]
        if self._generator_factory is not None:
            factory = self._generator_factory
            plan = [(slot, functools.partial(factory, self._config)) for slot in plan_local_slots(self._config)]
        else:
            plan = plan_generators(self._config)
        with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="i2vd-load") as pool:
            futures = [pool.submit(build) for _, build in plan]
            errors = [future.exception() for future in futures]
        loaded = [future.result() for future, error in zip(futures, errors, strict=True) if error is None]
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:
            for generator in loaded:
                close_generator(generator, force=True)
            raise failure
        self.slots = [slot for slot, _ in plan]
        self.generators = loaded
        self._export_model_metrics()

    def _export_model_metrics(self) -> None:
        info = self.generators[0].info
        load_seconds = max(generator.info.load_seconds for generator in self.generators)
        self._metrics.model_load_seconds.set(load_seconds)
        self._metrics.model_loaded.set(1)
        for slot, generator in zip(self.slots, self.generators, strict=True):
            self._metrics.watch_device_memory(slot.device, generator.memory_stats)
        self._metrics.build_info.info(
            {
                "version": __version__,
                "model": info.model_id,
                "revision": info.revision or "",
                "device": info.device,
                "dtype": info.dtype,
                "workers": str(len(self.generators)),
                **{k.replace("-", "_"): v for k, v in info.library_versions.items()},
            }
        )
        log.info(
            "model_loaded",
            model=info.model_id,
            devices=[slot.device for slot in self.slots],
            dtype=info.dtype,
            seconds=round(load_seconds, 3),
        )

    def start(self) -> None:
        for slot, generator in zip(self.slots, self.generators, strict=True):
            worker = Worker(
                self._config,
                generator,
                self._store,
                self._queue,
                self._metrics,
                interrupt=self._interrupt,
                on_status=self._on_status,
                name=slot.name,
            )
            thread = threading.Thread(target=worker.run, name=f"i2vd-worker-{slot.name}", daemon=True)
            self.workers.append(worker)
            self.threads.append(thread)
        self._metrics.watch_workers(self.views)
        for thread in self.threads:
            thread.start()

    def views(self) -> list[WorkerView]:
        return [
            WorkerView(slot.name, slot.device, worker, thread, generator)
            for slot, worker, thread, generator in zip(
                self.slots, self.workers, self.threads, self.generators, strict=True
            )
        ]

    def stop(self, timeout: float) -> bool:
        """Grace, interrupt, join; then close the generation processes and any ffmpeg still running. False if a
        worker thread did not stop in time."""
        deadline = time.monotonic() + timeout
        self._grace_for_running_jobs()
        stopped = True
        self._interrupt.set()
        for thread in self.threads:
            while thread.is_alive() and time.monotonic() < deadline and not self._force.is_set():
                thread.join(timeout=JOIN_SECONDS)
        if self._force.is_set():
            log.warning("stop_forced")
        for generator in self.generators:
            close_generator(generator, force=self._force.is_set())
        killed = kill_running()  # ffmpeg of finishing still running past the stop timeout: never outlives us
        if killed:
            log.warning("ffmpeg_killed_at_stop", processes=killed)
        for thread in self.threads:
            thread.join(timeout=JOIN_SECONDS if self._force.is_set() else 5.0)
            if thread.is_alive():
                log.error("worker_did_not_stop", worker=thread.name, timeout=timeout)
                stopped = False
        return stopped

    def _grace_for_running_jobs(self) -> None:
        """`worker.stop_grace_seconds`: let running jobs finish before interrupting them (a second signal ends it)."""
        grace = self._config.worker.stop_grace_seconds
        if grace <= 0 or not any(worker.current_job is not None for worker in self.workers):
            return
        log.info("stop_grace", seconds=grace)
        self._on_status(f"stopping: letting running jobs finish (up to {grace:.0f} s)")
        deadline = time.monotonic() + grace
        while any(worker.current_job is not None for worker in self.workers):
            if time.monotonic() >= deadline or self._force.wait(JOIN_SECONDS):
                return

    def all_alive(self) -> bool:
        return bool(self.threads) and all(thread.is_alive() for thread in self.threads)

    def fatal_error(self) -> Exception | None:
        """A worker's `FatalError`, if one hit any (the daemon cannot go on)."""
        return next((worker.fatal for worker in self.workers if worker.fatal is not None), None)

    def models_alive(self) -> bool:
        """Every worker's model is loaded and its generation process (if any) runs."""
        return bool(self.generators) and all(model_alive(generator) for generator in self.generators)

    def revive_dead_generators(self) -> None:
        """Replace generation processes that died while idle (`ProcessGenerator.revive_if_dead`)."""
        for generator in self.generators:
            revive = getattr(generator, "revive_if_dead", None)
            if revive is not None:
                revive()

    def idle(self) -> bool:
        return bool(self.workers) and not any(worker.busy.is_set() for worker in self.workers)

    def running_jobs(self) -> list[str]:
        return [worker.current_job for worker in self.workers if worker.current_job is not None]

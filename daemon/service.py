"""The composition root: builds every stage, starts and supervises the threads, and stops them in order.

Threads: the main thread supervises (signals, systemd watchdog, restarting a dead watcher or metrics server); an
intake thread polls the inbox (woken early by watcher hints, else every `rescan_seconds`: events are hints, the
rescan is the truth); one worker thread per executor slot (`daemon/executor.py`: a GPU of this host, or a Ray actor)
runs jobs on its warm generator, all taking from the one priority queue. By default each generator lives in a
supervised child process (`daemon/genproc.py`), so a crash in the model costs one attempt of one job, not the daemon.

Start order: directories -> metrics server (so /healthz can say "model loading") -> store recovery (claimed jobs
from a previous run are queued first) -> pause flag -> model load on every slot in parallel (with
EXTEND_TIMEOUT_USEC) -> workers -> watcher -> intake -> READY=1. The systemd watchdog is pinged from the main loop,
and only while `alive()`: the worker and intake threads run and the intake loop completed a poll recently; a hung
main loop stops the pings by itself.
Stop order: intake and watcher (no new claims) -> queue closed -> running jobs get `worker.stop_grace_seconds` to
finish generating -> then they are interrupted between denoising steps (each stays claimed on disk and is resumed by
the next start) -> workers joined -> generation processes closed -> metrics server. A second stop signal (`force`)
stops waiting and kills the generation processes at once; their jobs stay claimed and are resumed the same way.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from daemon import __version__
from daemon.config import DaemonConfig
from daemon.controller import Controller
from daemon.encode import kill_running
from daemon.errors import FatalError, JobRejected
from daemon.executor import WorkerSlot, close_generator, plan_generators, plan_local_slots
from daemon.generate.base import Generator
from daemon.intake import Intake, IntakeResult, validate_claimed
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics, MetricsServer, WorkerState
from daemon.mounts import check_mounts
from daemon.publish import Publisher
from daemon.store import ClaimedJob, JobStore
from daemon.systemd import SystemdNotifier, watchdog_interval_seconds
from daemon.watch import InboxWatcher
from daemon.worker import Worker

log = structlog.get_logger(__name__)
SUPERVISE_SECONDS = 0.5
MODEL_LOAD_EXTEND_SECONDS = 1800.0
"""Start timeout extension asked of systemd before the model loads (real weights from a slow disk take minutes)."""
INTAKE_STALL_SECONDS = 60.0
"""An intake loop without a finished poll for this long (plus one rescan period) counts as hung for the watchdog."""


class Service:
    """`start()`, then `run_until_stopped()` from the main thread; `request_stop()` from anywhere."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        once: bool = False,
        notifier: SystemdNotifier | None = None,
        generator_factory: Callable[[DaemonConfig], Generator] | None = None,
        stop_requested: threading.Event | None = None,
        force: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.once = once
        self.notifier = notifier or SystemdNotifier()
        self.metrics = DaemonMetrics()
        self.queue: JobQueue[ClaimedJob] = JobQueue()
        self.store = JobStore(config.inbox, config.state_path, max_attempts=config.worker.max_attempts)
        self.stop_requested = stop_requested or threading.Event()
        self.force = force or threading.Event()
        self.interrupt = threading.Event()
        self._stop_intake = threading.Event()
        self._hint = threading.Event()
        self._generator_factory = generator_factory
        """None: the configured executor builds the generators; else this (tests) builds one per local slot."""
        self._generator: Generator | None = None
        """The first worker's generator: model identity for build_info, status and manifests."""
        self._slots: list[WorkerSlot] = []
        self._generators: list[Generator] = []
        self._workers: list[Worker] = []
        self._worker_threads: list[threading.Thread] = []
        self._intake_thread: threading.Thread | None = None
        self._watcher: InboxWatcher | None = None
        self._metrics_server: MetricsServer | None = None
        self._last_intake: IntakeResult | None = None
        self._started_at = datetime.now().astimezone()
        self._intake_beat = time.monotonic()
        self.controller = Controller(config.state_path, self.queue, self.store, self.metrics, lambda: self._workers)
        self.exit_code = 0

    # ----- start -----------------------------------------------------------------------------------------
    def start(self) -> None:
        check_mounts(self.config.require_mounts)  # before anything is created in a mount point (checklist D33)
        for directory in (self.config.inbox, self.config.outbox, self.config.state_path):
            directory.mkdir(parents=True, exist_ok=True)
        self._start_metrics_server()
        self._recover_claimed_jobs()
        self.controller.apply_pause()
        self._load_model()
        self._start_workers()
        if not self.once:
            self._start_watcher()
        self._intake_thread = threading.Thread(target=self._intake_loop, name="i2vd-intake", daemon=True)
        self._intake_thread.start()
        self._write_status("ready")
        self.notifier.ready(self._with_queue("ready"))
        log.info("service_ready", inbox=str(self.config.inbox), outbox=str(self.config.outbox), once=self.once)

    def _start_metrics_server(self) -> None:
        settings = self.config.metrics
        if not settings.enabled:
            return
        try:
            self._metrics_server = MetricsServer(self.metrics, self.health, settings.host, settings.port)
        except OSError as exc:
            raise FatalError(f"cannot serve metrics on {settings.host}:{settings.port}: {exc.strerror}") from exc
        self.metrics.watch_health(self.health)
        self._metrics_server.start()
        log.info("metrics_serving", host=settings.host, port=self._metrics_server.port)

    def _recover_claimed_jobs(self) -> None:
        swept = Publisher(self.config.outbox).sweep_staging()
        if swept:
            log.info("staging_swept", entries=swept)
        recovered = self.store.recover()
        for outcome in ("poison",):
            count = self.store.recovery_report.get(outcome, 0)
            if count:
                self.metrics.received.inc(count)
                self.metrics.jobs.labels(outcome=outcome).inc(count)
        for claimed in recovered:
            self.metrics.received.inc()
            job = claimed if claimed.resolved is not None else self._revalidate(claimed)
            if job is not None:
                self._enqueue(job)
                log.info("job_recovered", job_id=job.job_id, attempts=job.attempts)

    def _revalidate(self, job: ClaimedJob) -> ClaimedJob | None:
        """A job claimed but not yet validated when the last run stopped: validate it now, like intake would."""
        try:
            resolved, image_sha256 = validate_claimed(job, self.config)
        except JobRejected as exc:
            self.store.fail(job, exc, exc.reason, exc.message, exc.detail)
            self.metrics.jobs.labels(outcome="rejected").inc()
            return None
        return self.store.mark_validated(job, resolved, image_sha256)

    def _load_model(self) -> None:
        """Build every slot's generator in parallel (each loads its own copy of the model); any failure is fatal."""
        self.notifier.extend_timeout(MODEL_LOAD_EXTEND_SECONDS, "loading model")
        plan: list[tuple[WorkerSlot, Callable[[], Generator]]]
        if self._generator_factory is not None:
            factory = self._generator_factory
            plan = [(slot, functools.partial(factory, self.config)) for slot in plan_local_slots(self.config)]
        else:
            plan = plan_generators(self.config)
        with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="i2vd-load") as pool:
            futures = [pool.submit(build) for _, build in plan]
            errors = [future.exception() for future in futures]
        loaded = [future.result() for future, error in zip(futures, errors, strict=True) if error is None]
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:
            for generator in loaded:
                close_generator(generator, force=True)
            raise failure
        self._slots = [slot for slot, _ in plan]
        self._generators = loaded
        self._generator = loaded[0]
        self._export_model_metrics()

    def _export_model_metrics(self) -> None:
        info = self._generators[0].info
        load_seconds = max(generator.info.load_seconds for generator in self._generators)
        self.metrics.model_load_seconds.set(load_seconds)
        self.metrics.model_loaded.set(1)
        for slot, generator in zip(self._slots, self._generators, strict=True):
            self.metrics.watch_device_memory(slot.device, generator.memory_stats)
        self.metrics.build_info.info(
            {
                "version": __version__,
                "model": info.model_id,
                "revision": info.revision or "",
                "device": info.device,
                "dtype": info.dtype,
                "workers": str(len(self._generators)),
                **{k.replace("-", "_"): v for k, v in info.library_versions.items()},
            }
        )
        log.info(
            "model_loaded",
            model=info.model_id,
            devices=[slot.device for slot in self._slots],
            dtype=info.dtype,
            seconds=round(load_seconds, 3),
        )

    def _start_workers(self) -> None:
        for slot, generator in zip(self._slots, self._generators, strict=True):
            worker = Worker(
                self.config,
                generator,
                self.store,
                self.queue,
                self.metrics,
                interrupt=self.interrupt,
                on_status=lambda status: self.notifier.status(self._with_queue(status)),
                name=slot.name,
            )
            thread = threading.Thread(target=worker.run, name=f"i2vd-worker-{slot.name}", daemon=True)
            self._workers.append(worker)
            self._worker_threads.append(thread)
        self.metrics.watch_workers(self._worker_views)
        for thread in self._worker_threads:
            thread.start()

    def _worker_views(self) -> Sequence[WorkerState]:
        return [
            _WorkerView(slot.name, slot.device, worker, thread, generator)
            for slot, worker, thread, generator in zip(
                self._slots, self._workers, self._worker_threads, self._generators, strict=True
            )
        ]

    def _start_watcher(self) -> None:
        watcher = InboxWatcher(self.config.inbox, self.config.intake.observer, on_hint=self._hint.set)
        watcher.start()
        self._watcher = watcher
        self.metrics.watcher_up.set(1)
        self.metrics.set_watcher_mode(watcher.mode_in_use)
        log.info("watcher_started", mode=watcher.mode_in_use)

    # ----- intake ----------------------------------------------------------------------------------------
    def _enqueue(self, job: ClaimedJob) -> None:
        priority = job.resolved.priority if job.resolved is not None else 0
        self.queue.put(job, priority=priority, sequence=job.sequence)
        self.metrics.pending.inc()
        self.metrics.queue_depth.set(len(self.queue))

    def _intake_loop(self) -> None:
        intake = Intake(self.config, self.store)
        while not self._stop_intake.is_set():
            try:
                result = intake.poll(room=max(0, self.config.intake.max_queued - len(self.queue)))
            except Exception:
                log.exception("intake_poll_failed")
                result = IntakeResult(waiting=1, settling=1)
            if not result.inbox_available:
                self.metrics.watcher_up.set(0)
                self.notifier.status(self._with_queue("inbox unavailable (missing, replaced or unmounted)"))
            for job in result.accepted:
                self.metrics.received.inc()
                self._enqueue(job)
            for _stem, _error, _failed_dir in result.rejected:
                self.metrics.received.inc()
                self.metrics.jobs.labels(outcome="rejected").inc()
            for _stem in result.duplicates:
                self.metrics.received.inc()
                self.metrics.jobs.labels(outcome="duplicate").inc()
            self._last_intake = result
            self._intake_beat = time.monotonic()
            self.metrics.oldest_pending_age.set(self.queue.oldest_age())
            self._wait_for_next_poll(result)

    def _wait_for_next_poll(self, result: IntakeResult) -> None:
        settings = self.config.intake
        delay = settings.rescan_seconds
        if result.settling:
            # A pair is settling: look again soon so the stability window, not the rescan period, sets latency.
            delay = min(delay, max(0.05, settings.stable_seconds / 2))
        self._hint.wait(timeout=delay)
        self._hint.clear()

    # ----- supervision -----------------------------------------------------------------------------------
    def health(self) -> Mapping[str, bool]:
        """What /healthz reports: each part must be up for a 200."""
        return {
            "watcher": self.once or (self._watcher is not None and self._watcher.is_alive()),
            "intake": self._intake_thread is not None and self._intake_thread.is_alive(),
            "worker": bool(self._worker_threads) and all(thread.is_alive() for thread in self._worker_threads),
            "model": self._generator is not None,
        }

    def run_until_stopped(self) -> int:
        """Supervise until a stop is requested (or, with `--once`, until the inbox is drained); return the exit code."""
        watchdog = watchdog_interval_seconds()
        next_ping = 0.0
        while not self.stop_requested.wait(timeout=SUPERVISE_SECONDS):
            if watchdog is not None and time.monotonic() >= next_ping and self.alive():
                self.notifier.watchdog()
                next_ping = time.monotonic() + watchdog
            self._supervise()
            self.controller.apply()
            if self.once and self._drained():
                log.info("inbox_drained")
                break
        self.stop()
        return self.exit_code

    def alive(self) -> bool:
        """Whether the watchdog may be pinged: worker and intake threads run and intake is not stuck in a poll."""
        stall = INTAKE_STALL_SECONDS + self.config.intake.rescan_seconds
        threads = (*self._worker_threads, self._intake_thread)
        running = bool(self._worker_threads) and all(t is not None and t.is_alive() for t in threads)
        return running and time.monotonic() - self._intake_beat < stall

    def _with_queue(self, status: str) -> str:
        paused = "; paused" if self.queue.paused else ""
        return f"{status}; {len(self.queue)} queued{paused}"

    def _supervise(self) -> None:
        if self._watcher is not None:
            # Re-creates a dead observer with backoff, and never watches an unmounted share's mount point; the
            # periodic rescan finds everything meanwhile (checklist A6, A8, A9).
            up = self._watcher.supervise()
            self.metrics.watcher_up.set(1 if up else 0)
            self.metrics.set_watcher_mode(self._watcher.mode_in_use)
        self.metrics.inputs_not_removed.set(len(self.store.not_removed))
        if self._metrics_server is not None and not self._metrics_server.is_alive():
            log.error("metrics_server_died")
            self._fail("metrics server thread died")
        for name, thread in (*((t.name, t) for t in self._worker_threads), ("intake", self._intake_thread)):
            if thread is not None and not thread.is_alive():
                self._fail(f"{name} thread died")
        self._write_status("running")

    def _fail(self, reason: str) -> None:
        log.error("service_failed", reason=reason)
        self.exit_code = 1
        self.stop_requested.set()

    def _drained(self) -> bool:
        last = self._last_intake
        worker_idle = bool(self._workers) and not any(worker.busy.is_set() for worker in self._workers)
        if self.queue.paused and worker_idle:
            return True  # `--once` while paused: nothing more will run; queued jobs stay claimed for a later start
        return (
            last is not None
            and last.settling == 0
            and len(self.queue) == 0
            and worker_idle
            and self.store.counts().get("claimed", 0) == 0
        )

    def request_stop(self) -> None:
        self.stop_requested.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop in the order given in the module docstring; never blocks longer than `timeout` per thread."""
        timeout = timeout if timeout is not None else self.config.worker.stop_timeout_seconds
        self.notifier.stopping("stopping")
        log.info("service_stopping")
        self._stop_intake.set()
        self._hint.set()
        if self._watcher is not None:
            self._watcher.stop()
            self.metrics.watcher_up.set(0)
        if self._intake_thread is not None:
            self._intake_thread.join(timeout=timeout)
        self.queue.close()
        self._stop_workers(timeout)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._write_status("stopped")
        log.info("service_stopped", exit_code=self.exit_code)

    def _stop_workers(self, timeout: float) -> None:
        """Grace, interrupt, join; then close the generation processes and any ffmpeg still running."""
        deadline = time.monotonic() + timeout
        self._grace_for_running_jobs()
        self.interrupt.set()
        for thread in self._worker_threads:
            while thread.is_alive() and time.monotonic() < deadline and not self.force.is_set():
                thread.join(timeout=SUPERVISE_SECONDS)
        if self.force.is_set():
            log.warning("stop_forced")
        for generator in self._generators:
            close_generator(generator, force=self.force.is_set())
        killed = kill_running()  # ffmpeg of finishing still running past the stop timeout: never outlives us
        if killed:
            log.warning("ffmpeg_killed_at_stop", processes=killed)
        for thread in self._worker_threads:
            thread.join(timeout=SUPERVISE_SECONDS if self.force.is_set() else 5.0)
            if thread.is_alive():
                log.error("worker_did_not_stop", worker=thread.name, timeout=timeout)
                self.exit_code = self.exit_code or 1

    def _grace_for_running_jobs(self) -> None:
        """`worker.stop_grace_seconds`: let running jobs finish before interrupting them (a second signal ends it)."""
        grace = self.config.worker.stop_grace_seconds
        if grace <= 0 or not any(worker.current_job is not None for worker in self._workers):
            return
        log.info("stop_grace", seconds=grace)
        self.notifier.status(f"stopping: letting running jobs finish (up to {grace:.0f} s)")
        deadline = time.monotonic() + grace
        while any(worker.current_job is not None for worker in self._workers):
            if time.monotonic() >= deadline or self.force.wait(SUPERVISE_SECONDS):
                return

    def _metrics_address(self) -> str | None:
        if self._metrics_server is not None:
            return f"{self.config.metrics.host}:{self._metrics_server.port}"
        return None

    def _write_status(self, state: str) -> None:
        """A small JSON file `i2vd status` reads: who runs, what it is doing. Best effort (never fails the loop)."""
        generator = self._generator
        running = [worker.current_job for worker in self._workers if worker.current_job is not None]
        status = {
            "state": state,
            "pid": os.getpid(),
            "started_at": self._started_at.isoformat(),
            "updated_at": datetime.now().astimezone().isoformat(),
            "running_job": running[0] if running else None,
            "queued": len(self.queue),
            "model": generator.info.model_id if generator is not None else None,
            "device": generator.info.device if generator is not None else None,
            "workers": [view.describe() for view in self._worker_views() if isinstance(view, _WorkerView)],
            "metrics": self._metrics_address(),
            **self.controller.snapshot(generator.memory_stats() if generator is not None else {}),
        }
        try:
            path = Path(self.config.state_path) / "status.json"
            temp = path.with_suffix(".json.tmp")
            temp.write_text(json.dumps(status, indent=2))
            temp.replace(path)
        except OSError:
            log.warning("status_write_failed", exc_info=True)


@dataclass(frozen=True)
class _WorkerView:
    """One worker as the per-worker metrics and `i2vd status` see it."""

    name: str
    device: str
    worker: Worker
    thread: threading.Thread
    generator: Generator

    def up(self) -> bool:
        return self.thread.is_alive()

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

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

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import structlog

from daemon.config import DaemonConfig
from daemon.controller import Controller
from daemon.encode import Encoder
from daemon.errors import FatalError, JobRejected, StartAbandoned
from daemon.generate.base import Generator
from daemon.intake import Intake, IntakeResult, validate_claimed
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics, MetricsServer
from daemon.mounts import check_mounts
from daemon.publish import Publisher
from daemon.statelock import StateLock
from daemon.store import ClaimedJob, JobStore
from daemon.systemd import SystemdNotifier, watchdog_interval_seconds
from daemon.watch import InboxWatcher
from daemon.workerpool import WorkerPool

log = structlog.get_logger(__name__)
SUPERVISE_SECONDS = 0.5
MODEL_LOAD_EXTEND_SECONDS = 1800.0
"""Start timeout extension asked of systemd before the model loads (real weights from a slow disk take minutes)."""
STOP_MARGIN_SECONDS = 15.0
"""Asked of systemd's stop timeout beyond the stop's own bounds (status file, metrics server, lock)."""
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
        self.pool = WorkerPool(
            config,
            self.store,
            self.queue,
            self.metrics,
            interrupt=self.interrupt,
            force=self.force,
            on_status=lambda status: self.notifier.status(self._with_queue(status)),
            generator_factory=generator_factory,
        )
        self._intake_thread: threading.Thread | None = None
        self._watcher: InboxWatcher | None = None
        self._metrics_server: MetricsServer | None = None
        self._last_intake: IntakeResult | None = None
        self._started_at = datetime.now().astimezone()
        self._intake_beat = time.monotonic()
        self.controller = Controller(config.state_path, self.queue, self.store, self.metrics, lambda: self.pool.workers)
        self.exit_code = 0
        self._lock = StateLock(config.state_path)
        self._staging_fd: int | None = None

    # ----- start -----------------------------------------------------------------------------------------
    def start(self) -> None:
        check_mounts(self.config.require_mounts)  # before anything is created in a mount point (checklist D33)
        Encoder(self.config.encode)  # `encode.ffmpeg` runnable: a config error now, not after the model loaded
        for directory in (self.config.inbox, self.config.outbox, self.config.state_path):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()  # before recovery: a second daemon must not take the first one's claimed jobs
        try:
            self._start_metrics_server()
            self._recover_claimed_jobs()
            self.controller.apply_pause()
            self._load_model()
            self.pool.start()
            if not self.once:
                self._start_watcher()
            self._intake_thread = threading.Thread(target=self._intake_loop, name="i2vd-intake", daemon=True)
            self._intake_thread.start()
        except BaseException:
            self._abandon_start()
            raise
        self._write_status("ready")
        self.notifier.ready(self._with_queue("ready"))
        log.info("service_ready", inbox=str(self.config.inbox), outbox=str(self.config.outbox), once=self.once)

    def _abandon_start(self) -> None:
        """Undo a start that failed half-way (a model that does not load, a port in use): the metrics port, the
        generation processes and the state-dir lock are given back, so an in-process caller can build another
        Service on the same folders. A daemon process exits anyway; this is for embedding callers and tests."""
        self._stop_parts(self.config.worker.stop_timeout_seconds)
        self._release_staging()
        self._lock.release()

    def _release_staging(self) -> None:
        if self._staging_fd is not None:
            os.close(self._staging_fd)  # drops this daemon's share of the outbox's staging lock
            self._staging_fd = None

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
        self._staging_fd, swept = Publisher(self.config.outbox).share_staging()
        if swept is None:
            log.info("staging_sweep_skipped", reason="another daemon publishes into this outbox now")
        elif swept:
            log.info("staging_swept", entries=swept)
        recovered = self.store.recover()
        for outcome in ("poison",):
            count = self.store.recovery_report.get(outcome, 0)
            if count:
                self.metrics.received.inc(count)
                self.metrics.jobs.labels(outcome=outcome).inc(count)
        for claimed in recovered:
            self.metrics.received.inc()
            try:
                job = claimed if claimed.resolved is not None else self._revalidate(claimed)
            except Exception:
                # One job's trouble (its quarantine failing) must not stop the start: it stays claimed, counted
                # as pending, and is tried again at the next start.
                log.exception("job_recovery_failed", job_id=claimed.job_id)
                self.metrics.pending.inc()
                continue
            if job is not None and not job.history and self._skipped_as_duplicate(job):
                continue
            if job is not None:
                self._enqueue(job)
                log.info("job_recovered", job_id=job.job_id, attempts=job.attempts)

    def _skipped_as_duplicate(self, job: ClaimedJob) -> bool:
        """`intake.duplicate_policy` for a job that never started: intake applies it right after validating, so a
        stop in between (or a job validated only now) gets it here, instead of being published again."""
        if self.store.settle_duplicate(job, self.config.intake.duplicate_policy) is None:
            return False
        self.metrics.jobs.labels(outcome="duplicate").inc()
        return True

    def _revalidate(self, job: ClaimedJob) -> ClaimedJob | None:
        """A job claimed but not yet validated when the last run stopped: validate it now, like intake would."""
        try:
            resolved, image_sha256 = validate_claimed(job, self.config, guard_dir=self.store.decoding_dir)
        except JobRejected as exc:
            self.store.fail(job, exc, exc.reason, exc.message, exc.detail)
            self.metrics.jobs.labels(outcome="rejected").inc()
            return None
        return self.store.mark_validated(job, resolved, image_sha256)

    def _load_model(self) -> None:
        """Load in a thread and watch the stop flag meanwhile: a first compile takes minutes, and a stop asked for
        then (systemd's stop, Ctrl-C) gives the start up at once instead of after READY, or SIGKILL at
        `TimeoutStopSec`. The loading thread is left behind: the process exits, and the generation processes
        follow their parent out (`genchild.exit_with_parent`)."""
        self.notifier.extend_timeout(MODEL_LOAD_EXTEND_SECONDS, "loading model")
        failure: list[BaseException] = []

        def load() -> None:
            try:
                self.pool.load()
            except BaseException as exc:
                failure.append(exc)

        loader = threading.Thread(target=load, name="i2vd-load-model", daemon=True)
        loader.start()
        while loader.is_alive():
            if self.stop_requested.is_set():
                log.warning("start_abandoned", reason="a stop was asked for while the model was loading")
                self.notifier.stopping("stopping: the model was still loading")
                raise StartAbandoned("a stop was asked for while the model was loading")
            loader.join(timeout=0.2)
        if failure:
            raise failure[0]

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
            "worker": self.pool.all_alive(),
            "model": self.pool.models_alive(),
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
        intake = self._intake_thread is not None and self._intake_thread.is_alive()
        running = intake and self.pool.all_alive()
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
        self.pool.revive_dead_generators()
        self.metrics.model_loaded.set(1 if self.pool.models_alive() else 0)
        if self._metrics_server is not None and not self._metrics_server.is_alive():
            log.error("metrics_server_died")
            self._fail("metrics server thread died")
        fatal = self.pool.fatal_error()
        if fatal is not None:
            self._fail(f"a worker cannot go on: {fatal}")
        for name, thread in (*((t.name, t) for t in self.pool.threads), ("intake", self._intake_thread)):
            if thread is not None and not thread.is_alive():
                self._fail(f"{name} thread died")
        self._write_status("running")

    def _fail(self, reason: str) -> None:
        log.error("service_failed", reason=reason)
        self.exit_code = 1
        self.stop_requested.set()

    def _drained(self) -> bool:
        last = self._last_intake
        worker_idle = self.pool.idle()
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
        # The stop may take the running jobs' grace and then each thread's timeout: ask systemd for that much,
        # so a grace longer than the unit's TimeoutStopSec is not cut short by SIGKILL.
        worst = self.config.worker.stop_grace_seconds + timeout + STOP_MARGIN_SECONDS
        self.notifier.extend_timeout(worst, "stopping: letting running jobs finish")
        log.info("service_stopping")
        if not self._stop_parts(timeout):
            self.exit_code = self.exit_code or 1
        self._write_status("stopped")
        self._release_staging()
        self._lock.release()
        log.info("service_stopped", exit_code=self.exit_code)

    def _stop_parts(self, timeout: float) -> bool:
        """Stop whatever of intake, watcher, queue, workers and metrics server has been started, in that order;
        False if a worker thread did not stop in time."""
        self._stop_intake.set()
        self._hint.set()
        if self._watcher is not None:
            self._watcher.stop()
            self.metrics.watcher_up.set(0)
        if self._intake_thread is not None:
            self._intake_thread.join(timeout=timeout)
        self.queue.close()
        stopped = self.pool.stop(timeout)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        return stopped

    def _metrics_address(self) -> str | None:
        if self._metrics_server is not None:
            return f"{self.config.metrics.host}:{self._metrics_server.port}"
        return None

    def _write_status(self, state: str) -> None:
        """A small JSON file `i2vd status` reads: who runs, what it is doing. Best effort (never fails the loop)."""
        generator = self.pool.generator
        running = self.pool.running_jobs()
        status = {
            "state": state,
            "pid": os.getpid(),
            "started_at": self._started_at.isoformat(),
            "updated_at": datetime.now().astimezone().isoformat(),
            "running_job": running[0] if running else None,
            "queued": len(self.queue),
            "model": generator.info.model_id if generator is not None else None,
            "device": generator.info.device if generator is not None else None,
            "workers": [view.describe() for view in self.pool.views()],
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

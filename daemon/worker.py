"""The GPU loop: take a claimed job, generate, check; hand encoding and finishing to a pool; decide what failures mean.

A job has two halves. The GPU half (this thread): load the image, generate, sanity-check the frames. The CPU half
(`daemon/finish.py`, on a pool of `encode.max_concurrent_ffmpeg` threads): the main MP4 into staging, variants,
verification, manifest, publication, input archival. `run()` starts job N+1's GPU half while job N is being
finished, so the generator never waits for ffmpeg (the main MP4 was written in this thread once, which left the GPU
idle for its encode and read-back between jobs: BENCHMARKS.md, "The daemon on the GPU"); at most
`encode.finishing_backlog` generated jobs (their frames in memory) wait for a pool thread before the loop pauses.
`process(job)` runs both halves in the caller's thread.

Per-job error policy (errors.py), the same in both halves: bad input is quarantined, transient failures are retried
up to `worker.max_attempts` and then quarantined with their history, a sanity `fail` goes straight to failed/
(`sanity_failed`: the same seed would give the same frames), an interrupt (service stopping) leaves the job claimed
on disk so the next start resumes it. Any other exception is treated as transient: one odd job must never stop the
loop, and a job that keeps failing ends in `failed/` instead of looping forever. `run()` returns only after the
finishing already started is done, so a stop leaves every job published or still claimed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from daemon.attempt import Attempt, CheckedVideo, StageTimer, generation_request
from daemon.batching import batch_limit, take_companions
from daemon.config import DaemonConfig
from daemon.encode import Encoder
from daemon.errors import FatalError, JobInterrupted, JobRejected, TransientJobError
from daemon.finish import Finisher
from daemon.generate.base import GenerationRequest, GenerationResult, Generator
from daemon.intake import decode_isolation, image_pixel_limit, load_image_rgb
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.publish import Publisher
from daemon.sanity import SanityCheckFailed
from daemon.staging import check_generated, encode_main
from daemon.store import ClaimedJob, JobStore

log = structlog.get_logger(__name__)


class Worker:
    """Runs jobs on the loaded generator. `run()` is the thread body; `process()` is one job, start to outcome."""

    def __init__(
        self,
        config: DaemonConfig,
        generator: Generator,
        store: JobStore,
        queue: JobQueue[ClaimedJob],
        metrics: DaemonMetrics,
        *,
        interrupt: threading.Event,
        on_status: Callable[[str], object] = lambda status: None,
        name: str = "w0",
    ) -> None:
        self.name = name
        self._config = config
        self._generator = generator
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._interrupt = interrupt
        self._on_status = on_status
        self._encoder = Encoder(config.encode)
        self._publisher = Publisher(config.outbox, daily_subfolders=config.publish.daily_subfolders)
        self._finisher = Finisher(config, self._encoder, self._publisher, store, generator.info)
        finishers = config.encode.max_concurrent_ffmpeg  # each finishing thread runs one ffmpeg at a time
        self._pool = ThreadPoolExecutor(max_workers=finishers, thread_name_prefix=f"i2vd-finish-{name}")
        self._backlog = threading.BoundedSemaphore(finishers + config.encode.finishing_backlog)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool_error: BaseException | None = None
        self.busy = threading.Event()
        """Set while any job is generating or finishing (`--once` waits for it to clear)."""
        self.current_job: str | None = None
        self.current_name: str | None = None
        self.current_batch: frozenset[str] = frozenset()
        """Ids of every job in the batch generating now (`current_job` is the first of them)."""
        self.progress: tuple[int, int] | None = None
        """(step, total) of the running job's denoising loop, for `i2vd status`."""
        self._cancel_id: str | None = None
        self._idle = metrics.generator_idle.labels(worker=name)
        """The generator's gaps under a backlog: what the daemon costs the GPU between videos."""
        self._idle_since: float | None = None
        """When the last generation ended, if a job was queued then (only then is the next gap the daemon's)."""

    @property
    def fatal(self) -> FatalError | None:
        """The `FatalError` that ended (or is ending) this worker: the service exits 1 on it, also when it came
        from a finishing thread while this worker's thread waits for the next job."""
        error = self._pool_error
        return error if isinstance(error, FatalError) else None

    def cancel(self, job_id: str) -> None:
        """Interrupt job `job_id` between denoising steps if it is running; it ends in failed/ as `cancelled`."""
        self._cancel_id = job_id

    def run(self) -> None:
        """Take jobs until the queue is closed, then wait for the finishing already started. Exceptions outside a
        job (here or in the pool's bookkeeping) end the loop; the service notices the thread is gone."""
        try:
            while self._pool_error is None:
                self._backlog.acquire()  # released when a job's finishing ends: bounds generated-but-unfinished jobs
                if len(self._queue) == 0:  # the job that was waiting went elsewhere: this wait is for work
                    self._idle_since = None
                job = self._queue.get()
                if job is None:
                    self._backlog.release()
                    break
                jobs = [job, *self._companions(job)]
                self._metrics.queue_depth.set(len(self._queue))
                self._metrics.pending.dec(len(jobs))
                self._start(jobs)
        finally:
            self._pool.shutdown(wait=True)
        if isinstance(self._pool_error, FatalError):
            return  # logged as `worker_fatal`; the service sees this thread gone and exits 1
        if self._pool_error is not None:
            raise self._pool_error

    def _companions(self, first: ClaimedJob) -> list[ClaimedJob]:
        """Queued jobs that can share a batch with `first` (`daemon/batching.py`)."""
        limit = batch_limit(self._generator, self._config.worker.max_batch_size, first)
        if limit <= 1:
            return []
        wait = self._config.worker.batch_wait_seconds
        return take_companions(self._queue, self._backlog, first, limit, wait, self._requeue_now)

    def _start(self, jobs: list[ClaimedJob]) -> None:
        for _ in jobs:
            self._enter()
        try:
            attempts = self._begin_many(jobs)
        except BaseException:
            for _ in jobs:
                self._leave()
            raise
        for attempt in attempts:
            if isinstance(attempt, str):
                self._leave()
                continue
            future = self._pool.submit(self._complete, attempt)
            future.add_done_callback(self._finished_in_pool)

    def _finished_in_pool(self, future: Future[str]) -> None:
        error = future.exception()
        if error is not None:
            log.error("finishing_crashed", exc_info=error)
            self._pool_error = error
        self._leave()

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.busy.set()

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy.clear()
        self._backlog.release()

    def process(self, job: ClaimedJob) -> str:
        """Run one job to an outcome (succeeded, rejected, failed, cancelled, retried, interrupted) in this thread."""
        (attempt,) = self._begin_many([job])
        return attempt if isinstance(attempt, str) else self._complete(attempt)

    def _begin_many(self, jobs: list[ClaimedJob]) -> list[Attempt | str]:
        """The GPU half for one job or one batch. Per job: the attempt to finish, or the outcome if it ended here."""
        outcomes: list[Attempt | str] = []
        live: list[Attempt] = []
        for job in jobs:
            try:
                recorded = self._store.record_attempt(job)
            except OSError as exc:
                # The state folder cannot be written (full, read-only): run nothing we could not account for.
                log.error("state_write_failed", job_id=job.job_id, error=exc.strerror or str(exc))
                self._metrics.pending.inc()
                self._requeue_later(job)
                outcomes.append("retried")
                continue
            self._metrics.in_progress.inc()
            attempt = Attempt(recorded, time.perf_counter(), StageTimer(self._metrics))
            outcomes.append(attempt)
            live.append(attempt)
        if not live:
            return outcomes
        first = live[0].job
        self.current_job, self.current_name, self.progress = first.job_id, first.stem, None
        self.current_batch = frozenset(attempt.job.job_id for attempt in live)
        size = f" (batch of {len(live)})" if len(live) > 1 else ""
        self._on_status(f"generating {first.stem}{size} (attempt {first.attempts})")
        try:
            results = self._generate_attempts(live, outcomes)
        finally:
            self.current_job, self.current_name, self.progress = None, None, None
            self.current_batch = frozenset()
        for attempt, outcome in results:
            with structlog.contextvars.bound_contextvars(job_id=attempt.job.job_id, worker=self.name):
                if isinstance(outcome, Exception):
                    outcomes[outcomes.index(attempt)] = self._settle(attempt, outcome)
                    continue
                try:
                    attempt.checked = self._after_generate(attempt, outcome)
                except Exception as exc:
                    outcomes[outcomes.index(attempt)] = self._settle(attempt, exc)
        return outcomes

    def _generate_attempts(
        self, live: list[Attempt], outcomes: list[Attempt | str]
    ) -> list[tuple[Attempt, GenerationResult | Exception]]:
        """Load each image (a bad one ends only its own job), then generate the rest together."""
        requests: list[tuple[Attempt, GenerationRequest]] = []
        for attempt in live:
            with structlog.contextvars.bound_contextvars(job_id=attempt.job.job_id, worker=self.name):
                try:
                    requests.append((attempt, self._prepare(attempt)))
                except Exception as exc:
                    outcomes[outcomes.index(attempt)] = self._settle(attempt, exc)
        if not requests:
            return []
        started = time.perf_counter()
        if self._idle_since is not None:
            self._idle.observe(started - self._idle_since)
        try:
            results = self._generate([request for _, request in requests])
        except Exception as exc:
            results = [exc] * len(requests)  # type: ignore[list-item]
        ended = time.perf_counter()
        self._idle_since = ended if len(self._queue) > 0 else None
        seconds = ended - started
        for attempt, _ in requests:
            attempt.timer.add("generate", seconds)
        return [(attempt, result) for (attempt, _), result in zip(requests, results, strict=True)]

    def _prepare(self, attempt: Attempt) -> GenerationRequest:
        resolved = attempt.job.resolved
        if resolved is None:
            raise JobRejected("job was queued without a validated sidecar", reason="state_corrupt")
        with attempt.timer.stage("load_image"):
            job, config = attempt.job, self._config
            limits = (image_pixel_limit(config), config.intake.max_image_bytes)  # the limits intake applied
            image = load_image_rgb(
                job.image_path,
                *limits,
                expected_sha256=job.image_sha256,
                name=job.image_name,
                isolation=decode_isolation(config) if config.worker.decode_in_child else None,
            )
        return generation_request(resolved, image)

    def _complete(self, attempt: Attempt) -> str:
        """The CPU half: variants, verification, publication, archival; then the outcome."""
        with structlog.contextvars.bound_contextvars(job_id=attempt.job.job_id, worker=self.name):
            try:
                self._finish_stages(attempt)
            except Exception as exc:
                return self._settle(attempt, exc)
            return self._settle(attempt, None)

    def _settle(self, attempt: Attempt, exc: Exception | None) -> str:
        """Apply the error policy to an attempt's end and do its bookkeeping; return the outcome."""
        job = attempt.job
        try:
            if exc is None:
                outcome = "succeeded"
            elif isinstance(exc, JobInterrupted) or (isinstance(exc, TransientJobError) and self._interrupt.is_set()):
                # A failure while the service stops (e.g. the generation process killed by a second signal) is not
                # the job's fault: it is released like an interrupted job and does not end in failed/.
                outcome = self._interrupted(job)
            elif isinstance(exc, FatalError):
                outcome = self._daemon_cannot_go_on(job, exc)
            elif isinstance(exc, SanityCheckFailed):
                self._store.fail(job, exc, exc.reason, exc.message, exc.detail)
                log.warning("job_sanity_failed", message=exc.message)
                outcome = "failed"
            elif isinstance(exc, JobRejected):
                self._store.fail(job, exc, exc.reason, exc.message, exc.detail)
                log.warning("job_rejected", reason=exc.reason, message=exc.message)
                outcome = "rejected"
            else:
                outcome = self._handle_failure(job, exc)
        except OSError as error:
            outcome = self._state_unwritable(job, error)
        finally:
            self._metrics.in_progress.dec()
            self._publisher.discard_staging(job.job_id)
        self._metrics.jobs.labels(outcome=outcome).inc()
        self._metrics.worker_jobs.labels(worker=self.name, outcome=outcome).inc()
        self._log_finished(attempt, outcome, time.perf_counter() - attempt.started)
        if self.current_job is None:  # not while the next job generates: its status wins
            self._on_status(f"idle; last job {outcome}")
        return outcome

    def _state_unwritable(self, job: ClaimedJob, error: OSError) -> str:
        """The end of an attempt could not be written (the state folder's disk is full as well, or read-only): the
        attempt is released in memory and the job waits, as for a full outbox, instead of the worker dying and the
        open attempt counting as a crash at the next start. The next attempt's record writes the released state."""
        log.error("state_write_failed", job_id=job.job_id, error=error.strerror or str(error))
        if not job.directory.is_dir():
            return "failed"  # it reached failed/ (only its reason.json could not be written): nothing to retry
        released = dataclasses.replace(job, **self._store.released(job, "storage_full", str(error)))
        self._metrics.storage_full.set(1)
        self._metrics.pending.inc()
        self._requeue_later(released)
        return "retried"

    def _daemon_cannot_go_on(self, job: ClaimedJob, exc: FatalError) -> str:
        """A `FatalError` during a job (the model no longer loads, ffmpeg cannot be run): not the job's fault. It
        stays claimed with its attempt uncounted, and the worker ends, so the service exits 1 and systemd starts it
        again later, instead of every job in the queue using up its attempts on it."""
        log.error("worker_fatal", error=str(exc))
        self._pool_error = exc
        self._store.release_attempt(job, "daemon_failed", str(exc))
        self._metrics.pending.inc()  # still claimed on disk, resumed at the next start
        return "interrupted"

    def _interrupted(self, job: ClaimedJob) -> str:
        """Interrupted between steps: cancelled by an operator (to failed/), or released because the service stops."""
        if self._cancel_id == job.job_id:
            self._store.fail(job, None, "cancelled", "Cancelled by an operator (i2vd cancel) while running.")
            log.info("job_cancelled", name=job.stem, state="running")
            return "cancelled"
        released = self._store.release_attempt(job, "interrupted")  # not the job's fault: never counts to poison
        self._metrics.pending.inc()  # still claimed on disk
        if not self._interrupt.is_set():
            # Interrupted only because another job of its batch was cancelled: straight back into the queue.
            log.info("job_released", reason="batch companion cancelled")
            self._requeue_now(released)
            return "retried"
        log.info("job_released", reason="service stopping")  # resumed at the next start
        return "interrupted"

    def _log_finished(self, attempt: Attempt, outcome: str, seconds: float) -> None:
        """The canonical line: one per attempt and outcome, with every stage timing so far and the peak VRAM."""
        log.info(
            "job_finished",
            outcome=outcome,
            name=attempt.job.stem,
            attempts=attempt.job.attempts,
            seconds=round(seconds, 3),
            timings={stage: round(value, 3) for stage, value in attempt.timer.timings.items()},
            peak_vram_bytes=attempt.peak_vram,
        )

    def _handle_failure(self, job: ClaimedJob, exc: Exception) -> str:
        kind = "transient" if isinstance(exc, TransientJobError) else "unexpected"
        log.error("job_failed", kind=kind, attempts=job.attempts, error=str(exc), exc_info=exc)
        if not getattr(exc, "consumes_attempt", True):
            # A full disk says nothing about the job: it waits (pending, attempt not counted) until space returns.
            released = self._store.release_attempt(job, "storage_full", str(exc))
            self._metrics.storage_full.set(1)
            self._metrics.pending.inc()
            self._requeue_later(released)
            return "retried"
        if job.attempts < self._config.worker.max_attempts:
            ended = self._store.end_attempt(job, "retried", str(exc))
            self._metrics.pending.inc()
            self._requeue_later(ended)
            return "retried"
        message = f"gave up after {job.attempts} attempt(s): {exc}"
        detail = getattr(exc, "detail", None)
        self._store.fail(job, None, "retries_exhausted", message, detail if detail is not None else repr(exc))
        return "failed"

    def _requeue_now(self, job: ClaimedJob) -> None:
        self._queue.put(job, priority=job.resolved.priority if job.resolved else 0, sequence=job.sequence)

    def _requeue_later(self, job: ClaimedJob) -> None:
        """Re-queue after a delay on a timer, so the jobs behind this one are not blocked while it waits."""

        def requeue() -> None:
            # After a stop the queue is closed; the job stays claimed on disk and is recovered at the next start.
            self._queue.put(job, priority=job.resolved.priority if job.resolved else 0, sequence=job.sequence)
            self._metrics.queue_depth.set(len(self._queue))

        timer = threading.Timer(self._config.worker.retry_delay_seconds, requeue)
        timer.daemon = True
        timer.start()

    def _after_generate(self, attempt: Attempt, result: GenerationResult) -> CheckedVideo:
        """Degrade bookkeeping and sanity checks for one generated video (the GPU half's last step)."""
        assert attempt.job.resolved is not None
        attempt.peak_vram = result.peak_vram_bytes
        if result.degradations:
            self._metrics.worker_jobs.labels(worker=self.name, outcome="degraded").inc()
        return check_generated(attempt.job.resolved, result, self._config.sanity, self._metrics)

    def _finish_stages(self, attempt: Attempt) -> None:
        if attempt.generated is None:
            if attempt.checked is None:
                raise RuntimeError("finishing an attempt that has not generated")
            attempt.generated = encode_main(attempt.checked, attempt.job, self._encoder, self._publisher, attempt.timer)
            attempt.checked = None  # the frames are not needed any more
        generated, timer = attempt.generated, attempt.timer
        with timer.stage("variants"):
            staged = [generated.main, *self._finisher.make_variants(generated)]
        with timer.stage("publish"):
            published = self._finisher.publish(generated, staged)
        self._finisher.archive_inputs(generated)
        self._record_success(attempt, published)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        steps = requests[0].steps
        every = max(1, steps // 10)

        def on_step(step: int, total: int, seconds: float) -> None:
            self._metrics.denoise_step.observe(seconds)
            self.progress = (step, total)
            if step % every == 0 or step == total:
                log.info("generate_step", step=step, total=total, step_seconds=round(seconds, 4), batch=len(requests))

        try:
            if len(requests) == 1:
                return [self._generator.generate(requests[0], on_step=on_step, should_interrupt=self._should_interrupt)]
            batcher = self._generator.generate_batch  # type: ignore[attr-defined]
            results: list[GenerationResult] = batcher(
                requests, on_step=on_step, should_interrupt=self._should_interrupt
            )
            return results
        except TransientJobError as exc:
            if "memory" in exc.message.lower():
                self._metrics.oom.inc()
            raise

    def _should_interrupt(self) -> bool:
        return self._interrupt.is_set() or (self._cancel_id is not None and self._cancel_id in self.current_batch)

    def _record_success(self, attempt: Attempt, published: list[Path]) -> None:
        job, generated = attempt.job, attempt.generated
        assert generated is not None
        resolved, seconds = generated.resolved, time.perf_counter() - attempt.started
        metrics = self._metrics
        # Claim to publish, as documented: the queue wait and earlier attempts included (wall clock: the claim
        # time is on disk, from before a restart too; a clock stepped backwards counts 0).
        metrics.job_duration.observe(max(0.0, (self._store.now() - job.received_at).total_seconds()))
        metrics.frames_generated.inc(resolved.num_frames)
        metrics.video_seconds_generated.inc(resolved.duration_seconds)
        metrics.job_peak_gpu_memory.set(generated.peak_vram_bytes)
        metrics.last_success.set(time.time())
        metrics.storage_full.set(0)
        log.info(
            "job_published",
            input=job.image_name,
            outputs=[path.name for path in published],
            seconds=round(seconds, 3),
            attempts=job.attempts,
            seed=resolved.seed,
            size=f"{resolved.width}x{resolved.height}",
            frames=resolved.num_frames,
            steps=resolved.steps,
            timings={stage: round(value, 3) for stage, value in attempt.timer.timings.items()},
        )

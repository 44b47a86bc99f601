"""The GPU loop: take a claimed job, generate, encode, verify, publish, archive; decide what a failure means.

Per-job error policy (errors.py): bad input is quarantined, transient failures are retried up to
`worker.max_attempts` and then quarantined with their history, an interrupt (service stopping) leaves the job
claimed on disk so the next start resumes it. Any other exception is treated as transient: one odd job must never
stop the loop, and a job that keeps failing ends in `failed/` instead of looping forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import structlog

from daemon.config import DaemonConfig
from daemon.encode import Encoder, MediaInfo
from daemon.errors import JobInterrupted, JobRejected, TransientJobError
from daemon.generate.base import GenerationRequest, GenerationResult, Generator
from daemon.intake import load_image_rgb
from daemon.jobqueue import JobQueue
from daemon.jobspec import ResolvedJob, parse_sidecar
from daemon.manifest import ManifestInputs, OutputRecord, build_manifest
from daemon.metrics import DaemonMetrics
from daemon.publish import Publisher, sha256_file
from daemon.store import ClaimedJob, JobStore

log = structlog.get_logger(__name__)


class StageTimer:
    """Collects per-stage seconds for the manifest and the stage histogram."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.timings: dict[str, float] = {}
        self._metrics = metrics

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self._metrics.stage_duration.labels(stage=name).observe(seconds)


class Worker:
    """Runs jobs one at a time on the loaded generator. `run()` is the thread body; `process()` is one job."""

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
    ) -> None:
        self._config = config
        self._generator = generator
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._interrupt = interrupt
        self._on_status = on_status
        self._encoder = Encoder(config.encode)
        self._publisher = Publisher(config.outbox)
        self.busy = threading.Event()
        self.current_job: str | None = None

    def run(self) -> None:
        """Take jobs until the queue is closed. Exceptions outside a job end the loop (the service notices)."""
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._metrics.queue_depth.set(len(self._queue))
            self._metrics.pending.dec()
            self.busy.set()
            try:
                self.process(job)
            finally:
                self.busy.clear()
                self.current_job = None

    def process(self, job: ClaimedJob) -> str:
        """Run one job to an outcome: succeeded, rejected, failed, retried or interrupted."""
        self.current_job = job.job_id
        self._metrics.in_progress.inc()
        started = time.perf_counter()
        job = self._store.record_attempt(job)
        outcome = "failed"
        with structlog.contextvars.bound_contextvars(job_id=job.job_id):
            self._on_status(f"generating {job.stem} (attempt {job.attempts})")
            try:
                self._run_stages(job, started)
                outcome = "succeeded"
            except JobInterrupted:
                log.info("job_released", reason="service stopping")
                self._metrics.pending.inc()  # still claimed on disk: resumed at the next start
                outcome = "interrupted"
            except JobRejected as exc:
                self._store.fail(job, exc, exc.reason, exc.message, exc.detail)
                log.warning("job_rejected", reason=exc.reason, message=exc.message)
                outcome = "rejected"
            except Exception as exc:
                outcome = self._handle_failure(job, exc)
            finally:
                self._metrics.in_progress.dec()
                self._publisher.discard_staging(job.job_id)
            self._metrics.jobs.labels(outcome=outcome).inc()
            self._on_status(f"idle; last job {outcome}")
        return outcome

    def _handle_failure(self, job: ClaimedJob, exc: Exception) -> str:
        kind = "transient" if isinstance(exc, TransientJobError) else "unexpected"
        log.error("job_failed", kind=kind, attempts=job.attempts, error=str(exc), exc_info=exc)
        if job.attempts < self._config.worker.max_attempts:
            self._metrics.pending.inc()
            self._requeue_later(job)
            return "retried"
        message = f"gave up after {job.attempts} attempt(s): {exc}"
        detail = getattr(exc, "detail", None)
        self._store.fail(job, None, "retries_exhausted", message, detail if detail is not None else repr(exc))
        return "failed"

    def _requeue_later(self, job: ClaimedJob) -> None:
        """Re-queue after a delay on a timer, so the jobs behind this one are not blocked while it waits."""

        def requeue() -> None:
            # After a stop the queue is closed; the job stays claimed on disk and is recovered at the next start.
            self._queue.put(job, priority=job.resolved.priority if job.resolved else 0, sequence=job.sequence)
            self._metrics.queue_depth.set(len(self._queue))

        timer = threading.Timer(self._config.worker.retry_delay_seconds, requeue)
        timer.daemon = True
        timer.start()

    def _run_stages(self, job: ClaimedJob, started: float) -> None:
        resolved = job.resolved
        if resolved is None:
            raise JobRejected("job was queued without a validated sidecar", reason="state_corrupt")
        timer = StageTimer(self._metrics)
        with timer.stage("load_image"):
            image = load_image_rgb(job.image_path, self._config.intake.max_image_pixels)
        with timer.stage("generate"):
            result = self._generate(resolved, image)
        staging = self._publisher.staging_dir(job.job_id)
        with timer.stage("encode"):
            main_path = staging / "main.mp4"
            main_info = self._encoder.write_video(result.frames, resolved.fps, main_path)
        staged: list[tuple[Path, str, str, MediaInfo]] = [(main_path, ".mp4", "main", main_info)]
        with timer.stage("variants"):
            staged += self._make_variants(resolved, main_path, main_info, staging)
        with timer.stage("publish"):
            published = self._publish(job, resolved, result, staged, timer.timings)
        self._store.complete(job, archive=self._config.publish.processed_inputs == "archive")
        self._record_success(job, resolved, result, time.perf_counter() - started, published, timer.timings)

    def _generate(self, resolved: ResolvedJob, image: object) -> GenerationResult:
        request = GenerationRequest(
            image=image,  # type: ignore[arg-type]
            prompt=resolved.prompt,
            negative_prompt=resolved.negative_prompt,
            width=resolved.width,
            height=resolved.height,
            num_frames=resolved.num_frames,
            target_fps=resolved.target_fps,
            steps=resolved.steps,
            guidance_scale=resolved.guidance_scale,
            seed=resolved.seed,
        )
        every = max(1, resolved.steps // 10)

        def on_step(step: int, total: int, seconds: float) -> None:
            self._metrics.denoise_step.observe(seconds)
            if step % every == 0 or step == total:
                log.info("generate_step", step=step, total=total, step_seconds=round(seconds, 4))

        try:
            return self._generator.generate(request, on_step=on_step, should_interrupt=self._interrupt.is_set)
        except TransientJobError as exc:
            if "memory" in exc.message.lower():
                self._metrics.oom.inc()
            raise

    def _make_variants(
        self, resolved: ResolvedJob, main_path: Path, main_info: MediaInfo, staging: Path
    ) -> list[tuple[Path, str, str, MediaInfo]]:
        made = []
        for name in resolved.variants:
            spec = self._config.encode.variants[name]
            destination = staging / f"{name}.{spec.ext}"
            info = self._encoder.make_variant(name, spec, main_path, main_info, destination)
            made.append((destination, f".{name}.{spec.ext}", name, info))
        return made

    def _publish(
        self,
        job: ClaimedJob,
        resolved: ResolvedJob,
        result: GenerationResult,
        staged: list[tuple[Path, str, str, MediaInfo]],
        timings: dict[str, float],
    ) -> list[Path]:
        records = [(suffix, role, sha256_file(path), path.stat().st_size, info) for path, suffix, role, info in staged]
        manifest_inputs = self._manifest_inputs(job, resolved, result, timings)

        def manifest_for(base: str) -> dict[str, object]:
            """The publisher picks the final base name (a clash moves the whole set to `-2`), then asks for this."""
            outputs = [
                OutputRecord(
                    name=f"{base}{suffix}",
                    role=role,
                    sha256=digest,
                    bytes=size,
                    codec=info.codec,
                    width=info.width,
                    height=info.height,
                    frames=info.frames,
                    fps=info.fps,
                    duration_seconds=info.duration_seconds,
                )
                for suffix, role, digest, size, info in records
            ]
            return build_manifest(manifest_inputs, outputs)

        base = self._publisher.reserve_base_name(resolved.output_name)
        return self._publisher.publish(base, [(path, suffix) for path, suffix, _, _ in staged], manifest_for)

    def _manifest_inputs(
        self, job: ClaimedJob, resolved: ResolvedJob, result: GenerationResult, timings: dict[str, float]
    ) -> ManifestInputs:
        info = self._generator.info
        asked = parse_sidecar(job.sidecar_path.read_bytes()).model_dump(mode="json", exclude_none=True)
        return ManifestInputs(
            job_id=job.job_id,
            image_name=job.image_name,
            sidecar_name=job.sidecar_name,
            image_sha256=job.image_sha256 or sha256_file(job.image_path),
            received_at=job.received_at,
            asked=asked,
            used=resolved.model_dump(mode="json"),
            model={
                "id": info.model_id,
                "revision": info.revision,
                "device": info.device,
                "dtype": info.dtype,
            },
            library_versions=dict(info.library_versions),
            timings={**timings, **{f"generate.{k}": v for k, v in result.timings.items()}},
            peak_vram_bytes=result.peak_vram_bytes,
            attempts=job.attempts,
            finished_at=datetime.now().astimezone(),
        )

    def _record_success(
        self,
        job: ClaimedJob,
        resolved: ResolvedJob,
        result: GenerationResult,
        seconds: float,
        published: list[Path],
        timings: dict[str, float],
    ) -> None:
        metrics = self._metrics
        metrics.job_duration.observe(seconds)
        metrics.frames_generated.inc(resolved.num_frames)
        metrics.video_seconds_generated.inc(resolved.duration_seconds)
        metrics.job_peak_gpu_memory.set(result.peak_vram_bytes)
        metrics.last_success.set(time.time())
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
            timings={stage: round(value, 3) for stage, value in timings.items()},
        )

"""A generated video between the generator and finishing: degrade bookkeeping and sanity checks (the worker's GPU
half, right after generation), then the main MP4 into the job's staging folder (the first step of finishing, on the
finishing pool, so the GPU does not wait for ffmpeg).

Split from `worker.py`, which keeps the loop and the error policy; the errors raised here (`SanityCheckFailed`,
ffmpeg's `TransientJobError`/`StorageFull`) are settled there like every other stage's.
"""

from __future__ import annotations

import structlog

from daemon.attempt import CheckedVideo, StageTimer
from daemon.config import SanityConfig
from daemon.encode import Encoder
from daemon.finish import GeneratedJob, StagedOutput
from daemon.generate.base import GenerationResult
from daemon.jobspec import ResolvedJob
from daemon.metrics import DEGRADE_RUNGS, DaemonMetrics
from daemon.publish import Publisher
from daemon.sanity import SanityCheckFailed, SanityReport, check_frames
from daemon.store import ClaimedJob

log = structlog.get_logger(__name__)


def degrade_rung(step: str) -> str:
    """The bounded metric label of a ladder step such as `decode_chunk=4` (unknown steps count as `other`)."""
    rung = step.split("=", 1)[0].strip()
    return rung if rung in DEGRADE_RUNGS else "other"


def check_generated(
    resolved: ResolvedJob, result: GenerationResult, sanity: SanityConfig, metrics: DaemonMetrics
) -> CheckedVideo:
    """What the video really is after any out-of-memory degrade (e.g. fewer frames wins over what was asked, for
    the sanity checks, the encode and the manifest's `used`; the steps go into `degradations`), then its checks."""
    if result.out_of_memory_errors:
        metrics.oom.inc(result.out_of_memory_errors)  # recovered by the ladder; counted like those that end a job
    if result.degradations:
        metrics.degraded_jobs.inc()
        metrics.jobs.labels(outcome="degraded").inc()  # besides the outcome the job ends with
        for step in result.degradations:
            metrics.degrade_steps.labels(rung=degrade_rung(step)).inc()
        log.warning("job_degraded", steps=list(result.degradations), used=dict(result.used))
        known = {key: value for key, value in result.used.items() if key in type(resolved).model_fields}
        resolved = resolved.model_copy(update=known)
    report = check_sanity(resolved, result, sanity, metrics)
    return CheckedVideo(resolved, result, report.as_manifest())


def check_sanity(
    resolved: ResolvedJob, result: GenerationResult, sanity: SanityConfig, metrics: DaemonMetrics
) -> SanityReport:
    """Check the frames (sanity.py), count the results, warn or raise `SanityCheckFailed` per policy."""
    expected = (resolved.num_frames, resolved.height, resolved.width)
    report = check_frames(result.frames, expected, sanity, result.nonfinite_values)
    for item in report.results:
        if item.result != "off":
            metrics.sanity_checks.labels(check=item.check, result=item.result).inc()
    for item in report.warnings:
        log.warning("sanity_warning", check=item.check, value=item.value, message=item.message)
    if report.failed:
        checks = ", ".join(f"{item.check} ({item.message})" for item in report.failed)
        raise SanityCheckFailed(f"generated frames failed sanity checks: {checks}", detail=report.as_manifest())
    return report


def encode_main(
    checked: CheckedVideo, job: ClaimedJob, encoder: Encoder, publisher: Publisher, timer: StageTimer
) -> GeneratedJob:
    """The main MP4 of a checked video into the job's staging folder, verified (`Encoder.write_video`)."""
    result = checked.result
    with timer.stage("encode"):
        main_path = publisher.staging_dir(job.job_id) / "main.mp4"
        main_info = encoder.write_video(result.frames, checked.resolved.fps, main_path)
    return GeneratedJob(
        job=job,
        resolved=checked.resolved,
        main=StagedOutput(main_path, ".mp4", "main", main_info),
        timings=timer.timings,
        running=timer.running,
        generate_timings=dict(result.timings),
        peak_vram_bytes=result.peak_vram_bytes,
        sanity=checked.sanity,
        degradations=tuple(result.degradations),
    )

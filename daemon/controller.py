"""Applies operator requests (pause flag, cancel files; see control.py) to the running daemon, and describes the
daemon for `i2vd status` (the snapshot the service writes to `STATE/status.json` every supervision round).

It runs on the main thread, once per supervision round: the worker and intake threads never block on it, and
every change it makes goes through the thread-safe queue, store and worker methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from daemon import control
from daemon.jobqueue import JobQueue
from daemon.metrics import OUTCOMES, DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker

log = structlog.get_logger(__name__)
CANCEL_TTL_SECONDS = 600.0
"""A cancel request whose job is nowhere (not claimed on disk) is dropped after this long."""


class Controller:
    """Pause/resume and cancel, polled from the service's main loop."""

    def __init__(
        self,
        state_dir: Path,
        queue: JobQueue[ClaimedJob],
        store: JobStore,
        metrics: DaemonMetrics,
        workers: Callable[[], Sequence[Worker]],
    ) -> None:
        self._state_dir = state_dir
        self._queue = queue
        self._store = store
        self._metrics = metrics
        self._workers = workers

    def apply(self) -> None:
        self.apply_pause()
        self.apply_cancels()

    def apply_pause(self) -> None:
        """Follow the pause flag file; the worker finishes its current job and then waits in `queue.get`."""
        paused = control.is_paused(self._state_dir)
        if paused != self._queue.paused:
            self._queue.set_paused(paused)
            self._metrics.queue_paused.set(1 if paused else 0)
            log.info("queue_paused" if paused else "queue_resumed", queued=len(self._queue))

    def apply_cancels(self) -> None:
        requests = control.pending_cancels(self._state_dir)
        if not requests:
            return
        claimed = control.claimed_names(self._state_dir)
        for request in requests:
            if self._cancel(request.name):
                request.path.unlink(missing_ok=True)
            elif request.name not in claimed or request.age_seconds > CANCEL_TTL_SECONDS:
                # Not queued, not running, not waiting for a retry: nothing this request could ever apply to.
                log.warning("cancel_unmatched", name=request.name)
                request.path.unlink(missing_ok=True)

    def _cancel(self, name: str) -> bool:
        """Cancel the pending jobs named `name` (to failed/ now) and the running one (between denoising steps)."""
        found = False
        for job in self._queue.remove(lambda job: job.stem == name):
            self._store.fail(job, None, "cancelled", "Cancelled by an operator (i2vd cancel) while queued.")
            self._metrics.pending.dec()
            self._metrics.jobs.labels(outcome="cancelled").inc()
            self._metrics.queue_depth.set(len(self._queue))
            log.info("job_cancelled", job_id=job.job_id, name=name, state="pending")
            found = True
        for worker in self._workers():
            if worker.current_name == name and worker.current_job is not None:
                worker.cancel(worker.current_job)
                log.info("job_cancel_requested", job_id=worker.current_job, name=name, state="running")
                found = True
        return found

    def snapshot(self, memory: Mapping[str, int]) -> dict[str, Any]:
        """What `i2vd status` shows of the live daemon: running job and progress, queue, outcomes, throughput, VRAM."""
        running_jobs = []
        for worker in self._workers():
            if worker.current_job is not None:
                step, total = worker.progress or (0, 0)
                running_jobs.append(
                    {
                        "job_id": worker.current_job,
                        "name": worker.current_name,
                        "step": step,
                        "steps": total,
                        "worker": worker.name,
                    }
                )
        running = running_jobs[0] if running_jobs else None
        sample = self._metrics.registry.get_sample_value
        outcomes = {o: int(sample("i2vd_jobs_total", {"outcome": o}) or 0) for o in OUTCOMES}
        return {
            "running": running,
            "running_jobs": running_jobs,
            "paused": self._queue.paused,
            "queue": [job.stem for job in self._queue.snapshot()],
            "outcomes": outcomes,
            "video_seconds_generated": sample("i2vd_video_seconds_generated_total") or 0.0,
            "last_success_at": sample("i2vd_last_success_timestamp_seconds") or None,
            "gpu_memory_bytes": dict(memory),
            "job_peak_gpu_memory_bytes": int(sample("i2vd_job_peak_gpu_memory_bytes") or 0),
            "written_at": time.time(),
        }

"""Which queued jobs join a batch: same shape (size, frames, steps), as many as the generator's VRAM budget,
`worker.max_batch_size` and the free finishing room allow, waiting `worker.batch_wait_seconds` at most.

Split from `worker.py`. The finishing room is the worker's backlog semaphore: each job in a batch holds one permit
until its finishing ends, so a batch never makes more generated-but-unfinished jobs than the worker bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from daemon.attempt import batch_key_of, generation_request
from daemon.generate.base import Generator
from daemon.jobqueue import JobQueue
from daemon.store import ClaimedJob

log = structlog.get_logger(__name__)


def batch_limit(generator: Generator, max_batch_size: int, job: ClaimedJob) -> int:
    """How many jobs of `job`'s shape one batch may hold (1: no batching for this generator or job)."""
    sizer = getattr(generator, "max_batch_size", None)
    if max_batch_size <= 1 or not callable(getattr(generator, "generate_batch", None)):
        return 1
    if job.resolved is None or not callable(sizer):
        return 1
    try:
        allowed = int(sizer(generation_request(job.resolved, None)))
    except Exception:
        log.warning("batch_size_unknown", exc_info=True)
        return 1
    return max(1, min(max_batch_size, allowed))


def take_companions(
    queue: JobQueue[ClaimedJob],
    room: threading.BoundedSemaphore,
    first: ClaimedJob,
    limit: int,
    wait_seconds: float,
    requeue: Callable[[ClaimedJob], None],
) -> list[ClaimedJob]:
    """Up to `limit - 1` queued jobs of `first`'s shape, each holding one permit of `room` (finishing room). A job
    taken from the queue without room goes back through `requeue`, and so does every job taken after it: the
    queue hands them out together, and one left out would stay claimed on disk but in no queue."""
    key = batch_key_of(first)
    deadline = time.monotonic() + wait_seconds
    taken: list[ClaimedJob] = []
    while True:
        candidates = queue.take(lambda other: batch_key_of(other) == key, limit - 1 - len(taken))
        for index, job in enumerate(candidates):
            if not room.acquire(blocking=False):
                for left in candidates[index:]:
                    requeue(left)
                return taken
            taken.append(job)
        if len(taken) >= limit - 1 or time.monotonic() >= deadline:
            return taken
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

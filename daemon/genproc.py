"""Generation in a supervised child process, behind the ordinary `Generator` protocol.

A segfault in a CUDA kernel, an `abort()` in a driver or a hung step would take the whole daemon down if the model
ran in the daemon's own process, and with it the watcher, the metrics and every queued job. Here the model lives in
a child process (multiprocessing `spawn`: a fresh interpreter, so no forked CUDA state or lock) that loads it once
and then serves requests over a pipe. The parent, `ProcessGenerator`, is what the worker sees:

- progress: the child sends one message per denoising step; the parent calls the worker's `on_step` with it;
- interrupt: the worker's `should_interrupt` is polled by the parent and forwarded through a shared event that the
  child checks between steps (its generator then raises `JobInterrupted`, as in-process);
- death: a child that exits or is killed while a job runs surfaces as `WorkerCrashed` (transient: the worker's
  retry policy applies and the job's attempts, persisted before generation, count it); a job that runs past
  `worker.job_timeout_seconds` has its child killed and surfaces as `JobTimedOut`. Either way a new child is
  started at once, so the next job finds a model loading or loaded;
- a child that cannot load the model `MAX_LOAD_FAILURES` times in a row is a `FatalError` (bad weights or
  config): the service exits non-zero instead of looping;
- the child exits as soon as its parent is gone (it watches its parent pid), so it never outlives the daemon.

Only one call runs at a time per `ProcessGenerator` (one worker thread owns it).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import structlog

from daemon.errors import FatalError, TransientJobError
from daemon.genchild import WireError, child_main, rebuild_error
from daemon.generate.base import (
    GenerationRequest,
    GenerationResult,
    Generator,
    InterruptCheck,
    ModelInfo,
    StepCallback,
)

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.05
"""How often the parent looks at interrupt, deadline and child liveness while a job runs."""
MAX_LOAD_FAILURES = 3
KILL_GRACE_SECONDS = 5.0
"""On close: how long the child may take to exit after the stop message before it is killed."""


class WorkerCrashed(TransientJobError):
    """The generation process died while running the job; it was restarted and the job will be retried."""


class JobTimedOut(TransientJobError):
    """The job ran past worker.job_timeout_seconds; its generation process was killed and restarted."""


@dataclass(frozen=True)
class ChildSettings:
    """What a child needs besides the loader: environment (device pinning, thread counts) and logging."""

    name: str
    device_label: str
    env: Mapping[str, str]
    log_level: str = "info"
    log_format: str = "auto"


class ProcessGenerator:
    """A `Generator` (and `BatchGenerator` when the child's generator batches) that runs in a supervised child."""

    def __init__(
        self,
        loader: Callable[[], Generator],
        settings: ChildSettings,
        *,
        job_timeout_seconds: float,
        load_timeout_seconds: float = 1800.0,
    ) -> None:
        self._loader = loader
        self._settings = settings
        self._job_timeout = job_timeout_seconds
        self._load_timeout = load_timeout_seconds
        self._context = multiprocessing.get_context("spawn")
        self._interrupt = self._context.Event()
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: multiprocessing.connection.Connection | None = None
        self._info: ModelInfo | None = None
        self._can_batch = False
        self._memory: Mapping[str, int] = {}
        self._load_failures = 0
        self._waiting_for_ready = False
        self._closed = False
        """Set by close()/kill(): no replacement child is started any more (one started during shutdown would
        outlive the stop, and multiprocessing's exit handler would wait for it forever: it ignores SIGTERM)."""
        self.restarts = 0
        """Children started after the first (crashes, timeouts): exported per worker."""
        self.last_ready_at: float | None = None
        """`time.perf_counter()` when the current child reported its model loaded (recovery benchmarks)."""
        with self._lock:
            self._spawn()
            self._await_ready()

    # ----- the Generator protocol --------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        assert self._info is not None
        return self._info

    def memory_stats(self) -> Mapping[str, int]:
        """The child's last report (sent with every step and result): reading it never waits for a busy child."""
        return dict(self._memory)

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        (result,) = self._call(("generate", [request]), on_step, should_interrupt, self._job_timeout)
        return result  # type: ignore[no-any-return]

    @property
    def can_batch(self) -> bool:
        return self._can_batch

    def max_batch_size(self, request: GenerationRequest) -> int:
        if not self._can_batch:
            return 1
        return int(self._call(("max_batch_size", request), None, None, 60.0))

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> list[GenerationResult]:
        timeout = self._job_timeout * max(1, len(requests))
        return list(self._call(("generate_batch", list(requests)), on_step, should_interrupt, timeout))

    # ----- lifecycle ---------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def model_alive(self) -> bool:
        """Whether the child runs with the model loaded (False while a replacement loads)."""
        process = self._process
        return process is not None and process.is_alive() and self._info is not None and not self._waiting_for_ready

    def revive_if_dead(self) -> bool:
        """Start a new child if this one died while idle (OOM-killed, crashed between jobs), so the model is
        loading again before the next job needs it. Never waits: while a job holds the child it does nothing (the
        job's own call replaces a dead child). True if a new child was started."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._closed or self._process is None or self._process.is_alive():
                return False
            self._restart("the generation process died while idle")
            return True
        finally:
            self._lock.release()

    def close(self, timeout: float = KILL_GRACE_SECONDS) -> None:
        """Ask the child to exit; kill it if it does not within `timeout`. Safe to call twice."""
        self._closed = True
        connection, process = self._connection, self._process
        if process is None:
            return
        if connection is not None:
            with contextlib.suppress(OSError, ValueError):
                connection.send(("stop",))
        process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """Kill the child now and for good (second stop signal). Works while a call is in flight in another thread."""
        self._closed = True
        self._kill_child()

    def _kill_child(self) -> None:
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(KILL_GRACE_SECONDS)

    # ----- internals ---------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=child_main,
            args=(child_end, self._loader, self._interrupt, dict(self._settings.env), os.getpid()),
            kwargs={"log_level": self._settings.log_level, "log_format": self._settings.log_format},
            name=f"i2vd-gen-{self._settings.name}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._connection = process, parent_end
        log.info("generator_process_started", worker=self._settings.name, pid=process.pid)

    def _await_ready(self) -> None:
        """Wait for the child's `ready` (model loaded). Load failures are counted; too many in a row are fatal."""
        deadline = time.monotonic() + self._load_timeout
        while True:
            try:
                message = self._receive(deadline, lambda: None)
            except _DeadlinePassed:
                self._load_failed(f"loading the model took longer than {self._load_timeout:.0f} s")
                deadline = time.monotonic() + self._load_timeout
                continue
            if message is None:
                self._load_failed("the generation process exited while loading the model")
                continue
            kind = message[0]
            if kind == "ready":
                info, self._can_batch, self._memory = message[1], message[2], message[3]
                self._info = replace(info, device=self._settings.device_label)
                self._load_failures = 0
                self.last_ready_at = time.perf_counter()
                return
            if kind == "load_failed":
                self._load_failed(f"loading the model failed: {message[1]}")

    def _load_failed(self, why: str) -> None:
        self._load_failures += 1
        log.error("generator_load_failed", worker=self._settings.name, why=why, failures=self._load_failures)
        self._kill_child()
        if self._load_failures >= MAX_LOAD_FAILURES:
            raise FatalError(f"worker {self._settings.name}: {why} ({self._load_failures} times in a row)")
        if self._closed:
            raise WorkerCrashed(f"the generation process is closed ({why}); the daemon is stopping")
        self._spawn()

    def _ensure_ready(self) -> None:
        if self._process is None or not self._process.is_alive() or self._info is None:
            self._restart("not running")
        if self._waiting_for_ready:
            self._await_ready()
            self._waiting_for_ready = False

    def _restart(self, why: str) -> None:
        """Replace a dead or killed child. The new one loads while the worker settles the failed job."""
        self._kill_child()
        if self._closed:
            raise WorkerCrashed(f"the generation process is closed ({why}); the daemon is stopping")
        self.restarts += 1
        log.warning("generator_process_restarting", worker=self._settings.name, why=why, restarts=self.restarts)
        self._spawn()
        self._waiting_for_ready = True

    def _call(
        self,
        request: tuple[Any, ...],
        on_step: StepCallback | None,
        should_interrupt: InterruptCheck | None,
        timeout: float,
    ) -> Any:
        with self._lock:
            self._ensure_ready()
            self._interrupt.clear()
            assert self._connection is not None
            try:
                self._connection.send(request)
            except (OSError, ValueError) as exc:
                self._restart(f"send failed: {exc}")
                raise WorkerCrashed(f"the generation process could not take the job: {exc}") from exc
            deadline = time.monotonic() + timeout

            def watch() -> None:
                if should_interrupt is not None and not self._interrupt.is_set() and should_interrupt():
                    self._interrupt.set()

            while True:
                try:
                    message = self._receive(deadline, watch)
                except _DeadlinePassed:
                    self._restart("job timeout")
                    raise JobTimedOut(
                        f"the job ran longer than {timeout:.0f} s; its generation process was killed",
                        detail={"timeout_seconds": timeout},
                    ) from None
                if message is None:
                    self._crashed()
                reply = self._handle(message, on_step)
                if reply is not _CONTINUE:
                    return reply

    def _handle(self, message: tuple[Any, ...], on_step: StepCallback | None) -> Any:
        kind = message[0]
        if kind == "step":
            _, step, total, seconds, self._memory = message
            if on_step is not None:
                on_step(step, total, seconds)
            return _CONTINUE
        if kind == "result":
            self._memory = message[2]
            return message[1]
        if kind == "error":
            self._memory = message[2]
            raise rebuild_error(message[1])
        raise WorkerCrashed(f"unexpected message from the generation process: {kind!r}")

    def _crashed(self) -> NoReturn:
        process = self._process
        code = process.exitcode if process is not None else None
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        self._restart(how)
        raise WorkerCrashed(f"the generation process {how} while running the job", detail={"exitcode": code})

    def _receive(self, deadline: float, watch: Callable[[], None]) -> tuple[Any, ...] | None:
        """Next message from the child, or None once it is dead; `_DeadlinePassed` past `deadline`.

        `watch` (the interrupt check) and the deadline are looked at before every wait, not only when a wait timed
        out: a child that reports steps faster than `POLL_SECONDS` (a small model, a fast GPU) must still be
        interruptible between steps and still time out."""
        connection, process = self._connection, self._process
        assert connection is not None and process is not None
        while True:
            watch()
            if time.monotonic() > deadline:
                raise _DeadlinePassed
            try:
                if connection.poll(POLL_SECONDS):
                    message: tuple[Any, ...] = connection.recv()
                    return message
            except (EOFError, OSError):
                process.join(KILL_GRACE_SECONDS)
                return None
            if not process.is_alive():
                if connection.poll(0):  # a last message written just before exiting
                    continue
                return None


class _DeadlinePassed(Exception):
    pass


_CONTINUE = object()

__all__ = ["ChildSettings", "JobTimedOut", "ProcessGenerator", "WireError", "WorkerCrashed"]

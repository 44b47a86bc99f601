"""The child side of `daemon.genproc`: load the model once, then serve generate requests from the pipe.

Kept in its own small module so the spawned interpreter imports only what it needs (the daemon's service,
watcher and metrics stay out of it). Messages are tuples; the first item names the kind:

- parent -> child: `("generate", [request])`, `("generate_batch", [requests])`, `("max_batch_size", request)`,
  `("stop",)`;
- child -> parent: `("ready", ModelInfo, can_batch, memory)`, `("load_failed", text)`,
  `("step", step, total, seconds, memory)`, `("result", value, memory)`, `("error", WireError, memory)`.

Errors cross the pipe as a `WireError` (class name, message, reason, detail) rather than as pickled exceptions:
the daemon's exceptions take keyword arguments, which `pickle` does not restore, and a detail object from a
library could fail to unpickle in the parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.errors import FatalError, I2vdError, JobInterrupted, JobRejected, TransientJobError
from daemon.generate.base import Generator

PARENT_CHECK_SECONDS = 0.5


@dataclass(frozen=True)
class WireError:
    """An exception raised in the child, in a form that always pickles."""

    kind: str
    """`rejected`, `transient`, `interrupted`, `fatal`, or `unexpected` (any other exception)."""
    message: str
    reason: str | None = None
    detail: str | None = None


_KINDS: tuple[tuple[type[I2vdError], str], ...] = (
    (JobRejected, "rejected"),
    (JobInterrupted, "interrupted"),
    (TransientJobError, "transient"),
    (FatalError, "fatal"),
)


def to_wire(exc: BaseException) -> WireError:
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            detail = None if exc.detail is None else str(exc.detail)
            return WireError(kind, exc.message, getattr(exc, "reason", None), detail)
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return WireError("unexpected", text, None, "".join(traceback.format_exception(exc)))


class GenerationProcessError(TransientJobError):
    """The generation process raised an unexpected exception (its traceback is in the detail)."""


def rebuild_error(wire: WireError) -> I2vdError:
    """The parent-side exception for a child's `WireError`: same class family, same message."""
    if wire.kind == "rejected":
        return JobRejected(wire.message, reason=wire.reason or "invalid_input", detail=wire.detail)
    if wire.kind == "interrupted":
        return JobInterrupted(wire.message, detail=wire.detail)
    if wire.kind == "transient":
        return TransientJobError(wire.message, detail=wire.detail)
    if wire.kind == "fatal":
        return FatalError(wire.message, detail=wire.detail)
    return GenerationProcessError(wire.message, detail=wire.detail)


def exit_with_parent(parent_pid: int, period: float = PARENT_CHECK_SECONDS) -> None:
    """Exit at once when the daemon is gone (reparented), even in the middle of a denoising step.

    Not `PR_SET_PDEATHSIG`: Linux sends that signal when the parent *thread* exits, and generation processes are
    started (and restarted) from short-lived threads, so it would kill healthy children. A daemon thread that
    polls the parent pid costs nothing and also works where prctl does not exist.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="i2vd-parent-watch", daemon=True).start()


def child_main(
    connection: Any,
    loader: Callable[[], Generator],
    interrupt: Any,
    env: Mapping[str, str],
    parent_pid: int,
    *,
    log_level: str = "info",
    log_format: str = "auto",
) -> None:
    """Entry point of the spawned process. Returns (exit 0) on `stop` or when the parent's end closes."""
    exit_with_parent(parent_pid)
    # The parent decides when a job stops: a Ctrl-C or a hangup to the terminal's process group or a SIGTERM to
    # the whole control group must not kill a job before the daemon has released its claim (it closes or kills
    # us itself).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    os.environ.update(env)
    from daemon.logs import configure_logging, get_logger

    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    log = get_logger("daemon.genchild")
    try:
        generator = loader()
    except BaseException as exc:
        log.error("generator_load_failed", exc_info=exc)
        connection.send(("load_failed", to_wire(exc).message))
        return
    can_batch = callable(getattr(generator, "generate_batch", None))
    # The child's own end of restart-to-READY (the parent's `model_loaded` follows once every worker is ready).
    log.info("generation_process_ready", pid=os.getpid())
    connection.send(("ready", generator.info, can_batch, dict(generator.memory_stats())))
    _serve(connection, generator, interrupt, log)
    log.info("generation_process_exiting", pid=os.getpid())
    leave_now()


def leave_now() -> None:
    """End the process without the interpreter's teardown (`os._exit`), once logs are flushed.

    Why: the teardown waits for every non-daemon thread and runs finalizers, and a process that has run torch's
    compiled code can keep it waiting: on the H200, a generation process that had loaded precompiled layer graphs
    was still alive 5 s after `stop` and was killed at the parent's grace (1.3 s without them). Nothing here needs
    an orderly teardown: compile artefacts are written atomically when made, jobs end before `stop`, and the
    driver frees GPU memory when the process goes."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _serve(connection: Any, generator: Generator, interrupt: Any, log: Any) -> None:
    def on_step(step: int, total: int, seconds: float) -> None:
        connection.send(("step", step, total, seconds, dict(generator.memory_stats())))

    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "generate":
                value: Any = [generator.generate(message[1][0], on_step, interrupt.is_set)]
            elif kind == "generate_batch":
                value = generator.generate_batch(message[1], on_step, interrupt.is_set)  # type: ignore[attr-defined]
            elif kind == "max_batch_size":
                value = generator.max_batch_size(message[1])  # type: ignore[attr-defined]
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as exc:
            if not isinstance(exc, I2vdError):
                log.error("generation_raised", exc_info=exc)
            connection.send(("error", to_wire(exc), dict(generator.memory_stats())))
            continue
        connection.send(("result", value, dict(generator.memory_stats())))

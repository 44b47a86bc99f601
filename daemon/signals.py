"""Signal handling that only sets flags (rq/dramatiq style): the main loop notices, logs and acts.

First SIGINT/SIGTERM/SIGHUP asks for a graceful stop (no new claims; the running job is interrupted between
denoising steps and released back to the queue). A second one asks for an immediate stop. SIGHUP is what a closed
terminal or a dropped SSH session sends to `i2vd run` in the foreground; its default action would end the process
on the spot, with a job half generated; under `nohup` (SIGHUP ignored when the daemon starts) it stays ignored.
(There is no reload: a new config needs a restart.)

The Python-level handler does nothing: the interpreter writes each signal's number to a wakeup pipe
(`signal.set_wakeup_fd`), and a reader thread turns the bytes into the two events. Setting a `threading.Event`
from the handler itself can deadlock: the handler runs in the main thread between two bytecodes, and when that
thread is inside the event's own `wait()` holding its condition's (non-reentrant) lock, `set()` waits for that
lock forever. A SIGTERM right after READY, while the main thread entered `wait`, hung a daemon that way until
SIGKILL (tests/unit/test_signals.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Counts stop signals; `stop_requested` and `force_requested` are what the service loops poll or wait on."""

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.force_requested = threading.Event()
        self._previous_wakeup_fd = -1
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install handlers and start the reader thread; only possible from the main thread."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # the interpreter drops a byte rather than block the main thread
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under `nohup`: the terminal's hangup was meant not to stop it
            self._previous[signum] = signal.signal(signum, _noted_by_wakeup_fd)
        threading.Thread(target=self._read, args=(read_end,), name="i2vd-signals", daemon=True).start()

    def uninstall(self) -> None:
        """The previous handlers and wakeup fd again (in-process callers, tests)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        write_end = signal.set_wakeup_fd(self._previous_wakeup_fd)
        if write_end >= 0:
            with contextlib.suppress(OSError):
                os.close(write_end)  # the reader sees end of file and ends

    def _read(self, read_end: int) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(read_end, 64):
                for signum in chunk:
                    if signum in STOP_SIGNALS:
                        self.note_stop_signal()
        os.close(read_end)

    def note_stop_signal(self) -> None:
        """One stop signal: the first asks for a graceful stop, any later one for an immediate stop."""
        if self.stop_requested.is_set():
            self.force_requested.set()
        self.stop_requested.set()


def _noted_by_wakeup_fd(signum: int, frame: FrameType | None) -> None:
    """Replaces the default action (exit) only; the wakeup pipe carries the signal to `StopSignals._read`."""

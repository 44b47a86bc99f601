"""One daemon per inbox: an exclusive `flock` on `<state_dir>/daemon.lock`, held for the service's life.

Why: a second `i2vd run` on the same inbox (a second unit, an operator's `run --once` beside the service) would
recover the first daemon's claimed jobs as its own and generate them twice. `flock` rather than a pid file: the
kernel drops the lock when the process dies, however it dies, so a crash never leaves a stale lock behind, and the
pid written into the file is only there to name the holder in the error. On NFS, `flock` is only as good as the
server's lock support (Linux maps it to NFS byte-range locks); a local state dir has no such caveat.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from daemon.errors import FatalError

LOCK_NAME = "daemon.lock"


class StateLock:
    def __init__(self, state_path: Path) -> None:
        self.path = state_path / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `FatalError` naming the daemon that holds it (never blocks)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # e.g. ELOOP: a symlink planted in the state dir is never followed
            raise FatalError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FatalError(
                f"another i2vd (pid {holder}) is already running on this inbox (lock {self.path}); "
                "stop it first, or give this one its own inbox and state_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise FatalError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the flock); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

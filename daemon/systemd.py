"""sd_notify(3) over the `$NOTIFY_SOCKET` datagram socket: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

The protocol is a stable, documented datagram format that systemd invites services to implement directly; doing
so avoids a dependency on libsystemd headers. Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.
Text is sent as UTF-8 (the `sdnotify` package's latin-1 drops non-Latin-1 file names silently), and `STATUS=` is
forced onto one line: a file name holding a newline must not smuggle in a `READY=1` or `WATCHDOG=1` of its own.
"""

from __future__ import annotations

import os
import socket


def single_line(text: str) -> str:
    """Control characters (newlines included) escaped as `\\xNN`: one protocol line, whatever the file name."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class SystemdNotifier:
    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        if path and path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace socket
        self._address = path or None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one datagram; False (never an exception) if systemd is not listening."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={single_line(status)}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={single_line(status)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float, status: str) -> bool:
        """Ask for `seconds` more before the current start/stop timeout fires (systemd >= 236 honours it)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={single_line(status)}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={single_line(status)}")


def watchdog_interval_seconds() -> float | None:
    """Half of `$WATCHDOG_USEC` (systemd's advice), or None when the watchdog is off or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000

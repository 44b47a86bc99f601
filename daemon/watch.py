"""Inbox watching with watchdog, as *hints* only: an event means "look at the inbox now", never "this file is new".

The truth is the periodic rescan in the service's intake loop, because watchdog loses events silently: inotify
queue overflows produce nothing, network filesystems deliver no events for other clients' writes, and an exception
in a handler kills the dispatcher thread for good (see docs/reliability-anchors §1). So this module:
- picks `PollingObserver` on network and FUSE filesystems (inotify would simply stay quiet there);
- falls back to polling when inotify cannot start (watch or instance limit reached);
- keeps its handler exception-proof, and reports the observer *and* its emitter threads in `is_alive()`, so the
  supervisor can restart a watcher that died quietly.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = structlog.get_logger(__name__)

ObserverMode = Literal["auto", "inotify", "polling"]
# inotify(7) sees only changes made through this kernel: on these, another client's writes raise no event.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs"})
# Errors that mean "inotify is unavailable here", not "the inbox is wrong": fall back to polling for these.
_INOTIFY_LIMIT_ERRORS = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSYS})
# A rename inside the inbox (`x.part` -> `x.png`) is a "moved" event; a move in from elsewhere is "created".
_HINT_EVENT_TYPES = frozenset({"created", "modified", "moved", "closed"})


def _unescape_mount_field(field: str) -> str:
    """/proc mount files escape space, tab, newline and backslash as octal (\\040 ...)."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _parse_mountinfo_line(line: str) -> tuple[str, str] | None:
    # id parent major:minor root MOUNTPOINT options [optional fields...] - FSTYPE source superoptions
    before, separator, after = line.partition(" - ")
    fields, tail = before.split(), after.split()
    if not separator or len(fields) < 5 or not tail:
        return None
    return _unescape_mount_field(fields[4]), tail[0]


def _read_mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount, in mount order; empty if /proc is unavailable."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            return [mount for mount in map(_parse_mountinfo_line, handle) if mount is not None]
    except OSError:
        pass
    try:
        with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as handle:
            return [(_unescape_mount_field(f[1]), f[2]) for f in (line.split() for line in handle) if len(f) >= 3]
    except OSError:
        return []


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (e.g. "ext4", "nfs4", "fuse.sshfs"), or "unknown".

    The longest mount point that contains the real path wins; among equals the last mounted (it shadows the rest).
    """
    real = os.path.realpath(path)
    best, best_type = -1, "unknown"
    for mount_point, fs_type in _read_mounts():
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best:
            best, best_type = len(mount_point), fs_type
    return best_type


def needs_polling(fs_type: str) -> bool:
    """True where inotify would miss changes: network filesystems and FUSE (sshfs, rclone, gcsfuse...)."""
    return fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse")


class _HintHandler(FileSystemEventHandler):
    """Turns interesting events into `on_hint()` calls and never lets an exception reach watchdog's dispatcher."""

    def __init__(self, on_hint: Callable[[], None]) -> None:
        super().__init__()
        self._on_hint = on_hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type in _HINT_EVENT_TYPES:
                self._on_hint()
        except Exception:
            # A raising handler would kill the dispatcher thread silently (watchdog #427, #793): log and carry on.
            log.exception("watch_hint_failed", event_type=event.event_type)


def _make_inotify_observer() -> BaseObserver:
    from watchdog.observers.inotify import InotifyObserver  # Linux only; imported where it is used

    observer: BaseObserver = InotifyObserver()
    return observer


class InboxWatcher:
    """Watches the inbox's top level and calls `on_hint` (cheap, thread-safe, e.g. `Event.set`) on changes.

    `start()` may be called again after `stop()` (or after the watcher died) to re-create the observer.
    """

    def __init__(
        self,
        inbox: Path,
        mode: ObserverMode,
        on_hint: Callable[[], None],
        polling_interval: float = 1.0,
    ) -> None:
        self.inbox = inbox
        self.mode = mode
        self.polling_interval = polling_interval
        self._handler = _HintHandler(on_hint)
        self._observer: BaseObserver | None = None
        self._mode_in_use = "none"
        self._lock = threading.Lock()

    @property
    def mode_in_use(self) -> str:
        """ "inotify" or "polling" once started ("none" before)."""
        return self._mode_in_use

    def _choose_polling(self) -> bool:
        if self.mode != "auto":
            return self.mode == "polling"
        fs_type = filesystem_type(self.inbox)
        if needs_polling(fs_type):
            log.info("watch_polling_chosen", filesystem=fs_type)
            return True
        return False

    def start(self) -> None:
        """Start watching; a limit error from inotify falls back to polling, any other error is raised."""
        with self._lock:
            if self._observer is not None and self._observer.is_alive():
                return
            if not self._choose_polling():
                try:
                    self._observer = self._start_observer(_make_inotify_observer())
                    self._mode_in_use = "inotify"
                    return
                except OSError as exc:
                    if exc.errno not in _INOTIFY_LIMIT_ERRORS:
                        raise
                    log.warning("watch_inotify_unavailable", error=str(exc), fallback="polling")
            self._observer = self._start_observer(PollingObserver(timeout=self.polling_interval))
            self._mode_in_use = "polling"

    def _start_observer(self, observer: BaseObserver) -> BaseObserver:
        try:
            observer.schedule(self._handler, os.fspath(self.inbox), recursive=False)
            observer.start()
        except BaseException:
            observer.stop()  # releases the inotify fd and its reader thread; join() would fail: never started
            raise
        return observer

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observer and wait at most `timeout` seconds for its threads."""
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer.is_alive():
            observer.join(timeout)
        if observer.is_alive():
            log.warning("watch_stop_timeout", timeout=timeout)

    def is_alive(self) -> bool:
        """True only if the dispatcher thread and every emitter thread (and inotify's reader) still run."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = list(observer.emitters)
        if not emitters or not all(emitter.is_alive() for emitter in emitters):
            return False
        # watchdog 7's InotifyObserver reads the inotify fd in its own thread; if it dies, no event arrives.
        reader = getattr(observer, "_inotify_fd", None)
        return not (isinstance(reader, threading.Thread) and not reader.is_alive())

"""Inbox watching with watchdog, as *hints* only: an event means "look at the inbox now", never "this file is new".

The truth is the periodic rescan in the service's intake loop, because watchdog loses events silently: inotify
queue overflows produce nothing, network filesystems deliver no events for other clients' writes, and an exception
in a handler kills the dispatcher thread for good (see docs/reliability-anchors §1). So this module:
- picks `PollingObserver` on network and FUSE filesystems (inotify would simply stay quiet there);
- falls back to polling when inotify cannot start (watch or instance limit reached);
- keeps its handler exception-proof, and reports the observer *and* its emitter threads in `is_alive()`, so the
  supervisor can restart a watcher that died quietly;
- notices an inbox that was deleted, renamed away or unmounted (its (device, inode) changed), which inotify
  reports at best once and a polling observer turns into a silent stop; `supervise()` re-creates the observer
  with a backoff, and refuses to watch the empty mount point left by an unmount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
import time
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
# statfs(2) f_type of the same families (linux/magic.h), for when /proc is not mounted or lies (containers).
NETWORK_FILESYSTEM_MAGICS = {
    0x6969: "nfs",
    0x517B: "smbfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x0BD00BD0: "lustre",
}
# Errors that mean "inotify is unavailable here", not "the inbox is wrong": fall back to polling for these.
_INOTIFY_LIMIT_ERRORS = frozenset({errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSYS})
# A rename inside the inbox (`x.part` -> `x.png`) is a "moved" event; a move in from elsewhere is "created".
_HINT_EVENT_TYPES = frozenset({"created", "modified", "moved", "closed"})
RESTART_BACKOFF_SECONDS = (0.5, 30.0)
"""First and longest wait between attempts to re-create a dead observer (doubling in between)."""


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


def _statfs_type(path: Path) -> int | None:
    """statfs(2)'s f_type for `path` (the first word of `struct statfs` on Linux), or None where unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        buffer = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120 on 64-bit Linux
        if libc.statfs(os.fsencode(path), buffer) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def network_filesystem(path: Path) -> str | None:
    """The network/FUSE filesystem holding `path` ("nfs4", "fuse.sshfs", "cifs"...), or None for a local one.

    Asks both /proc's mount table and statfs(2): either one naming a network or FUSE filesystem is enough.
    """
    fs_type = filesystem_type(path)
    if needs_polling(fs_type):
        return fs_type
    return NETWORK_FILESYSTEM_MAGICS.get(_statfs_type(path) or 0)


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self.mode = mode
        self.polling_interval = polling_interval
        self._handler = _HintHandler(on_hint)
        self._observer: BaseObserver | None = None
        self._mode_in_use = "none"
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        self._first_device: int | None = None
        self._clock = clock
        self._down_since: float | None = None
        self._next_try = 0.0
        self._backoff = RESTART_BACKOFF_SECONDS[0]

    @property
    def mode_in_use(self) -> str:
        """ "inotify" or "polling" once started ("none" before)."""
        return self._mode_in_use

    def _choose_polling(self) -> bool:
        if self.mode != "auto":
            return self.mode == "polling"
        fs_type = network_filesystem(self.inbox)
        if fs_type is not None:
            log.info("watch_polling_chosen", filesystem=fs_type)
            return True
        return False

    def _check_identity(self) -> tuple[int, int]:
        """The inbox's (device, inode); refuse a device other than the first start's (an unmounted share)."""
        identity = _identity(self.inbox)
        if self._first_device is not None and identity[0] != self._first_device:
            message = f"{self.inbox} is on another filesystem than at start: the share seems to be unmounted"
            raise OSError(errno.ENODEV, message, str(self.inbox))
        return identity

    def start(self) -> None:
        """Start watching; a limit error from inotify falls back to polling, any other error is raised."""
        with self._lock:
            if self._observer is not None and self._observer.is_alive():
                return
            self._identity = self._check_identity()
            if self._first_device is None:
                self._first_device = self._identity[0]
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
        if isinstance(reader, threading.Thread) and not reader.is_alive():
            return False
        try:
            return _identity(self.inbox) == self._identity  # deleted, renamed away, replaced or unmounted
        except OSError:
            return False

    def supervise(self) -> bool:
        """Call every supervision round: re-create a dead observer (backing off while that fails); True if up.

        Logs `watcher_down` once when watching stops, `watcher_restart_failed` per failed try, `watcher_recovered`
        once it works again. Meanwhile intake's periodic rescan still finds every file once the inbox is back.
        """
        if self.is_alive():
            self._recovered()
            return True
        now = self._clock()
        if self._down_since is None:
            log.error("watcher_down", inbox=str(self.inbox), mode=self._mode_in_use)
            self._down_since, self._next_try = now, now
        if now < self._next_try:
            return False
        self.stop(timeout=1.0)
        try:
            self.start()
        except OSError as exc:
            self._next_try = now + self._backoff
            log.warning("watcher_restart_failed", error=exc.strerror or str(exc), retry_in_seconds=self._backoff)
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_SECONDS[1])
            return False
        if not self.is_alive():
            return False
        self._recovered()
        return True

    def _recovered(self) -> None:
        if self._down_since is not None:
            down = round(self._clock() - self._down_since, 3)
            log.info("watcher_recovered", mode=self._mode_in_use, down_seconds=down)
        self._down_since = None
        self._backoff = RESTART_BACKOFF_SECONDS[0]

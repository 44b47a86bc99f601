"""The inbox watcher with real watchdog observers: events arrive as hints, failures do not kill it."""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import daemon.watch as watch_module
from daemon.watch import InboxWatcher, ObserverMode, filesystem_type, needs_polling, network_filesystem

pytestmark = pytest.mark.integration

TIMEOUT = 5.0


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., InboxWatcher]]:
    watchers: list[InboxWatcher] = []

    def make(inbox: Path, mode: ObserverMode, on_hint: Callable[[], None], **kwargs: Any) -> InboxWatcher:
        watcher = InboxWatcher(inbox, mode, on_hint, **kwargs)
        watchers.append(watcher)
        return watcher

    yield make
    for watcher in watchers:
        watcher.stop(timeout=TIMEOUT)


def test_creating_a_file_triggers_a_hint_with_inotify(
    tmp_path: Path, make_watcher: Callable[..., InboxWatcher]
) -> None:
    hinted = threading.Event()
    watcher = make_watcher(tmp_path, "inotify", hinted.set)
    watcher.start()
    assert watcher.mode_in_use == "inotify" and watcher.is_alive()
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


def test_a_rename_from_part_triggers_a_hint(tmp_path: Path, make_watcher: Callable[..., InboxWatcher]) -> None:
    (tmp_path / "cat.png.part").write_bytes(b"x")
    hinted = threading.Event()
    watcher = make_watcher(tmp_path, "inotify", hinted.set)
    watcher.start()
    os.rename(tmp_path / "cat.png.part", tmp_path / "cat.png")
    assert hinted.wait(TIMEOUT)


def test_a_move_in_from_outside_triggers_a_hint(tmp_path: Path, make_watcher: Callable[..., InboxWatcher]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "cat.png").write_bytes(b"x")
    hinted = threading.Event()
    make_watcher(inbox, "inotify", hinted.set).start()
    os.rename(tmp_path / "cat.png", inbox / "cat.png")
    assert hinted.wait(TIMEOUT)


def test_polling_mode_works(tmp_path: Path, make_watcher: Callable[..., InboxWatcher]) -> None:
    hinted = threading.Event()
    watcher = make_watcher(tmp_path, "polling", hinted.set, polling_interval=0.1)
    watcher.start()
    assert watcher.mode_in_use == "polling" and watcher.is_alive()
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_a_raising_hint_does_not_kill_the_watcher(
    tmp_path: Path, make_watcher: Callable[..., InboxWatcher], mode: ObserverMode
) -> None:
    calls: list[int] = []
    second_call = threading.Event()

    def on_hint() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug in the hint callback")
        second_call.set()

    watcher = make_watcher(tmp_path, mode, on_hint, polling_interval=0.1)
    watcher.start()
    (tmp_path / "first.png").write_bytes(b"x")
    deadline = time.monotonic() + TIMEOUT
    while not calls and time.monotonic() < deadline:
        second_call.wait(0.05)
    (tmp_path / "second.png").write_bytes(b"x")
    assert second_call.wait(TIMEOUT)
    assert watcher.is_alive()


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_stop_joins_quickly(tmp_path: Path, mode: ObserverMode) -> None:
    watcher = InboxWatcher(tmp_path, mode, lambda: None, polling_interval=0.5)
    watcher.start()
    started = time.monotonic()
    watcher.stop(timeout=TIMEOUT)
    assert time.monotonic() - started < 2.0
    assert not watcher.is_alive()
    watcher.stop()  # a second stop is harmless


def test_a_dead_emitter_is_reported_and_start_recreates_the_observer(tmp_path: Path) -> None:
    hinted = threading.Event()
    watcher = InboxWatcher(tmp_path, "inotify", hinted.set)
    watcher.start()
    try:
        observer = watcher._observer
        assert observer is not None
        for emitter in list(observer.emitters):
            emitter.stop()
            emitter.join(TIMEOUT)
        assert not watcher.is_alive()
        watcher.stop(timeout=TIMEOUT)
        watcher.start()
        assert watcher.is_alive()
        (tmp_path / "cat.png").write_bytes(b"x")
        assert hinted.wait(TIMEOUT)
    finally:
        watcher.stop(timeout=TIMEOUT)


def test_filesystem_type_of_tmp_path_is_sensible(tmp_path: Path) -> None:
    fs_type = filesystem_type(tmp_path)
    assert fs_type and fs_type != "unknown" and " " not in fs_type


def test_filesystem_type_picks_the_longest_mount_point(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = [("/", "ext4"), ("/mnt/share", "nfs4"), ("/mnt/share/local", "tmpfs"), ("/mnt/my share", "cifs")]
    monkeypatch.setattr(watch_module, "_read_mounts", lambda: mounts)
    assert filesystem_type(Path("/mnt/share/inbox")) == "nfs4"
    assert filesystem_type(Path("/mnt/share")) == "nfs4"
    assert filesystem_type(Path("/mnt/shared/inbox")) == "ext4"
    assert filesystem_type(Path("/mnt/share/local/x")) == "tmpfs"
    assert filesystem_type(Path("/mnt/my share/inbox")) == "cifs"


def test_mountinfo_lines_are_parsed_with_escapes() -> None:
    line = "36 35 98:0 /mnt1 /mnt/my\\040share rw,noatime master:1 - cifs //server/share rw,vers=3.0\n"
    assert watch_module._parse_mountinfo_line(line) == ("/mnt/my share", "cifs")
    assert watch_module._parse_mountinfo_line("garbage\n") is None


@pytest.mark.parametrize(
    ("fs_type", "polling"),
    [(name, True) for name in ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "fuse.sshfs", "fuseblk")]
    + [(name, False) for name in ("ext4", "xfs", "btrfs", "tmpfs", "overlay")],
)
def test_needs_polling(fs_type: str, polling: bool) -> None:
    assert needs_polling(fs_type) is polling


def test_auto_picks_polling_on_nfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_watcher: Callable[..., InboxWatcher]
) -> None:
    monkeypatch.setattr(watch_module, "filesystem_type", lambda path: "nfs4")
    hinted = threading.Event()
    watcher = make_watcher(tmp_path, "auto", hinted.set, polling_interval=0.1)
    watcher.start()
    assert watcher.mode_in_use == "polling"
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


def test_auto_picks_inotify_on_a_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_watcher: Callable[..., InboxWatcher]
) -> None:
    monkeypatch.setattr(watch_module, "filesystem_type", lambda path: "ext4")
    watcher = make_watcher(tmp_path, "auto", lambda: None)
    watcher.start()
    assert watcher.mode_in_use == "inotify"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EMFILE])
def test_inotify_limits_fall_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_watcher: Callable[..., InboxWatcher], code: int
) -> None:
    def exhausted() -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(watch_module, "_make_inotify_observer", exhausted)
    hinted = threading.Event()
    watcher = make_watcher(tmp_path, "inotify", hinted.set, polling_interval=0.1)
    watcher.start()
    assert watcher.mode_in_use == "polling" and watcher.is_alive()
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


def test_a_missing_inbox_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    watcher = InboxWatcher(tmp_path / "missing", "inotify", lambda: None)
    with pytest.raises(OSError):
        watcher.start()
    assert not watcher.is_alive()


@pytest.mark.parametrize(
    ("magic", "expected"), [(0x6969, "nfs"), (0xFE534D42, "smb2"), (0x65735546, "fuse"), (0xEF53, None)]
)
def test_statfs_magic_detects_network_filesystems(
    monkeypatch: pytest.MonkeyPatch, magic: int, expected: str | None
) -> None:
    """statfs(2)'s f_type decides even when the mount table looks local (containers may hide the real mount)."""
    monkeypatch.setattr(watch_module, "filesystem_type", lambda path: "overlay")
    monkeypatch.setattr(watch_module, "_statfs_type", lambda path: magic)
    assert network_filesystem(Path("/inbox")) == expected


def test_statfs_reads_the_real_filesystem_type(tmp_path: Path) -> None:
    """The ctypes statfs call works here: a local test directory is not reported as a network filesystem."""
    assert watch_module._statfs_type(tmp_path) not in (None, 0)
    assert network_filesystem(tmp_path) is None


def test_supervise_backs_off_while_the_inbox_is_missing_then_recovers(tmp_path: Path) -> None:
    """`supervise()` retries a dead watcher after 0.5 s, 1 s, 2 s ... (capped at 30 s), not on every call."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    now = [0.0]
    watcher = InboxWatcher(inbox, "polling", lambda: None, polling_interval=0.1, clock=lambda: now[0])
    watcher.start()
    try:
        os.rename(inbox, tmp_path / "gone")
        tries: list[float] = []
        real_start = watcher.start

        def counting_start() -> None:
            tries.append(now[0])
            real_start()

        watcher.start = counting_start  # type: ignore[method-assign]
        while now[0] < 200.0:
            assert not watcher.supervise()
            now[0] += 0.25
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(tries)]
        assert gaps[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] and max(gaps) == 30.0
        os.rename(tmp_path / "gone", inbox)
        now[0] += 30.0
        assert watcher.supervise() and watcher.is_alive()
    finally:
        watcher.stop(timeout=TIMEOUT)


def test_an_unmounted_share_is_not_watched_through_its_mount_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an unmount the inbox path still exists (the empty mount point) but on another device: simulated by
    `_identity` reporting a new device. The watcher reports itself dead and refuses to restart there."""
    watcher = InboxWatcher(tmp_path, "inotify", lambda: None)
    watcher.start()
    try:
        real = watch_module._identity(tmp_path)
        monkeypatch.setattr(watch_module, "_identity", lambda path: (real[0] + 1, 2))
        assert not watcher.is_alive()
        watcher.stop(timeout=TIMEOUT)
        with pytest.raises(OSError, match="unmounted") as caught:
            watcher.start()
        assert caught.value.errno == errno.ENODEV and not watcher.supervise()
    finally:
        watcher.stop(timeout=TIMEOUT)

"""Checklist group A (event detection, docs/reliability-anchors §7): watcher events are hints, the rescan is truth.

Intake is driven with a fake clock where timing is the point; the watcher runs real watchdog observers (inotify and
polling). Conditions this machine cannot produce (an NFS server, inotify limits, a queue overflow) are simulated at
the module boundary, as each docstring says.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from intake_helpers import SIDECAR, Harness, image_bytes, noise_image, reasons
from structlog.testing import capture_logs

import daemon.watch as watch_module
from daemon.config import DaemonConfig
from daemon.generate.base import GenerationRequest, GenerationResult, ModelInfo
from daemon.intake import Intake
from daemon.service import Service
from daemon.store import JobStore
from daemon.systemd import SystemdNotifier
from daemon.watch import InboxWatcher, ObserverMode

TIMEOUT = 10.0
JUNK = (".DS_Store", "._cat.png", "Thumbs.db", "desktop.ini", "~$cat.yaml", ".nfs0000000001", ".smbdelete0001")


@pytest.fixture
def watchers() -> Iterator[Callable[..., InboxWatcher]]:
    made: list[InboxWatcher] = []

    def make(inbox: Path, mode: ObserverMode, on_hint: Callable[[], None], **kwargs: Any) -> InboxWatcher:
        watcher = InboxWatcher(inbox, mode, on_hint, **kwargs)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.stop(timeout=TIMEOUT)


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class StubGenerator:
    """No job reaches generation in these service tests; a call would be a test failure."""

    info = ModelInfo(model_id="stub", revision=None, device="cpu", dtype="float32", load_seconds=0.01)

    def generate(
        self, request: GenerationRequest, on_step: object = None, should_interrupt: object = None
    ) -> GenerationResult:
        raise AssertionError("no job is generated in these tests")

    def memory_stats(self) -> Mapping[str, int]:
        return {}


# ----- A1 ---------------------------------------------------------------------------------------------------------
def test_a1_backlog_at_start_is_processed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist A1: 50 pairs already in the inbox before start are all claimed by the initial scans, none twice.
    (fsync is a no-op here to keep the test fast; durability has its own tests.)"""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for index in range(50):
        (inbox / f"pair{index:02d}.png").write_bytes(image_bytes())
        (inbox / f"pair{index:02d}.yaml").write_bytes(SIDECAR)
    harness = Harness(inbox)
    result = harness.settle()
    assert sorted(job.stem for job in result.accepted) == [f"pair{index:02d}" for index in range(50)]
    assert len({job.job_id for job in result.accepted}) == 50 and result.rejected == []
    for _ in range(3):
        again = harness.poll(harness.stable)
        assert (again.accepted, again.rejected, again.waiting) == ([], [], 0)
    assert harness.store.counts() == {"claimed": 50, "done": 0, "failed": 0, "not_removed": 0}


# ----- A2, A3 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "limit"), [(errno.ENOSPC, "watch"), (errno.EMFILE, "instance")])
def test_a2_a3_inotify_limits_fall_back_to_polling_with_a_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: Callable[..., InboxWatcher], code: int, limit: str
) -> None:
    """Checklist A2 (watch limit, ENOSPC) and A3 (instance limit, EMFILE): simulated by making the inotify observer
    raise what watchdog's `inotify_c` raises at those limits; the watcher falls back to polling, says so in the log,
    and files dropped meanwhile are seen by the polling observer."""

    def exhausted() -> None:
        raise OSError(code, f"inotify {limit} limit reached")

    monkeypatch.setattr(watch_module, "_make_inotify_observer", exhausted)
    hinted = threading.Event()
    watcher = watchers(tmp_path, "auto", hinted.set, polling_interval=0.1)
    with capture_logs() as logs:
        watcher.start()
    assert watcher.mode_in_use == "polling" and watcher.is_alive()
    (fallback,) = [entry for entry in logs if entry["event"] == "watch_inotify_unavailable"]
    assert fallback["fallback"] == "polling" and limit in fallback["error"]
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


def test_a2_service_still_sends_ready_and_exports_the_polling_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist A2: with inotify exhausted (simulated ENOSPC), the service starts anyway: READY=1 is sent and the
    `i2vd_watcher_mode{mode="polling"}` metric is 1."""

    def exhausted() -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watch_module, "_make_inotify_observer", exhausted)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(TIMEOUT)
    config = DaemonConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", metrics={"enabled": False})
    service = Service(
        config, notifier=SystemdNotifier(str(tmp_path / "notify.sock")), generator_factory=lambda c: StubGenerator()
    )
    try:
        service.start()
        messages: list[bytes] = []
        while not any(b"READY=1" in message for message in messages):
            messages.append(sock.recv(4096))
        registry = service.metrics.registry
        assert registry.get_sample_value("i2vd_watcher_mode", {"mode": "polling"}) == 1
        assert registry.get_sample_value("i2vd_watcher_mode", {"mode": "inotify"}) == 0
        assert registry.get_sample_value("i2vd_watcher_up") == 1
    finally:
        service.stop(timeout=5)
        sock.close()


# ----- A4 ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a4_queue_overflow_loses_nothing_because_the_rescan_is_the_truth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist A4: an inotify queue overflow makes watchdog drop every event silently (watchdog #654), so it is
    simulated here by no events at all: 2,000 files (1,000 pairs) dropped at once are all claimed by the periodic
    rescans alone. (An overflow counter is not possible: watchdog discards IN_Q_OVERFLOW before any callback could
    see it.) fsync is a no-op here to keep the test fast; durability has its own tests."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    inbox = tmp_path / "inbox"
    harness = Harness(inbox, stable_seconds=0.5)
    for index in range(1000):
        harness.drop_pair(f"p{index:04d}")
    accepted = []
    for _ in range(3):  # three rescan periods, no hint in between
        accepted += harness.poll(harness.config.intake.rescan_seconds).accepted
    assert len(accepted) == 1000 and len({job.stem for job in accepted}) == 1000
    assert not any(inbox.glob("*.png")) and not any(inbox.glob("*.yaml"))


# ----- A5 ---------------------------------------------------------------------------------------------------------
def test_a5_network_inbox_is_polled_and_needs_no_close_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: Callable[..., InboxWatcher]
) -> None:
    """Checklist A5: an NFS inbox (simulated: statfs reports NFS_SUPER_MAGIC while the mount table looks local) is
    watched by polling, which sees writes whatever client made them; intake itself never waits for a close event
    (a plain rescan finds and claims the pair after the stability window)."""
    monkeypatch.setattr(watch_module, "filesystem_type", lambda path: "ext4")
    monkeypatch.setattr(watch_module, "_statfs_type", lambda path: 0x6969)
    hinted = threading.Event()
    watcher = watchers(tmp_path / "inbox", "auto", hinted.set, polling_interval=0.1)
    harness = Harness(tmp_path / "inbox")
    with capture_logs() as logs:
        watcher.start()
    assert watcher.mode_in_use == "polling"
    assert {"event": "watch_polling_chosen", "filesystem": "nfs", "log_level": "info"} in logs
    harness.drop_pair()
    assert hinted.wait(TIMEOUT)
    assert len(harness.settle().accepted) == 1


# ----- A6 ---------------------------------------------------------------------------------------------------------
def test_a6_share_outage_marks_the_watcher_down_then_recovers_and_loses_nothing(
    tmp_path: Path, watchers: Callable[..., InboxWatcher]
) -> None:
    """Checklist A6: the share becomes unreachable (simulated by moving the inbox away, which makes the polling
    observer's snapshot raise OSError exactly as a dead SMB share does; watchdog then stops the emitter for good,
    watchdog #1065). `supervise()` reports it down (the service exports that as `watcher_up` 0), retries with a
    backoff, re-creates the observer when the share is back; intake reports the inbox unavailable meanwhile,
    writes nothing, and processes the pair added on the server during the outage."""
    inbox, away = tmp_path / "inbox", tmp_path / "server-side"
    harness = Harness(inbox)
    hinted = threading.Event()
    clock_now = [0.0]
    watcher = watchers(inbox, "polling", hinted.set, polling_interval=0.1, clock=lambda: clock_now[0])
    watcher.start()
    assert watcher.supervise()
    os.rename(inbox, away)
    assert wait_until(lambda: not watcher.is_alive())
    with capture_logs() as logs:
        assert not watcher.supervise()  # first try fails at once
        assert not watcher.supervise()  # backing off: no new attempt yet
        clock_now[0] += 0.5
        assert not watcher.supervise()  # second try fails, the wait doubles
        result = harness.poll(harness.stable)
    events = [entry["event"] for entry in logs]
    assert events.count("watcher_down") == 1 and events.count("watcher_restart_failed") == 2
    assert not result.inbox_available and events.count("inbox_unavailable") == 1
    assert not inbox.exists()  # nothing was created in place of the missing inbox
    (away / "late.png").write_bytes(image_bytes())  # written on the server while we could not see it
    (away / "late.yaml").write_bytes(SIDECAR)
    os.rename(away, inbox)
    clock_now[0] += 1.0
    with capture_logs() as logs:
        assert watcher.supervise()
    assert [entry["event"] for entry in logs] == ["watcher_recovered"]
    assert [job.stem for job in harness.settle().accepted] == ["late"]


# ----- A7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_a7_handler_exception_and_undecodable_names_never_kill_dispatch(
    tmp_path: Path, watchers: Callable[..., InboxWatcher], mode: ObserverMode
) -> None:
    """Checklist A7: the hint callback raises (an injected bug) on the event of a file whose name is not UTF-8;
    the exception is logged and the next file still produces a hint (the dispatcher thread is alive)."""
    calls: list[int] = []
    second = threading.Event()

    def on_hint() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected bug in the hint callback")
        second.set()

    watcher = watchers(tmp_path, mode, on_hint, polling_interval=0.1)
    watcher.start()
    with capture_logs() as logs:
        (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")
        assert wait_until(lambda: bool(calls))
    assert any(entry["event"] == "watch_hint_failed" for entry in logs)
    (tmp_path / "next.png").write_bytes(b"x")
    assert second.wait(TIMEOUT) and watcher.is_alive()


# ----- A8 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["emitter", "dispatcher"])
def test_a8_a_dead_observer_thread_is_noticed_and_recreated(
    tmp_path: Path, watchers: Callable[..., InboxWatcher], victim: str
) -> None:
    """Checklist A8: stop the emitter thread, or the dispatcher thread, behind the watcher's back: `is_alive()`
    turns False at once and `supervise()` re-creates the observer; events flow again."""
    hinted = threading.Event()
    watcher = watchers(tmp_path, "inotify", hinted.set)
    watcher.start()
    observer = watcher._observer
    assert observer is not None
    threads = list(observer.emitters) if victim == "emitter" else [observer]
    for thread in threads:
        thread.stop()
        thread.join(TIMEOUT)
    assert not watcher.is_alive()
    with capture_logs() as logs:
        assert watcher.supervise()
    assert [entry["event"] for entry in logs] == ["watcher_down", "watcher_recovered"]
    assert watcher._observer is not observer
    (tmp_path / "cat.png").write_bytes(b"x")
    assert hinted.wait(TIMEOUT)


# ----- A9 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "renamed_away"])
def test_a9_inbox_deleted_or_renamed_away_then_recreated(
    tmp_path: Path, watchers: Callable[..., InboxWatcher], how: str
) -> None:
    """Checklist A9: the inbox is deleted (or renamed away, which inotify keeps watching under its new name) and a
    new one made: the watcher notices the new (device, inode), re-arms on the new directory, and intake recreates
    its state folders there and claims the pair dropped into it."""
    inbox = tmp_path / "inbox"
    harness = Harness(inbox)
    hinted = threading.Event()
    watcher = watchers(inbox, "inotify", hinted.set)
    watcher.start()
    if how == "deleted":
        shutil.rmtree(inbox)
    else:
        os.rename(inbox, tmp_path / "old-inbox")
    inbox.mkdir()
    assert wait_until(lambda: not watcher.is_alive())
    assert watcher.supervise()
    hinted.clear()
    harness.drop_pair("fresh")
    assert hinted.wait(TIMEOUT)
    with capture_logs() as logs:
        result = harness.settle()
    assert [job.stem for job in result.accepted] == ["fresh"]
    assert (inbox / ".i2vd" / "jobs").is_dir() and (inbox / "failed").is_dir()
    assert "inbox_state_recreated" in [entry["event"] for entry in logs]


def test_a9_service_rearms_the_watcher_after_the_inbox_is_recreated(tmp_path: Path) -> None:
    """Checklist A9, through the service's own supervision: `watcher_up` drops to 0 while the inbox is gone and
    returns to 1 once it is back; a pair dropped into the new inbox is processed (here: rejected for an unknown
    sidecar key, so no model run is needed to see it handled)."""
    config = DaemonConfig(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        metrics={"enabled": False},
        intake={"stable_seconds": 0.1, "rescan_seconds": 0.2},
    )
    service = Service(config, notifier=SystemdNotifier(""), generator_factory=lambda c: StubGenerator())
    service.start()
    loop = threading.Thread(target=service.run_until_stopped, daemon=True)
    loop.start()
    registry = service.metrics.registry
    try:
        os.rename(config.inbox, tmp_path / "trash")  # `rm -rf` as one step: the daemon writes into the inbox too
        shutil.rmtree(tmp_path / "trash")
        assert wait_until(lambda: registry.get_sample_value("i2vd_watcher_up") == 0)
        config.inbox.mkdir()
        assert wait_until(lambda: registry.get_sample_value("i2vd_watcher_up") == 1)
        (config.inbox / "bad.png").write_bytes(image_bytes())
        (config.inbox / "bad.yaml").write_bytes(b"prompt: x\ncolour: blue\n")
        reason = config.inbox / "failed" / "bad" / "reason.json"
        assert wait_until(reason.exists)
        assert service.health()["watcher"] and service.health()["intake"]
    finally:
        service.request_stop()
        loop.join(timeout=TIMEOUT)


# ----- A10 --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a10_slow_chunked_write_gives_exactly_one_job_after_the_last_write(
    tmp_path: Path, watchers: Callable[..., InboxWatcher]
) -> None:
    """Checklist A10: an image written in 100-byte chunks with a flush each, over about 3 s (real time, real
    inotify watcher sending its duplicate created/modified/closed events), while intake polls on every hint:
    exactly one job, claimed only after the last write."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = DaemonConfig(inbox=inbox, outbox=tmp_path / "outbox", intake={"stable_seconds": 0.5})
    intake = Intake(config, JobStore(inbox, config.state_path))
    hint = threading.Event()
    hints: list[int] = []

    def on_hint() -> None:
        hints.append(1)
        hint.set()

    watchers(inbox, "inotify", on_hint).start()
    claimed: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            claimed.extend((time.monotonic(), job.stem) for job in intake.poll().accepted)
            hint.wait(0.1)
            hint.clear()

    poller = threading.Thread(target=loop, daemon=True)
    poller.start()
    (inbox / "cat.yaml").write_bytes(SIDECAR)
    data = noise_image((48, 48))
    pause = 3.0 / (len(data) / 100)
    with (inbox / "cat.png").open("wb") as handle:
        for offset in range(0, len(data), 100):
            handle.write(data[offset : offset + 100])
            handle.flush()
            time.sleep(pause)
        last_write = time.monotonic()
    assert wait_until(lambda: bool(claimed))
    time.sleep(0.6)
    stop.set()
    poller.join(TIMEOUT)
    assert [stem for _, stem in claimed] == ["cat"]
    assert claimed[0][0] >= last_write + config.intake.stable_seconds - 0.05
    assert len(hints) > 10  # many events for one file: still one job


# ----- A11, A12 ---------------------------------------------------------------------------------------------------
def test_a11_part_file_renamed_inside_the_inbox_is_processed_once(tmp_path: Path) -> None:
    """Checklist A11: `a.png.part` is ignored while written; after the rename to `a.png` (a `moved` event whose
    dest_path is the real name: intake rescans, so it never depends on that) the pair is claimed once."""
    harness = Harness(tmp_path / "inbox")
    harness.drop("a.yaml", SIDECAR)
    harness.drop("a.png.part", image_bytes())
    for _ in range(3):
        assert harness.poll(harness.stable).accepted == []
    os.rename(harness.inbox / "a.png.part", harness.inbox / "a.png")
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["a"]
    assert harness.poll(harness.stable).accepted == [] and not list(harness.inbox.glob("a.*"))


def test_a12_move_in_from_outside_is_processed_after_stability(
    tmp_path: Path, watchers: Callable[..., InboxWatcher]
) -> None:
    """Checklist A12: files renamed into the inbox from elsewhere on the same filesystem arrive as `created`
    events with no close event; they still produce a hint and are claimed once the window has passed."""
    harness = Harness(tmp_path / "inbox")
    hinted = threading.Event()
    watchers(harness.inbox, "inotify", hinted.set).start()
    outside = tmp_path / "staging"
    outside.mkdir()
    (outside / "m.png").write_bytes(image_bytes())
    (outside / "m.yaml").write_bytes(SIDECAR)
    os.rename(outside / "m.png", harness.inbox / "m.png")
    os.rename(outside / "m.yaml", harness.inbox / "m.yaml")
    assert hinted.wait(TIMEOUT)
    first = harness.poll()
    assert first.accepted == [] and first.settling == 1
    assert [job.stem for job in harness.poll(harness.stable).accepted] == ["m"]


# ----- A13 --------------------------------------------------------------------------------------------------------
def test_a13_junk_files_are_ignored_and_not_counted_as_failures(tmp_path: Path) -> None:
    """Checklist A13: OS and sync-tool junk (.DS_Store, AppleDouble, Thumbs.db, desktop.ini, Office locks, NFS and
    SMB silly-renames, Synology @eaDir/) is left alone: no job, no failure, nothing waiting."""
    harness = Harness(tmp_path / "inbox")
    for name in JUNK:
        harness.drop(name, image_bytes())
    (harness.inbox / "@eaDir").mkdir()
    (harness.inbox / "@eaDir" / "cat.png").write_bytes(image_bytes())
    harness.drop_pair("real")
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["real"] and reasons(result) == []
    later = harness.poll(3600)
    assert (later.accepted, later.rejected, later.waiting) == ([], [], 0)
    assert all((harness.inbox / name).exists() for name in JUNK)
    assert harness.store.counts()["failed"] == 0

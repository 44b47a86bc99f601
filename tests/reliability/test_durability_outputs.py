"""Output durability (reliability-anchors.md §7, group D): the final name appears only by rename of a complete,
fsynced file; a full disk or a failed fsync leaves no partial output; NFS renames reported failed are reconciled.

A small loopback or tmpfs filesystem needs root here, so ENOSPC and EIO are injected at the `os` boundary
(`os.write`, `os.fsync`, the rename syscall wrapper) the way the kernel would report them.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from publish_helpers import KILL_AT_CALL, outbox_names, stage_files

from daemon import fsio
from daemon import publish as publish_module
from daemon.errors import OutputLost, StorageFull, TransientJobError
from daemon.publish import STAGING_DIR_NAME, STAGING_LOCK_NAME, Publisher

FIXED = datetime(2026, 11, 25, 8, 30, 0)
BASE = "video_20261125_083000_cat"


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    directory = tmp_path / "outbox"
    directory.mkdir()
    return directory


@pytest.fixture
def publisher(outbox: Path) -> Publisher:
    return Publisher(outbox, now=lambda: FIXED)


class Recorder:
    """Records, in order, every fsync (by the path behind the fd), rename and file creation under the outbox."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, outbox: Path) -> None:
        self.events: list[tuple[str, str]] = []
        self.outbox = outbox
        real_fsync, real_open, real_rename = os.fsync, os.open, fsio._rename_noreplace_syscall
        real_link, real_replace = os.link, os.replace

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_CREAT:
                self.events.append(("create", os.fspath(path)))
            return real_open(path, flags, *args, **kwargs)

        def rename(src: Path, dst: Path) -> bool | None:
            done = real_rename(src, dst)
            self.events.append(("rename", os.fspath(dst)))
            return done

        def link(src: Any, dst: Any, **kwargs: Any) -> None:
            real_link(src, dst, **kwargs)
            self.events.append(("rename", os.fspath(dst)))  # link+unlink: the fallback no-clobber rename

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            real_replace(src, dst, **kwargs)
            self.events.append(("rename", os.fspath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(fsio, "_rename_noreplace_syscall", rename)

    def index(self, kind: str, path: str) -> int:
        return self.events.index((kind, path))


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "link-fallback"])
def test_final_names_appear_only_by_rename_after_fsync_and_before_dir_fsync(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch, noreplace: bool
) -> None:
    """Checklist D27: with os.fsync/os.open/rename instrumented, every published name (outputs and manifest) is
    created only by a rename (never opened with O_CREAT), after an fsync of its content and before an fsync of
    the outbox directory. Both the renameat2 path and the link fallback (NFS, FUSE) are checked."""
    if not noreplace:
        monkeypatch.setattr(fsio, "_renameat2", None)
    files = stage_files(publisher, {".mp4": b"main video", ".first_frame.png": b"png"})
    recorder = Recorder(monkeypatch, outbox)
    published = publisher.publish(BASE, files, {"job": "j"})
    events = recorder.events
    assert [p.name for p in published] == [f"{BASE}.mp4", f"{BASE}.first_frame.png", f"{BASE}.json"]
    created = {path for kind, path in events if kind == "create"}
    for path in published:
        assert str(path) not in created, f"{path.name} was opened for writing under its final name"
        renamed_at = recorder.index("rename", str(path))
        content_synced = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and Path(p).name != "outbox"]
        assert any(i < renamed_at for i in content_synced)
        dir_synced = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and p == str(outbox)]
        assert any(i > renamed_at for i in dir_synced), f"no fsync of the outbox after {path.name}"
    # The staged files themselves were fsynced before the first rename.
    first_rename = recorder.index("rename", str(published[0]))
    staged_synced = [p for kind, p in events[:first_rename] if kind == "fsync"]
    assert {str(f) for f, _ in files} <= set(staged_synced)
    assert published[0].read_bytes() == b"main video"


@pytest.mark.parametrize("where", ["write", "fsync", "close", "rename"])
def test_disk_full_while_publishing_leaves_nothing_and_raises_storage_full(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Checklist D28: ENOSPC at the manifest's write, fsync or close, or at a rename, raises `StorageFull` (a
    `TransientJobError` that does not consume an attempt), removes the temp file and leaves no output in the
    outbox; the staged outputs stay for the retry, which succeeds once space returns. Injected (no root for a
    loopback fs)."""
    files = stage_files(publisher, {".mp4": b"main"})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real = {"write": os.write, "fsync": os.fsync, "close": os.close, "rename": fsio._rename_noreplace_syscall}
    manifest_fds: set[int] = set()
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if "manifest-" in os.fspath(path):
            manifest_fds.add(fd)
        return fd

    def failing(*args: Any) -> Any:
        if where == "rename" or args[0] in manifest_fds:
            if where == "close":  # the descriptor is gone, the error reported late (NFS does this)
                real["close"](args[0])
                manifest_fds.discard(args[0])
            raise full
        return real[where](*args)

    monkeypatch.setattr(os, "open", open_)
    if where == "rename":
        monkeypatch.setattr(fsio, "_rename_noreplace_syscall", failing)
    else:
        monkeypatch.setattr(os, where, failing)
    with pytest.raises(StorageFull) as raised:
        publisher.publish(BASE, files, {"job": "j"})
    assert isinstance(raised.value, TransientJobError)
    assert StorageFull.consumes_attempt is False
    assert outbox_names(outbox) == []
    staging = outbox / STAGING_DIR_NAME
    assert not [p.name for p in staging.iterdir() if p.name.startswith(".manifest")]  # no temp manifest left
    assert files[0][0].read_bytes() == b"main"
    monkeypatch.undo()
    assert [p.name for p in publisher.publish(BASE, files, {"job": "j"})] == [f"{BASE}.mp4", f"{BASE}.json"]


def test_fsync_eio_on_the_manifest_rewrites_it_from_scratch_never_fsyncs_twice(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist D29: the first fsync of the manifest fails with EIO. The publisher never calls fsync again on
    that file (fsyncgate: a second fsync may "succeed" with the data gone); it discards the file and writes a
    new one from scratch, which is what gets published."""
    files = stage_files(publisher, {".mp4": b"main"})
    real_fsync = os.fsync
    synced: list[str] = []  # the (unique temp) path of every file fsync was called on
    failed: list[str] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(path)
        if not failed and "manifest-" in path:
            failed.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    published = publisher.publish(BASE, files, {"job": "j"})
    (bad,) = failed
    assert synced.count(bad) == 1, "fsync was retried on the file whose fsync failed"
    assert not Path(bad).exists()
    rewritten = [path for path in synced if "manifest-" in path and path != bad]
    assert len(rewritten) == 1
    assert b'"job": "j"' in published[-1].read_bytes()


def test_an_output_that_cannot_be_moved_back_after_a_failed_delivery_is_removed_not_left_visible(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second output's rename fails, and moving the first one back to staging fails too: the first is
    removed from the outbox (the retry writes it again), so no part of a set is left visible without a
    manifest."""
    files = stage_files(publisher, {".mp4": b"main", ".png": b"png"})
    real_rename_noreplace, real_rename = fsio._rename_noreplace_syscall, os.rename
    calls = {"n": 0}

    def rename_noreplace(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename_noreplace(*args)

    def rename(source: Any, target: Any) -> None:
        if str(source).startswith(str(outbox / BASE)):  # a move back into staging
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(source, target)

    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", rename_noreplace)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(TransientJobError):
        publisher.publish(BASE, files, {"job": "j"})
    assert outbox_names(outbox) == []


def test_an_fsync_error_after_the_manifest_got_its_name_keeps_the_set_published(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory fsync after the manifest's rename fails. The set is complete for readers by then (and the
    outputs' names were made durable before the manifest), so nothing is moved back: taking the outputs away
    would leave a manifest without its files, which recovery would then trust."""
    files = stage_files(publisher, {".mp4": b"main", ".png": b"png"})
    real_fsync_dir = publish_module.fsync_dir

    def fsync_dir(directory: Path) -> None:
        if (directory / f"{BASE}.json").exists():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_dir(directory)

    monkeypatch.setattr(publish_module, "fsync_dir", fsync_dir)
    published = publisher.publish(BASE, files, {"job": "j"})
    assert [path.name for path in published] == [f"{BASE}.mp4", f"{BASE}.png", f"{BASE}.json"]
    assert outbox_names(outbox) == sorted(path.name for path in published)
    assert (outbox / f"{BASE}.mp4").read_bytes() == b"main"


def test_fsync_eio_on_a_staged_output_discards_it_for_a_rewrite(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist D29: an fsync EIO on a staged video means its pages may be gone: the file is deleted (not
    fsynced again) and `OutputLost` (transient) makes the job write it again from scratch; nothing is
    published."""
    files = stage_files(publisher, {".mp4": b"main", ".gif": b"gif"})
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(name)
        if name.endswith("out.gif"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputLost):
        publisher.publish(BASE, files, {})
    assert sum(name.endswith("out.gif") for name in calls) == 1
    assert not files[1][0].exists()
    assert outbox_names(outbox) == []


def test_atomic_state_write_rewrites_after_fsync_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist D29 for the daemon's own state (job.json): EIO at fsync -> a fresh temp file, never a retried
    fsync; two EIOs in a row -> the error goes up and the old content is intact."""
    target = tmp_path / "job.json"
    target.write_bytes(b"old")
    real_fsync = os.fsync
    paths: list[str] = []
    failures = {"left": 1}

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert len(paths) == 2 and paths[0] != paths[1]  # the rewrite is a new file, not a second fsync
    failures["left"] = 2
    with pytest.raises(OSError, match="Input/output"):
        fsio.atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_nfs_rename_reported_failed_but_done_is_reconciled(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist D32: simulated NFS retransmission (no NFS server here): the rename happens on the server but
    the client sees an error. Source gone + target holding the same bytes counts as done: published once, no
    duplicate `-2` set, no error."""
    files = stage_files(publisher, {".mp4": b"main", ".gif": b"gif"})
    real_rename = fsio._rename_noreplace_syscall

    def lossy_reply(src: Path, dst: Path) -> bool | None:
        real_rename(src, dst)
        raise OSError(errno.ENOENT, "reply lost; retransmitted RENAME found no source", str(src))

    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", lossy_reply)
    published = publisher.publish(BASE, files, {"job": "j"})
    assert [p.name for p in published] == [f"{BASE}.mp4", f"{BASE}.gif", f"{BASE}.json"]
    assert outbox_names(outbox) == sorted(p.name for p in published)
    assert published[0].read_bytes() == b"main"


def test_nfs_link_fallback_reported_eexist_for_our_own_link_is_reconciled(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist D32 on the link fallback (filesystems without RENAME_NOREPLACE): a retransmitted LINK answers
    EEXIST although the first one made our link; same inode under both names -> done, source unlinked."""
    monkeypatch.setattr(fsio, "_renameat2", None)
    files = stage_files(publisher, {".mp4": b"main"})
    real_link = os.link

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        real_link(src, dst, **kwargs)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))

    monkeypatch.setattr(os, "link", link)
    published = publisher.publish(BASE, files, {})
    assert [p.name for p in published] == [f"{BASE}.mp4", f"{BASE}.json"]
    assert not files[0][0].exists()


def test_a_failed_rename_whose_target_holds_other_bytes_is_not_mistaken_for_success(tmp_path: Path) -> None:
    """Checklist D32, the other side: if the source is gone but the target holds different bytes, the error
    stands (someone else's file is never claimed as ours)."""
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"ours")
    target.write_bytes(b"theirs")
    assert fsio.rename_no_replace(source, target) is False
    assert target.read_bytes() == b"theirs" and source.read_bytes() == b"ours"


def test_sweep_staging_removes_what_a_crash_left(publisher: Publisher, outbox: Path) -> None:
    """Checklist C20 (store side, outbox half): half-written outputs and temp manifests of a killed run are swept
    at start, so nothing stale is ever published and the outbox holds no temp files."""
    stage_files(publisher, {".mp4": b"half"}, job_id="killed-job")
    (outbox / STAGING_DIR_NAME / ".manifest-x.tmp-1").write_bytes(b"{")
    assert publisher.sweep_staging() == 2
    assert list((outbox / STAGING_DIR_NAME).iterdir()) == []
    assert Publisher(outbox / "missing").sweep_staging() == 0


def test_a_daemon_never_sweeps_the_staging_of_another_publishing_into_the_same_outbox(outbox: Path) -> None:
    """Two daemons (each its own inbox and state folder) may publish into one outbox. The staging sweep at start
    removes what earlier runs left only while no other daemon uses the outbox: a second daemon starting while
    the first one stages a job leaves that job's files alone; a start with the outbox to itself sweeps."""
    first = Publisher(outbox)
    first_fd, swept = first.share_staging()
    assert swept == 0
    staged = first.staging_dir("job-of-the-first") / "main.mp4"
    staged.write_bytes(b"being written")
    second_fd, swept = Publisher(outbox).share_staging()
    assert swept is None and staged.read_bytes() == b"being written"
    os.close(first_fd)
    os.close(second_fd)
    third_fd, swept = Publisher(outbox).share_staging()  # alone now: what is left is from runs that ended
    try:
        assert swept == 1 and not staged.exists()
        assert [p.name for p in (outbox / STAGING_DIR_NAME).iterdir()] == [STAGING_LOCK_NAME]
    finally:
        os.close(third_fd)


KILL_CHILD = (
    """\
import os, signal, sys
from pathlib import Path
from daemon import fsio
from daemon.publish import Publisher
outbox, kill_at = Path(sys.argv[1]), int(sys.argv[2])
publisher = Publisher(outbox)
staging = publisher.staging_dir("job1")
(staging / "a.mp4").write_bytes(b"M" * 200_000)
(staging / "b.png").write_bytes(b"P" * 50_000)
"""
    + KILL_AT_CALL
    + """\
os.fsync = step(os.fsync)
os.write = step(os.write)
fsio._rename_noreplace_syscall = step(fsio._rename_noreplace_syscall)
publisher.publish("video_x_cat", [(staging / "a.mp4", ".mp4"), (staging / "b.png", ".png")], {"job_id": "job1"})
print(calls[0])
"""
)


@pytest.mark.slow
def test_kill_9_at_every_publish_step_leaves_no_output_or_a_complete_one(tmp_path: Path) -> None:
    """Checklist D27: a real `kill -9` of a publishing process before each of its fsync, write and rename calls in
    turn. After every kill, each name visible in the outbox holds its complete content (never 0 bytes, never a
    part), and the manifest, when visible, comes with every output it lists. The staging sweep at the next start
    leaves no temp file."""
    repo = Path(__file__).resolve().parents[2]
    expected = {"video_x_cat.mp4": b"M" * 200_000, "video_x_cat.png": b"P" * 50_000}
    clean = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(tmp_path / "clean"), "0"], cwd=repo, capture_output=True, check=True
    )
    steps = int(clean.stdout)
    assert steps >= 6
    for kill_at in range(1, steps + 1):
        outbox = tmp_path / f"kill{kill_at}"
        done = subprocess.run([sys.executable, "-c", KILL_CHILD, str(outbox), str(kill_at)], cwd=repo, timeout=60)
        assert done.returncode == -9
        names = outbox_names(outbox)
        for name in names:
            data = (outbox / name).read_bytes()
            if name.endswith(".json"):
                assert json.loads(data) == {"job_id": "job1"}
                assert set(expected) <= set(names), f"manifest visible without its outputs (kill at {kill_at})"
            else:
                assert data == expected[name], f"partial {name} after kill at step {kill_at}"
        Publisher(outbox).sweep_staging()
        assert list((outbox / STAGING_DIR_NAME).iterdir()) == []

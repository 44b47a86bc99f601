"""The publisher: outbox naming, no-clobber delivery, manifest last, nothing partial left behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from publish_helpers import outbox_names, stage_files

from daemon import fsio
from daemon.errors import OutputLost, StorageFull
from daemon.publish import STAGING_DIR_NAME, Publisher, next_base_name, sha256_file

FIXED = datetime(2026, 11, 25, 8, 30, 0)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    directory = tmp_path / "outbox"
    directory.mkdir()
    return directory


@pytest.fixture
def publisher(outbox: Path) -> Publisher:
    return Publisher(outbox, now=lambda: FIXED)


def test_base_name_uses_clock_and_output_name(publisher: Publisher) -> None:
    assert publisher.reserve("cat")[1] == "video_20261125_083000_cat"


def test_publish_names_outputs_and_manifest(publisher: Publisher, outbox: Path) -> None:
    files = stage_files(publisher, {".mp4": b"main", ".vertical.mp4": b"vert", ".first_frame.png": b"png"}, "job1")
    base = publisher.reserve("cat")[1]
    published = publisher.publish(base, files, {"job_id": "job1"})
    assert [path.name for path in published] == [
        "video_20261125_083000_cat.mp4",
        "video_20261125_083000_cat.vertical.mp4",
        "video_20261125_083000_cat.first_frame.png",
        "video_20261125_083000_cat.json",
    ]
    assert (outbox / "video_20261125_083000_cat.mp4").read_bytes() == b"main"
    assert (outbox / "video_20261125_083000_cat.vertical.mp4").read_bytes() == b"vert"
    assert json.loads(published[-1].read_text(encoding="utf-8")) == {"job_id": "job1"}


def test_clash_gets_counter_suffix(publisher: Publisher, outbox: Path) -> None:
    bases = []
    for job in ("a", "b", "c"):
        base = publisher.reserve("cat")[1]
        publisher.publish(base, stage_files(publisher, {".mp4": job.encode()}, job), {"job": job})
        bases.append(base)
    assert bases == [
        "video_20261125_083000_cat",
        "video_20261125_083000_cat-2",
        "video_20261125_083000_cat-3",
    ]
    assert (outbox / "video_20261125_083000_cat-3.mp4").read_bytes() == b"c"


def test_any_file_with_the_base_counts_as_a_clash(publisher: Publisher, outbox: Path) -> None:
    (outbox / "video_20261125_083000_cat.first_frame.png").write_bytes(b"older job")
    (outbox / "video_20261125_083000_cats.mp4").write_bytes(b"a different name")
    assert publisher.reserve("cat")[1] == "video_20261125_083000_cat-2"
    assert publisher.reserve("cats")[1] == "video_20261125_083000_cats-2"
    assert publisher.reserve("dog")[1] == "video_20261125_083000_dog"


def test_never_overwrites_a_file_created_after_reservation(publisher: Publisher, outbox: Path) -> None:
    base = publisher.reserve("cat")[1]
    existing = outbox / f"{base}.mp4"
    existing.write_bytes(b"someone else's")  # appears between reserve and publish (a race)
    published = publisher.publish(base, stage_files(publisher, {".mp4": b"ours"}, "j"), lambda final: {"base": final})
    assert existing.read_bytes() == b"someone else's"
    assert published[0].name == "video_20261125_083000_cat-2.mp4"
    assert published[0].read_bytes() == b"ours"
    assert json.loads(published[-1].read_text(encoding="utf-8")) == {"base": "video_20261125_083000_cat-2"}


def test_race_on_a_later_name_moves_the_whole_set(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = stage_files(publisher, {".mp4": b"main", ".vertical.mp4": b"vert"}, "j")
    base = publisher.reserve("cat")[1]
    real_rename = fsio._rename_noreplace_syscall

    def racing_rename(src: Path, dst: Path) -> bool | None:
        if dst.name == f"{base}.vertical.mp4" and not dst.exists():
            dst.write_bytes(b"racer")  # another writer wins this one name
        return real_rename(src, dst)

    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", racing_rename)
    published = publisher.publish(base, files, {})
    assert [path.name for path in published] == [
        f"{base}-2.mp4",
        f"{base}-2.vertical.mp4",
        f"{base}-2.json",
    ]
    assert outbox_names(outbox) == sorted([f"{base}.vertical.mp4", *(path.name for path in published)])


def test_manifest_is_written_last_and_is_valid_json(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_rename = fsio._rename_noreplace_syscall

    def recording_rename(src: Path, dst: Path) -> bool | None:
        done = real_rename(src, dst)
        order.append(dst.name)
        return done

    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", recording_rename)
    files = stage_files(publisher, {".mp4": b"main", ".first_frame.png": b"png"}, "j")
    manifest = {"when": FIXED, "input": Path("/in/cat.png"), "ünïcode": "ok", "n": [1, 2.5]}
    published = publisher.publish("video_x_cat", files, manifest)
    assert order == ["video_x_cat.mp4", "video_x_cat.first_frame.png", "video_x_cat.json"]
    assert published[-1].name == order[-1]
    loaded = json.loads(published[-1].read_bytes())
    assert loaded == {"when": FIXED.isoformat(), "input": "/in/cat.png", "ünïcode": "ok", "n": [1, 2.5]}


def test_nothing_left_in_staging_after_publish(publisher: Publisher, outbox: Path) -> None:
    files = stage_files(publisher, {".mp4": b"main", ".first_frame.png": b"png"}, "job7")
    publisher.publish("video_x_cat", files, {})
    staging_root = outbox / STAGING_DIR_NAME
    assert list(staging_root.iterdir()) == []
    assert outbox_names(outbox) == ["video_x_cat.first_frame.png", "video_x_cat.json", "video_x_cat.mp4"]


def test_staging_dir_is_hidden_inside_outbox(publisher: Publisher, outbox: Path) -> None:
    directory = publisher.staging_dir("job1")
    assert directory == outbox / ".i2vd-staging" / "job1"
    assert directory.is_dir()
    assert directory.stat().st_dev == outbox.stat().st_dev
    assert publisher.staging_dir("job1") == directory  # idempotent


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../escape"])
def test_staging_rejects_unsafe_job_ids(publisher: Publisher, bad: str) -> None:
    with pytest.raises(ValueError, match="single"):
        publisher.staging_dir(bad)


def test_discard_staging_removes_temp_files(publisher: Publisher, outbox: Path) -> None:
    stage_files(publisher, {".mp4": b"partial"}, "job1")
    (publisher.staging_dir("job1") / "nested").mkdir()
    publisher.discard_staging("job1")
    assert not (outbox / STAGING_DIR_NAME / "job1").exists()
    publisher.discard_staging("job1")  # idempotent
    publisher.discard_staging("never-staged")


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failed_link_leaves_no_partial_file_in_outbox(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    files = stage_files(publisher, {".mp4": b"main", ".vertical.mp4": b"vert"}, "j")
    real_rename = fsio._rename_noreplace_syscall
    calls = 0

    def failing_rename(src: Path, dst: Path) -> bool | None:
        nonlocal calls
        calls += 1
        if calls == fail_at:  # 1, 2: an output; 3: the manifest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", failing_rename)
    with pytest.raises(StorageFull, match="No space left") as raised:
        publisher.publish("video_x_cat", files, {"k": "v"})
    assert raised.value.detail["errno"] == errno.ENOSPC
    assert outbox_names(outbox) == []
    # The staged files are back where they were, so a retry (or discard) works.
    assert [path.read_bytes() for path, _ in files] == [b"main", b"vert"]
    assert [path.name for path in (outbox / STAGING_DIR_NAME).iterdir()] == ["j"]
    monkeypatch.setattr(fsio, "_rename_noreplace_syscall", real_rename)
    assert len(publisher.publish("video_x_cat", files, {"k": "v"})) == 3


def test_failed_fsync_leaves_no_partial_file_in_outbox(
    publisher: Publisher, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync EIO on a staged output discards it (written again from scratch by the retry), publishes nothing."""
    files = stage_files(publisher, {".mp4": b"main"}, "j")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputLost):
        publisher.publish("video_x_cat", files, {})
    assert outbox_names(outbox) == []
    assert not files[0][0].exists()


def test_publish_rejects_duplicate_or_manifest_suffixes(publisher: Publisher) -> None:
    files = stage_files(publisher, {".mp4": b"a"}, "j")
    with pytest.raises(ValueError, match="distinct"):
        publisher.publish("video_x", [files[0], files[0]], {})
    with pytest.raises(ValueError, match="distinct"):
        publisher.publish("video_x", [(files[0][0], ".json")], {})


@pytest.mark.parametrize(
    ("base", "expected"),
    [("video_x_cat", "video_x_cat-2"), ("video_x_cat-2", "video_x_cat-3"), ("video_x_a-1", "video_x_a-1-2")],
)
def test_next_base_name(base: str, expected: str) -> None:
    assert next_base_name(base) == expected


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_default_clock_is_timezone_aware(tmp_path: Path) -> None:
    now: Callable[[], datetime] = Publisher(tmp_path).now
    assert now().tzinfo is not None

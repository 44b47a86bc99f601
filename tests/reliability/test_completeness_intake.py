"""Checklist group B (completeness and pairing, docs/reliability-anchors §7), and the sidecar-last protocol.

A pair starts only when both files stopped changing *and* look complete: a sidecar `sha256:` must match the image,
else the image must decode fully. Something that may just be unfinished (truncated image, hash not matching yet,
half a YAML file) holds the pair for `incomplete_grace_seconds` of unchanged files; any change restarts the wait.
All timing runs on a fake clock (no sleeps).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from intake_helpers import SIDECAR, Harness, image_bytes, noise_image, reasons
from structlog.testing import capture_logs

import daemon.checks as checks_module
from daemon.config import IntakeConfig


def sidecar_with_hash(data: bytes, prompt: str = "a cat") -> bytes:
    return f"prompt: {prompt}\nsha256: {hashlib.sha256(data).hexdigest()}\n".encode()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


# ----- B14 --------------------------------------------------------------------------------------------------------
def test_b14_pause_shorter_than_the_window_does_not_start_the_job(tmp_path: Path) -> None:
    """Checklist B14 (short pause): a writer pausing for less than the stability window never lets the pair start
    early; it is claimed once, complete, a window after the last write."""
    harness = Harness(tmp_path / "inbox")
    data = noise_image()
    harness.drop("cat.yaml", SIDECAR)
    image = harness.drop("cat.png", data[:1000])
    for offset in range(1000, len(data), 1000):
        assert harness.poll(harness.stable - 0.5).accepted == []
        append(image, data[offset : offset + 1000])
    assert harness.poll(harness.stable - 0.5).accepted == []  # sees the last write
    assert harness.poll(harness.stable - 0.1).accepted == []
    (job,) = harness.poll(0.1).accepted
    assert job.image_sha256 == hashlib.sha256(data).hexdigest()


def test_b14_pause_longer_than_the_window_is_retryable_not_failed(tmp_path: Path) -> None:
    """Checklist B14 (long pause): the writer stops for longer than the window halfway through, so the truncated
    image is stable and fails to decode. That is held, not failed, while within the grace period; when the writer
    resumes (size and mtime move) the wait starts again, and the complete file is processed once, never sent to
    failed/."""
    harness = Harness(tmp_path / "inbox")
    data = noise_image()
    harness.drop("cat.yaml", SIDECAR)
    image = harness.drop("cat.png", data[: len(data) // 2])
    with capture_logs() as logs:
        assert harness.poll().accepted == []
        held = harness.poll(harness.stable + 1.0)
    assert (held.accepted, held.rejected, held.settling) == ([], [], 1)
    incomplete = [entry for entry in logs if entry["event"] == "pair_incomplete"]
    assert [(entry["reason"], entry["input"]) for entry in incomplete] == [("image_unreadable", "cat.png")]
    assert harness.poll(harness.grace - 2.0).accepted == []  # still within the grace period: held
    append(image, data[len(data) // 2 :])
    assert harness.poll(1.0).accepted == []  # changed: the window starts again
    (job,) = harness.poll(harness.stable).accepted
    assert job.image_sha256 == hashlib.sha256(data).hexdigest()
    assert harness.store.counts()["failed"] == 0


def test_b14_a_truncated_image_that_never_completes_is_rejected_after_the_grace_period(tmp_path: Path) -> None:
    """Checklist B14 / E36: a truncated image that stays unchanged past window + grace is rejected with the
    decoder's reason (the writer is gone), exactly once."""
    harness = Harness(tmp_path / "inbox")
    data = noise_image()
    harness.drop_pair(image=data[: len(data) // 2])
    harness.poll()
    assert harness.poll(harness.stable).rejected == []
    result = harness.poll(harness.grace)
    assert reasons(result) == [("cat", "image_unreadable")]
    assert harness.reason("cat")["input"] == "cat.png"


# ----- B15 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["image", "sidecar"])
def test_b15_a_job_starts_only_when_the_pair_is_complete_whatever_arrives_first(tmp_path: Path, first: str) -> None:
    """Checklist B15: image first or sidecar first, the lone file waits (it is not a failure); the job starts
    once both are there and stable."""
    harness = Harness(tmp_path / "inbox")
    files = {"image": ("cat.png", image_bytes()), "sidecar": ("cat.yaml", SIDECAR)}
    second = "sidecar" if first == "image" else "image"
    harness.drop(*files[first])
    for _ in range(5):
        lonely = harness.poll(harness.stable * 10)
        assert (lonely.accepted, lonely.rejected, lonely.waiting, lonely.settling) == ([], [], 1, 0)
    harness.drop(*files[second])
    assert harness.poll().accepted == []
    assert [job.stem for job in harness.poll(harness.stable).accepted] == ["cat"]


@pytest.mark.parametrize(("name", "partner"), [("lonely.png", "sidecar"), ("lonely.yml", "image")])
def test_b15_an_orphan_goes_to_failed_with_orphan_timeout(tmp_path: Path, name: str, partner: str) -> None:
    """Checklist B15 (partner never comes): after `intake.orphan_timeout_seconds` of no change, the lone file is
    moved to failed/ with reason `orphan_timeout` through the store's quarantine, and counted as rejected."""
    harness = Harness(tmp_path / "inbox", orphan_timeout_seconds=600.0)
    harness.drop(name, image_bytes() if name.endswith(".png") else SIDECAR)
    assert harness.poll().rejected == []
    assert harness.poll(599.0).rejected == []
    with capture_logs() as logs:
        result = harness.poll(1.0)
    assert reasons(result) == [("lonely", "orphan_timeout")]
    record = harness.reason("lonely")
    assert (record["reason"], record["input"], record["detail"]) == ("orphan_timeout", name, name)
    assert partner in record["message"]
    assert sorted(p.name for p in harness.failed("lonely").iterdir()) == sorted([name, "reason.json"])
    assert any(entry["event"] == "job_rejected" and entry["reason"] == "orphan_timeout" for entry in logs)
    assert harness.poll(3600.0).rejected == []


def test_b15_an_orphan_that_keeps_changing_is_not_timed_out(tmp_path: Path) -> None:
    """Checklist B15: the orphan timeout counts from the last change, so a sidecar whose image is still being
    uploaded for a long time is not failed while it is being touched."""
    harness = Harness(tmp_path / "inbox", orphan_timeout_seconds=600.0)
    sidecar = harness.drop("slow.yaml", SIDECAR)
    for minute in range(20):
        harness.poll(60.0)
        os.utime(sidecar, ns=(0, (minute + 1) * 1_000_000_000))
    assert harness.poll(300.0).rejected == []  # sees the last change
    assert harness.poll(599.0).rejected == []
    assert reasons(harness.poll(1.0)) == [("slow", "orphan_timeout")]


def test_b15_orphan_timeout_can_be_disabled(tmp_path: Path) -> None:
    """Checklist B15: `orphan_timeout_seconds: null` keeps orphans forever (the old behaviour)."""
    harness = Harness(tmp_path / "inbox", orphan_timeout_seconds=None)
    harness.drop("lonely.png", image_bytes())
    harness.poll()
    assert harness.poll(10 * 86400.0).rejected == []
    assert (harness.inbox / "lonely.png").exists()
    assert IntakeConfig().orphan_timeout_seconds == 3600.0


# ----- B16 --------------------------------------------------------------------------------------------------------
def preallocate(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        handle.truncate(size)  # ftruncate: the final size at once, content all zeros


def write_at(path: Path, offset: int, data: bytes) -> None:
    """Write into a preallocated file without changing its size, keeping its mtime as it was (a writer whose
    mtime updates are coarse or cached, as on many network filesystems): only the content changes."""
    before = os.stat(path)
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("with_hash", [True, False], ids=["sidecar_sha256", "full_decode"])
def test_b16_preallocated_file_waits_until_the_content_is_complete(tmp_path: Path, with_hash: bool) -> None:
    """Checklist B16: the writer `ftruncate`s the image to its final size, then fills it slowly; (size, mtime,
    inode) look stable long before the content is there. The sidecar's sha256 (or, without it, the full decode)
    holds the start until the last byte is written; the job then starts once with the complete image."""
    harness = Harness(tmp_path / "inbox")
    data = noise_image()
    image = harness.inbox / "cat.png"
    preallocate(image, len(data))
    harness.drop("cat.yaml", sidecar_with_hash(data) if with_hash else SIDECAR)
    reason = "sha256_mismatch" if with_hash else "image_unreadable"
    chunk = len(data) // 4
    for offset in range(0, len(data), chunk):
        with capture_logs() as logs:
            held = harness.poll(harness.stable + 1.0)
        assert (held.accepted, held.rejected, held.settling) == ([], [], 1)
        assert all(entry.get("reason", reason) == reason for entry in logs)
        write_at(image, offset, data[offset : offset + chunk])
    (job,) = harness.poll(0.5).accepted
    assert job.image_sha256 == hashlib.sha256(data).hexdigest()
    assert harness.store.counts()["failed"] == 0


def test_b16_decode_of_a_held_image_is_not_repeated_while_it_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist B16: while a pair is held its check is cached on the files' signatures, so a large image is not
    re-read and re-decoded on every poll; and the claimed copy is not decoded a second time when its hash matches
    what was checked in place."""
    harness = Harness(tmp_path / "inbox")
    calls: list[str] = []
    real_decode = checks_module.decoded_size

    def counting(data: bytes, name: str, *args: Any) -> tuple[int, int]:
        calls.append(name)
        return real_decode(data, name, *args)

    monkeypatch.setattr(checks_module, "decoded_size", counting)
    data = noise_image()
    harness.drop_pair(image=data[:-200])
    harness.poll()
    for _ in range(5):
        assert harness.poll(harness.stable).accepted == []
    assert len(calls) == 1
    harness.drop("cat.png", data)
    harness.poll()
    assert len(harness.poll(harness.stable).accepted) == 1
    assert len(calls) == 2


# ----- B17 --------------------------------------------------------------------------------------------------------
def test_b17_stale_nfs_attributes_do_not_start_a_job_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist B17: on NFS with attribute caching, `stat` may report the final size and an old mtime while the
    data is still arriving (until `acregmax` expires). Simulated by an `os.lstat` that keeps returning the first
    attributes of the image until the test lets the cache expire. Opening the file revalidates (close-to-open
    consistency): the in-place check hashes the real bytes (sidecar sha256) and compares the open file's fstat
    with the stable signature, so the pair is held until the content is complete and its fresh attributes have
    been stable for a whole window."""
    harness = Harness(tmp_path / "inbox")
    data = noise_image()
    image = harness.inbox / "cat.png"
    image.write_bytes(data[:100] + bytes(len(data) - 100))
    harness.drop("cat.yaml", sidecar_with_hash(data))
    stale, cache_valid = os.lstat(image), [True]
    real_lstat = os.lstat

    def cached_lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if cache_valid[0] and os.fspath(path) == os.fspath(image):
            return stale
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", cached_lstat)
    harness.poll()
    for _ in range(3):
        assert harness.poll(harness.stable).accepted == []
    image.write_bytes(data)  # the rest arrives; the cached attributes still say nothing changed
    for _ in range(3):
        assert harness.poll(harness.stable).accepted == []
    cache_valid[0] = False  # acregmax passed: stat now shows the real attributes
    assert harness.poll(1.0).accepted == []
    (job,) = harness.poll(harness.stable).accepted
    assert job.image_sha256 == hashlib.sha256(data).hexdigest()


# ----- the sidecar sha256 itself ----------------------------------------------------------------------------------
def test_sidecar_sha256_matching_starts_the_job(tmp_path: Path) -> None:
    """Sidecar-last protocol: a matching `sha256:` (any case, optional `sha256:` prefix) lets the pair start."""
    harness = Harness(tmp_path / "inbox")
    data = image_bytes()
    digest = hashlib.sha256(data).hexdigest().upper()
    harness.drop_pair(image=data, sidecar=f"prompt: a cat\nsha256: 'sha256:{digest}'\n".encode())
    (job,) = harness.settle().accepted
    assert job.image_sha256 == digest.lower()


def test_sidecar_sha256_still_mismatching_when_stable_is_rejected(tmp_path: Path) -> None:
    """Sidecar-last protocol: a stable image that never matches the sidecar's sha256 is rejected with
    `sha256_mismatch` (expected and actual hashes in the detail) after the grace period, never before."""
    harness = Harness(tmp_path / "inbox")
    other = image_bytes((10, 10))
    harness.drop_pair(image=image_bytes(), sidecar=sidecar_with_hash(other))
    harness.poll()
    assert harness.poll(harness.stable).rejected == []  # first check in place: held
    assert harness.poll(harness.grace - 0.1).rejected == []
    result = harness.poll(0.1)
    assert reasons(result) == [("cat", "sha256_mismatch")]
    record = harness.reason("cat")
    assert record["input"] == "cat.png"
    assert record["detail"] == {
        "expected": hashlib.sha256(other).hexdigest(),
        "actual": hashlib.sha256(image_bytes()).hexdigest(),
    }


@pytest.mark.parametrize("value", ["abc", "g" * 64, "0" * 63])
def test_sidecar_sha256_must_be_a_hex_digest(tmp_path: Path, value: str) -> None:
    """Sidecar-last protocol: a malformed `sha256:` is a sidecar error, reported at once (not held)."""
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(sidecar=f"prompt: a cat\nsha256: '{value}'\n".encode())
    harness.poll()
    result = harness.poll(harness.stable)
    assert reasons(result) == [("cat", "sidecar_invalid")]
    assert "sha256" in harness.reason("cat")["message"]


def test_half_written_sidecar_is_held_then_completed(tmp_path: Path) -> None:
    """Sidecar written slowly with a long pause mid-way (broken YAML for now): held, not failed; once complete it
    is parsed and the job starts."""
    harness = Harness(tmp_path / "inbox")
    harness.drop("cat.png", image_bytes())
    sidecar = harness.drop("cat.yaml", b"prompt: [a cat")
    harness.poll()
    assert harness.poll(harness.stable + 3.0).rejected == []
    sidecar.write_bytes(b"prompt: a cat surfing\n")
    harness.poll(1.0)
    (job,) = harness.poll(harness.stable).accepted
    assert job.resolved is not None and job.resolved.prompt == "a cat surfing"


def test_a_file_replaced_during_the_in_place_check_restarts_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that atomically renames a new version over the image while it is being checked: the pair is not
    claimed on the strength of the old file's stability; the new file gets its own window."""
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair()
    image = harness.inbox / "cat.png"
    real_lstat = os.lstat
    swaps: list[int] = []

    def lstat_then_replace(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_lstat(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(image) and not swaps and harness.clock.now > 1000.0:
            swaps.append(1)
            (tmp_path / "new.png").write_bytes(image_bytes((32, 32)))
            os.replace(tmp_path / "new.png", image)
        return result

    harness.poll()
    monkeypatch.setattr(os, "lstat", lstat_then_replace)
    held = harness.poll(harness.stable)
    assert swaps == [1] and (held.accepted, held.rejected, held.settling) == ([], [], 1)
    monkeypatch.undo()
    assert harness.poll(0.1).accepted == []  # the new inode starts a new window
    (job,) = harness.poll(harness.stable).accepted
    assert job.resolved is not None and (job.resolved.width, job.resolved.height) == (512, 512)


@pytest.mark.parametrize("empty", ["image", "sidecar"])
def test_an_empty_file_that_stays_empty_is_refused_after_the_grace(tmp_path: Path, empty: str) -> None:
    """An empty file may be a copy that has not begun: it waits the stability window and the grace, like an
    incomplete one. One that stays empty is then refused with a reason (before, it waited forever, unanswered,
    and `run --once` never finished)."""
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(image=b"" if empty == "image" else None, sidecar=b"" if empty == "sidecar" else SIDECAR)
    assert harness.poll().settling == 1
    assert harness.poll(harness.stable).settling == 1  # still within the grace
    result = harness.settle()
    for _ in range(3):
        if result.rejected:
            break
        result = harness.poll(harness.grace)
    expected = "image_unreadable" if empty == "image" else "sidecar_yaml"
    assert reasons(result) == [("cat", expected)]
    assert result.settling == 0

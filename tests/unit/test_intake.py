"""Intake: ignore rules, pairing, the stability window (fake clock, no sleeps) and hostile input end to end."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from intake_helpers import FakeClock, image_bytes
from PIL import Image
from structlog.testing import capture_logs

import daemon.checks as checks_module
from daemon.config import DaemonConfig, IntakeConfig
from daemon.intake import (
    IMAGE_EXTENSIONS,
    SIDECAR_EXTENSIONS,
    Intake,
    IntakeResult,
    StabilityTracker,
    ambiguous_groups,
    find_pairs,
    is_ignored,
    load_image_rgb,
    validate_claimed,
)
from daemon.store import JobStore, Pair

SIDECAR = b"prompt: a cat surfing\nseed: 42\n"
REASON_KEYS = {"input", "reason", "detail", "message", "attempts", "at"}
IGNORED: tuple[str, ...] = (
    ".hidden.png",
    "cat.png.part",
    "cat.yaml.tmp",
    "CAT.PNG.PART",
    ".DS_Store",
    "._cat.png",
    "Thumbs.db",
)
IGNORED += ("desktop.ini", "~$cat.yaml", "failed", ".i2vd", "@eaDir", "cat.png~", ".nfs0000001", ".smbdelete01")
UNPAIRED = ("b.png", "c.yml", "d.png", "d.jpg", "d.yaml", "e.yaml", "e.yml", "e.webp", "f.yaml", "g.png", "G.yaml")


def noise_png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims `width`x`height`: a decompression bomb costs nothing to build."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def make_config(inbox: Path, **intake: Any) -> DaemonConfig:
    settings = {"stable_seconds": 2.0, **intake}
    return DaemonConfig(inbox=inbox, outbox=inbox.parent / "outbox", intake=IntakeConfig(**settings))


class Harness:
    def __init__(self, inbox: Path, **intake: Any) -> None:
        self.inbox = inbox
        self.clock = FakeClock()
        self.config = make_config(inbox, **intake)
        self.store = JobStore(inbox, self.config.state_path)
        self.intake = Intake(self.config, self.store, clock=self.clock)

    def drop(self, name: str, data: bytes) -> Path:
        path = self.inbox / name
        path.write_bytes(data)
        return path

    def drop_pair(self, stem: str = "cat", image: bytes | None = None, sidecar: bytes = SIDECAR) -> None:
        self.drop(f"{stem}.png", image if image is not None else image_bytes())
        self.drop(f"{stem}.yaml", sidecar)

    def settle(self) -> IntakeResult:
        """Two polls with the stability window in between: the second one claims. A pair held as incomplete
        (truncated image, half a YAML file) gets one more poll after the grace period."""
        self.intake.poll()
        self.clock.advance(self.config.intake.stable_seconds)
        result = self.intake.poll()
        if result.settling:
            self.clock.advance(self.config.intake.incomplete_grace_seconds)
            later = self.intake.poll()
            accepted, rejected = result.accepted + later.accepted, result.rejected + later.rejected
            result = replace(later, accepted=accepted, rejected=rejected)
        return result

    def failed(self, name: str) -> Path:
        return self.inbox / "failed" / name


@pytest.fixture
def harness(inbox: Path) -> Harness:
    return Harness(inbox)


def assert_rejected(result: IntakeResult, harness: Harness, reason: str, input_name: str, failed: str = "cat") -> None:
    assert result.accepted == []
    assert [(stem, error.reason) for stem, error, _ in result.rejected] == [(failed.split("-")[0], reason)]
    failed_dir = harness.failed(failed)
    assert result.rejected[0][2] == failed_dir
    record = json.loads((failed_dir / "reason.json").read_text())
    assert set(record) == REASON_KEYS
    assert (record["reason"], record["input"]) == (reason, input_name)
    assert isinstance(record["message"], str) and input_name in record["message"]
    assert record["attempts"] == 0
    assert datetime.fromisoformat(record["at"]).tzinfo is not None
    assert harness.store.counts()["claimed"] == 0


# ----- ignore rules and pairing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    IGNORED,
)
def test_is_ignored(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["cat.png", "cat.yaml", "failed.png", "my cat.JPEG", "part.png", "tmp.yml"])
def test_is_not_ignored(name: str) -> None:
    assert not is_ignored(name)


def test_extension_sets() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp"} == IMAGE_EXTENSIONS
    assert {".yaml", ".yml"} == SIDECAR_EXTENSIONS


@pytest.mark.parametrize("image_ext", [".png", ".jpg", ".jpeg", ".webp", ".PNG", ".Jpg", ".JPEG", ".WebP"])
@pytest.mark.parametrize("sidecar_ext", [".yaml", ".yml", ".YAML", ".Yml"])
def test_find_pairs_pairs_every_extension_case_insensitively(inbox: Path, image_ext: str, sidecar_ext: str) -> None:
    (inbox / f"cat{image_ext}").write_bytes(b"x")
    (inbox / f"cat{sidecar_ext}").write_bytes(b"x")
    pairs, unpaired = find_pairs(inbox)
    assert pairs == [Pair("cat", inbox / f"cat{image_ext}", inbox / f"cat{sidecar_ext}")]
    assert unpaired == []


def test_find_pairs_reports_orphans_ambiguity_and_skips_junk_and_subfolders(inbox: Path) -> None:
    for name in (*UNPAIRED, "a.png", "a.yaml", "notes.txt", ".DS_Store", "f.png.part"):
        (inbox / name).write_bytes(b"x")
    (inbox / "failed").mkdir()
    (inbox / "sub").mkdir()
    (inbox / "sub" / "h.png").write_bytes(b"x")
    (inbox / "sub" / "h.yaml").write_bytes(b"x")
    pairs, unpaired = find_pairs(inbox)
    assert pairs == [Pair("a", inbox / "a.png", inbox / "a.yaml")]
    names = sorted(p.name for p in unpaired)
    assert names == sorted(UNPAIRED)
    assert ambiguous_groups(unpaired) == {
        "d": sorted([inbox / "d.jpg", inbox / "d.png", inbox / "d.yaml"]),
        "e": sorted([inbox / "e.webp", inbox / "e.yaml", inbox / "e.yml"]),
    }


def test_find_pairs_keeps_symlinks_and_folders_as_candidates(inbox: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    (inbox / "a.png").symlink_to(tmp_path / "secret")
    (inbox / "a.yaml").write_bytes(b"x")
    (inbox / "b.png").mkdir()
    (inbox / "b.yaml").symlink_to(tmp_path / "missing")
    pairs, _ = find_pairs(inbox)
    assert [pair.stem for pair in pairs] == ["a", "b"]


# ----- stability ---------------------------------------------------------------------------------------------


def test_stability_tracker_window(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(1.9)
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(0.1)
    assert tracker.observe(path, os.lstat(path))


def test_stability_tracker_size_change_resets(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    tracker.observe(path, os.lstat(path))
    clock.advance(1.5)
    with path.open("ab") as handle:
        handle.write(b"more")
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(1.5)
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(0.5)
    assert tracker.observe(path, os.lstat(path))


def test_stability_tracker_mtime_change_resets(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    tracker.observe(path, os.lstat(path))
    clock.advance(1.5)
    info = os.lstat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(1.5)
    assert not tracker.observe(path, os.lstat(path))


def test_stability_tracker_inode_change_resets(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    before = os.lstat(path)
    tracker.observe(path, before)
    clock.advance(1.5)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"xyz")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    after = os.lstat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    assert not tracker.observe(path, after)
    clock.advance(1.5)
    assert not tracker.observe(path, after)


def test_stability_tracker_never_calls_an_empty_file_stable(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = StabilityTracker(0.0, clock)
    path = tmp_path / "a.png"
    path.write_bytes(b"")
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(3600)
    assert not tracker.observe(path, os.lstat(path))
    tracker.forget(path)
    tracker.retain([])


def test_stability_tracker_gives_an_empty_file_its_grace_then_calls_it_stable(tmp_path: Path) -> None:
    """An empty file may be a copy that has not written its first byte: it waits the window and the grace, then
    counts as stable so it is checked and answered (refused) like any other file."""
    clock = FakeClock()
    tracker = StabilityTracker(2.0, clock, empty_grace_seconds=30.0)
    path = tmp_path / "a.png"
    path.write_bytes(b"")
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(31.0)
    assert not tracker.observe(path, os.lstat(path))
    clock.advance(1.0)
    assert tracker.observe(path, os.lstat(path))


# ----- Intake.poll end to end --------------------------------------------------------------------------------


def test_poll_waits_for_the_window_then_claims_a_valid_pair(harness: Harness) -> None:
    harness.drop_pair()
    with capture_logs() as logs:
        first = harness.intake.poll()
        assert (first.accepted, first.rejected, first.waiting) == ([], [], 1)
        harness.clock.advance(1.0)
        assert harness.intake.poll().waiting == 1
        harness.clock.advance(1.0)
        second = harness.intake.poll()
    assert second.waiting == 0 and second.rejected == []
    (job,) = second.accepted
    assert job.resolved is not None
    assert (job.resolved.prompt, job.resolved.seed, job.resolved.output_name) == ("a cat surfing", 42, "cat")
    assert job.image_sha256 is not None and len(job.image_sha256) == 64
    assert not (harness.inbox / "cat.png").exists()
    state = json.loads((job.directory / "job.json").read_text())
    assert state["resolved"]["seed"] == 42 and state["image_sha256"] == job.image_sha256
    events = [entry["event"] for entry in logs]
    assert events.count("pair_waiting") == 1 and "job_claimed" in events


def test_poll_restarts_the_window_when_a_file_is_still_growing(harness: Harness) -> None:
    harness.drop_pair()
    harness.intake.poll()
    harness.clock.advance(1.5)
    with (harness.inbox / "cat.yaml").open("ab") as handle:
        handle.write(b"priority: 1\n")
    still = harness.intake.poll()
    assert (still.waiting, still.settling) == (1, 1)
    harness.clock.advance(1.5)
    assert harness.intake.poll().accepted == []
    harness.clock.advance(0.5)
    (job,) = harness.intake.poll().accepted
    assert job.resolved is not None and job.resolved.priority == 1


def test_orphans_wait_and_are_never_quarantined(harness: Harness) -> None:
    harness.drop("lonely.png", image_bytes())
    for _ in range(3):
        result = harness.settle()
        assert (result.accepted, result.rejected, result.waiting, result.settling) == ([], [], 1, 0)
    assert (harness.inbox / "lonely.png").exists()
    harness.drop("lonely.yaml", SIDECAR)
    assert len(harness.settle().accepted) == 1


def test_content_wins_over_extension_and_exif_rotation_decides_the_shape(harness: Harness) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    harness.drop("photo.webp", image_bytes((96, 64), "JPEG", exif=exif.tobytes()))
    harness.drop("photo.yml", SIDECAR)
    (job,) = harness.settle().accepted
    assert job.resolved is not None and job.resolved.width < job.resolved.height
    rgb = load_image_rgb(job.image_path, harness.config.intake.max_image_pixels)
    assert (rgb.mode, rgb.size) == ("RGB", (64, 96))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "1"])
def test_load_image_rgb_converts_every_mode(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "a.png"
    save = {"transparency": 0} if mode == "P" else {}
    path.write_bytes(image_bytes((16, 8), "PNG", mode, **save))
    image = load_image_rgb(path, 10_000)
    assert (image.mode, image.size) == ("RGB", (16, 8))


def test_validate_claimed_keeps_the_seed_of_a_previous_validation(harness: Harness) -> None:
    harness.drop_pair(sidecar=b"prompt: no seed given\n")
    (job,) = harness.settle().accepted
    assert job.resolved is not None
    again, sha = validate_claimed(job, harness.config)
    assert again.seed == job.resolved.seed and sha == job.image_sha256


# ----- hostile input ----------------------------------------------------------------------------------------


def test_symlinked_image_is_rejected_and_its_target_never_read_or_moved(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(image_bytes())  # a perfectly valid image: following the link would succeed
    (harness.inbox / "cat.png").symlink_to(secret)
    harness.drop("cat.yaml", SIDECAR)
    opened: list[str] = []
    real_open = os.open

    def spy_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    result = harness.settle()
    monkeypatch.undo()
    assert_rejected(result, harness, "symlink", "cat.png")
    assert str(secret) not in opened
    assert secret.read_bytes() == image_bytes()
    assert (harness.failed("cat") / "cat.png").is_symlink()


def test_symlinked_sidecar_is_rejected(harness: Harness, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.yaml").write_bytes(SIDECAR)
    harness.drop("cat.png", image_bytes())
    (harness.inbox / "cat.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    assert_rejected(harness.settle(), harness, "symlink", "cat.yaml")
    assert (tmp_path / "elsewhere.yaml").read_bytes() == SIDECAR


def test_a_folder_named_like_an_image_is_rejected(harness: Harness) -> None:
    (harness.inbox / "cat.png").mkdir()
    (harness.inbox / "cat.png" / "inside.txt").write_text("kept")
    harness.drop("cat.yaml", SIDECAR)
    assert_rejected(harness.settle(), harness, "not_regular_file", "cat.png")
    assert (harness.failed("cat") / "cat.png" / "inside.txt").read_text() == "kept"


def test_a_named_pipe_is_rejected_without_blocking(harness: Harness) -> None:
    os.mkfifo(harness.inbox / "cat.png")
    harness.drop("cat.yaml", SIDECAR)
    assert_rejected(harness.settle(), harness, "not_regular_file", "cat.png")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (noise_png()[: len(noise_png()) // 2], "image_unreadable"),
        (b"this is just text, not a picture\n" * 4, "image_unreadable"),
        (image_bytes((8, 8), "GIF", "P"), "image_format"),
        (image_bytes((8, 8), "BMP"), "image_format"),
        (png_header_only(30000, 30000), "decompression_bomb"),
        (png_header_only(2000, 2000), "decompression_bomb"),
    ],
    ids=["truncated_png", "text_named_png", "gif_named_png", "bmp_named_png", "bomb_30000", "over_limit_2000"],
)
def test_bad_images_are_rejected(inbox: Path, data: bytes, reason: str) -> None:
    harness = Harness(inbox, max_image_pixels=1_000_000)
    harness.drop_pair(image=data)
    assert_rejected(harness.settle(), harness, reason, "cat.png")


def test_oversize_image_file_is_rejected_before_reading(inbox: Path) -> None:
    harness = Harness(inbox, max_image_bytes=1024)
    harness.drop_pair(image=noise_png((64, 64)))
    assert_rejected(harness.settle(), harness, "too_large", "cat.png")


@pytest.mark.parametrize(
    ("sidecar", "reason"),
    [
        (b"prompt: " + b"x" * 400 + b"\n", "too_large"),
        (b"base: &a [1, 2]\nprompt: *a\n", "sidecar_yaml"),
        (b"prompt: a cat\ncolour: blue\n", "sidecar_invalid"),
        (b"prompt: [unclosed\n", "sidecar_yaml"),
        (b"steps: 10\n", "sidecar_invalid"),
    ],
    ids=["oversize", "yaml_aliases", "unknown_key", "broken_yaml", "no_prompt"],
)
def test_bad_sidecars_are_rejected(inbox: Path, sidecar: bytes, reason: str) -> None:
    harness = Harness(inbox, max_sidecar_bytes=256)
    harness.drop_pair(sidecar=sidecar)
    assert_rejected(harness.settle(), harness, reason, "cat.yaml")


def test_yaml_bomb_is_rejected_quickly(harness: Harness) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    harness.drop_pair(sidecar=("\n".join(lines) + "\nprompt: boom\n").encode())
    assert_rejected(harness.settle(), harness, "sidecar_yaml", "cat.yaml")


def test_unknown_key_detail_lists_the_problems(harness: Harness) -> None:
    harness.drop_pair(sidecar=b"prompt: a cat\ncolour: blue\n")
    ((_, error, failed_dir),) = harness.settle().rejected
    record = json.loads((failed_dir / "reason.json").read_text())
    assert record["detail"] == error.detail
    assert any("colour" in line for line in record["detail"])


def test_a_second_failure_of_the_same_stem_goes_to_a_numbered_folder(harness: Harness) -> None:
    harness.drop_pair(image=b"not an image")
    assert_rejected(harness.settle(), harness, "image_unreadable", "cat.png")
    harness.drop_pair(sidecar=b"prompt: a cat\ncolour: blue\n")
    assert_rejected(harness.settle(), harness, "sidecar_invalid", "cat.yaml", failed="cat-2")
    assert sorted(p.name for p in harness.failed("cat-2").iterdir()) == ["cat.png", "cat.yaml", "reason.json"]


def test_intake_carries_on_with_the_next_pair_after_each_failure(harness: Harness) -> None:
    harness.drop_pair("a_bad", image=b"not an image")
    harness.drop_pair("b_good")
    harness.drop_pair("c_bad", sidecar=b"colour: blue\n")
    harness.drop_pair("d_good")
    with capture_logs() as logs:
        result = harness.settle()
    assert sorted(job.stem for job in result.accepted) == ["b_good", "d_good"]
    assert sorted(stem for stem, _, _ in result.rejected) == ["a_bad", "c_bad"]
    assert [entry["event"] for entry in logs].count("job_rejected") == 2


def test_an_unexpected_exception_for_one_pair_does_not_stop_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_claim = harness.store.claim

    def flaky_claim(pair: Pair) -> Any:
        if pair.stem == "a":
            raise RuntimeError("disk on fire")
        return real_claim(pair)

    monkeypatch.setattr(harness.store, "claim", flaky_claim)
    harness.drop_pair("a")
    harness.drop_pair("b")
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["b"]
    assert (harness.inbox / "a.png").exists()


def test_a_crash_inside_validation_quarantines_instead_of_losing_the_job(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(checks_module, "decoded_size", broken)
    harness.drop_pair()
    assert_rejected(harness.settle(), harness, "validation_error", "cat.png")


@pytest.mark.parametrize("names", [("a.png", "a.jpg", "a.yaml"), ("a.png", "a.yaml", "a.yml")])
def test_ambiguous_pairs_are_quarantined_once_stable(harness: Harness, names: tuple[str, ...]) -> None:
    for name in names:
        harness.drop(name, image_bytes() if name.endswith(("png", "jpg")) else SIDECAR)
    assert harness.intake.poll().waiting == 1
    harness.clock.advance(2.0)
    result = harness.intake.poll()
    assert [(stem, error.reason) for stem, error, _ in result.rejected] == [("a", "ambiguous_pair")]
    failed = harness.failed("a")
    assert sorted(p.name for p in failed.iterdir()) == sorted([*names, "reason.json"])
    record = json.loads((failed / "reason.json").read_text())
    assert record["reason"] == "ambiguous_pair" and record["detail"] == sorted(names)


def test_a_file_name_that_is_not_utf8_is_quarantined(harness: Harness) -> None:
    stem = os.fsdecode(b"caf\xe9")
    harness.drop(f"{stem}.png", image_bytes())
    harness.drop(f"{stem}.yaml", SIDECAR)
    result = harness.settle()
    assert [error.reason for _, error, _ in result.rejected] == ["bad_filename"]
    assert (harness.failed(stem) / f"{stem}.png").exists()
    assert json.loads((harness.failed(stem) / "reason.json").read_text())["reason"] == "bad_filename"


def test_poll_claims_no_more_than_the_queue_has_room_for(inbox: Path) -> None:
    """A flood waits in the inbox, not in memory: `poll(room=n)` claims n pairs and reports the rest as settling
    (looked at again soon; `--once` does not take the inbox for drained); a later poll takes the rest."""
    harness = Harness(inbox, stable_seconds=0.0)
    for index in range(5):
        harness.drop_pair(f"p{index}")
    first = harness.intake.poll(room=2)
    assert len(first.accepted) == 2 and first.settling == 3
    assert len(list(inbox.glob("p*.png"))) == 3, "the others are still in the inbox, unclaimed"
    second = harness.intake.poll(room=10)
    assert len(second.accepted) == 3 and second.settling == 0
    assert {job.stem for job in first.accepted + second.accepted} == {f"p{index}" for index in range(5)}

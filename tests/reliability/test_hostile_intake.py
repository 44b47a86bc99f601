"""Checklist group E (hostile input, docs/reliability-anchors §7), cases 34-44: every one is rejected with a precise
reason (or processed deterministically) and the daemon is unharmed; nothing is written outside the inbox's state
folders. Runs as whatever user the tests run as; where root would hide the condition (mode 000) it is simulated
at the `os.open` boundary, as the docstring says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from intake_helpers import SIDECAR, Harness, image_bytes, noise_image, png_header_only, reasons
from memory_peak import peak_growth_mib, reset_peak_rss_mib
from PIL import Image, ImageFile

from daemon.config import DaemonConfig, GenerationConfig, IntakeConfig
from daemon.errors import JobRejected
from daemon.intake import image_pixel_limit, validate_claimed
from daemon.jobspec import parse_sidecar, resolve_job
from daemon.logs import configure_logging
from daemon.safeopen import MAX_JPEG_SCANS, InputRejected, read_input
from daemon.store import JobStore, Pair
from daemon.systemd import SystemdNotifier

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def rejected_reason(harness: Harness, stem: str = "cat") -> tuple[str, str]:
    record = harness.reason(stem)
    return record["reason"], record["input"]


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to claim `width`x`height`."""
    data = bytearray(image_bytes((16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


# ----- E34 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [png_header_only(20000, 20000), jpeg_with_header_size(20000, 20000), png_header_only(60000, 60000)],
    ids=["png_20k", "jpeg_20k", "png_60k_over_pillow_error_limit"],
)
def test_e34_decompression_bomb_is_rejected_from_the_header_with_bounded_memory(tmp_path: Path, data: bytes) -> None:
    """Checklist E34: a file of well under 100 KB whose header claims 20k x 20k (or more) pixels is rejected as a
    `decompression_bomb` before anything is decoded: peak RSS grows by far less than the 1.2 GB a decode would
    take."""
    assert len(data) < 100_000
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(image=data)
    before = reset_peak_rss_mib()
    result = harness.settle()
    assert reasons(result) == [("cat", "decompression_bomb")]
    assert peak_growth_mib(before) < 100
    assert rejected_reason(harness) == ("decompression_bomb", "cat.png")


def test_e34_the_pixel_limit_is_tied_to_the_models_maximum(tmp_path: Path) -> None:
    """Checklist E34: the decode limit is `intake.max_image_pixels`, and never more than 64x the model's output
    limit (`generation.max_pixels`): with a 512x512 model, a 5000x4000 header is refused, naming the limit."""
    config = DaemonConfig(
        inbox=tmp_path / "inbox", generation=GenerationConfig(max_pixels=512 * 512), intake=IntakeConfig()
    )
    assert image_pixel_limit(config) == 64 * 512 * 512 < config.intake.max_image_pixels
    assert image_pixel_limit(DaemonConfig(intake=IntakeConfig(max_image_pixels=10_000))) == 10_000
    harness = Harness(tmp_path / "inbox", generation=GenerationConfig(max_pixels=512 * 512))
    harness.drop_pair(image=png_header_only(5000, 4000))
    assert reasons(harness.settle()) == [("cat", "decompression_bomb")]
    assert f"{64 * 512 * 512:,}" in harness.reason("cat")["message"]


def test_e34_a_jpeg_of_thousands_of_repeated_scans_is_refused_before_decoding(tmp_path: Path) -> None:
    """Every scan of a progressive JPEG is decoded over the whole image, so a small file of thousands of repeated
    scans costs minutes of CPU on the intake thread (and the watchdog's ping with it). More than `MAX_JPEG_SCANS`
    start-of-scan markers is a `decompression_bomb`, found before decoding; an ordinary progressive JPEG (about 10
    scans) still passes."""
    progressive = image_bytes((256, 256), "JPEG", progressive=True, quality=90)
    scans = progressive.count(b"\xff\xda")
    assert 2 <= scans <= 20
    last = progressive.rindex(b"\xff\xda")
    bomb = progressive[:-2] + progressive[last:-2] * (MAX_JPEG_SCANS + 1 - scans + 1) + progressive[-2:]
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair("fine", image=progressive)
    harness.drop_pair("bomb", image=bomb)
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["fine"]
    assert reasons(result) == [("bomb", "decompression_bomb")]
    assert harness.reason("bomb")["detail"] == {"scans": MAX_JPEG_SCANS + 2, "max_scans": MAX_JPEG_SCANS}


# ----- E35 --------------------------------------------------------------------------------------------------------
FITS = b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 2800
TIFF = image_bytes((8, 8), "TIFF")


@pytest.mark.parametrize(
    ("data", "found"),
    [(TIFF, "TIFF"), (b"8BPS\x00\x01" + b"\x00" * 200, "PSD"), (FITS, "FITS"), (image_bytes((8, 8), "BMP"), "BMP")],
    ids=["tiff", "psd", "fits", "bmp"],
)
def test_e35_content_decides_the_format_not_the_extension(tmp_path: Path, data: bytes, found: str) -> None:
    """Checklist E35: a `.png` holding TIFF, PSD, FITS or BMP is refused by the decoder allowlist (PNG, JPEG,
    WEBP), with the real format named in the reason (`image_format`)."""
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(image=data)
    assert reasons(harness.settle()) == [("cat", "image_format")]
    record = harness.reason("cat")
    assert record["detail"] == found and found in record["message"]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_e35_an_allowed_format_under_the_wrong_extension_is_accepted(tmp_path: Path, fmt: str) -> None:
    """Checklist E35: decision by content, both ways: a JPEG or WEBP named `.png` is a valid image."""
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(image=image_bytes((32, 32), fmt))
    assert len(harness.settle().accepted) == 1


# ----- E36 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_e36_truncated_image_fails_with_a_reason_and_truncated_loading_stays_off(tmp_path: Path, fmt: str) -> None:
    """Checklist E36: a cut-short PNG/JPEG/WEBP is held for the grace period (it may still be arriving), then
    failed with `image_unreadable`; `ImageFile.LOAD_TRUNCATED_IMAGES` is never switched on."""
    data = noise_image((64, 64), fmt)
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(image=data[: len(data) * 2 // 3])
    assert reasons(harness.settle()) == [("cat", "image_unreadable")]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----- E37 --------------------------------------------------------------------------------------------------------
def test_e37_huge_file_is_rejected_by_size_before_it_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist E37: a 5 GB image (sparse, so the test costs nothing) is refused as `too_large` from its lstat
    size: it is never opened, let alone read."""
    harness = Harness(tmp_path / "inbox")
    huge = harness.inbox / "cat.png"
    with huge.open("wb") as handle:
        handle.truncate(5 * 2**30)
    harness.drop("cat.yaml", SIDECAR)
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.path.basename(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    assert reasons(harness.settle()) == [("cat", "too_large")]
    assert "cat.png" not in opened and "input.png" not in opened
    assert harness.reason("cat")["detail"] == f"{5 * 2**30} > {harness.config.intake.max_image_bytes} bytes"


# ----- E38 --------------------------------------------------------------------------------------------------------
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(9)]
    + ["prompt: *j"]
)


@pytest.mark.parametrize(
    ("sidecar", "reason", "fragment"),
    [
        (BILLION_LAUGHS.encode(), "sidecar_yaml", "anchors"),
        (b"prompt: x\nvariants: " + b"[" * 1000 + b"]" * 1000 + b"\n", "sidecar_yaml", "levels deep"),
        (b"prompt: " + b"x" * (10 * 2**20) + b"\n", "too_large", "limit"),
        (b"prompt: a cat\nprompt: a dog\n", "sidecar_yaml", "duplicate key"),
        (b"prompt: no\n", "sidecar_invalid", "put the text in quotes"),
        (b"prompt: a cat\noutput_name: on\n", "sidecar_invalid", "put the text in quotes"),
        (b"prompt: !!python/object/apply:os.system ['touch PWNED']\n", "sidecar_yaml", "constructor"),
        (b"prompt: !!binary aGVsbG8=\n", "sidecar_invalid", "prompt"),
        (b"prompt: a cat\nnum_frames: '16'\n", "sidecar_invalid", "num_frames"),
    ],
    ids=[
        "billion_laughs",
        "deep_nesting",
        "10MB",
        "duplicate_key",
        "norway_no",
        "norway_on",
        "python_tag",
        "binary",
        "str_int",
    ],
)
def test_e38_hostile_sidecars_fail_with_a_precise_reason_and_bounded_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sidecar: bytes, reason: str, fragment: str
) -> None:
    """Checklist E38: alias bombs, 1,000-deep nesting, a 10 MB sidecar, duplicate keys, YAML 1.1 booleans where
    text is expected, python tags: each fails with its own reason and a message naming the problem, within a
    fraction of a second, and no tag is ever executed."""
    monkeypatch.chdir(tmp_path)
    harness = Harness(tmp_path / "inbox")
    harness.drop_pair(sidecar=sidecar)
    started = time.monotonic()
    assert reasons(harness.settle()) == [("cat", reason)]
    assert time.monotonic() - started < 5.0
    record = harness.reason("cat")
    assert record["input"] == "cat.yaml" and fragment in record["message"]
    assert not (tmp_path / "PWNED").exists()


# ----- E39 --------------------------------------------------------------------------------------------------------
def test_e39_symlinks_to_a_secret_or_a_fifo_are_refused_without_reading_or_blocking(tmp_path: Path) -> None:
    """Checklist E39: an image that is a symlink to a file outside the inbox (think /etc/shadow), and a sidecar
    that is a symlink to a FIFO, are refused as `symlink`; the FIFO never blocks, the secret is never touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(image_bytes())
    os.mkfifo(outside / "pipe")
    harness = Harness(tmp_path / "inbox")
    (harness.inbox / "a.png").symlink_to(secret)
    harness.drop("a.yaml", SIDECAR)
    harness.drop("b.png", image_bytes())
    (harness.inbox / "b.yaml").symlink_to(outside / "pipe")
    before = os.stat(secret)
    result = harness.settle()
    assert reasons(result) == [("a", "symlink"), ("b", "symlink")]
    assert rejected_reason(harness, "b") == ("symlink", "b.yaml")
    after = os.stat(secret)
    assert (after.st_ino, after.st_mtime_ns, after.st_atime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_atime_ns,
    )
    assert (harness.failed("a") / "a.png").is_symlink() and secret.read_bytes() == image_bytes()


@pytest.mark.parametrize(("swap_to", "reason"), [("symlink", "symlink"), ("other_file", "replaced")])
def test_e39_a_file_swapped_between_check_and_open_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap_to: str, reason: str
) -> None:
    """Checklist E39 (TOCTOU): the file is replaced right after its lstat, by a symlink (the O_NOFOLLOW open fails
    with ELOOP) or by another regular file (fstat's dev/ino no longer match the lstat's): refused either way."""
    target = tmp_path / "cat.png"
    target.write_bytes(image_bytes())
    (tmp_path / "secret").write_bytes(b"secret")
    real_lstat = os.lstat

    def lstat_then_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_lstat(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(target):
            replacement = tmp_path / "replacement"
            if swap_to == "symlink":
                replacement.symlink_to(tmp_path / "secret")
            else:
                replacement.write_bytes(image_bytes())
            os.replace(replacement, target)
        return result

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    with pytest.raises(InputRejected) as caught:
        read_input(target, None, "cat.png")
    assert caught.value.reason == reason


def test_e39_symlinked_subdirectory_is_never_entered(tmp_path: Path) -> None:
    """Checklist E39: the inbox is watched non-recursively; a symlinked subdirectory full of pairs (pointing
    outside) is never entered, so nothing in it is claimed, moved or read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(image_bytes())
    (outside / "x.yaml").write_bytes(SIDECAR)
    harness = Harness(tmp_path / "inbox")
    (harness.inbox / "linked").symlink_to(outside, target_is_directory=True)
    result = harness.settle()
    assert (result.accepted, result.rejected, result.waiting) == ([], [], 0)
    assert sorted(p.name for p in outside.iterdir()) == ["x.png", "x.yaml"]


# ----- E40 --------------------------------------------------------------------------------------------------------
def test_e40_hard_link_to_an_outside_file_is_rejected_and_the_target_kept(tmp_path: Path) -> None:
    """Checklist E40: an image that is a hard link to a file outside the inbox (st_nlink 2) is refused as
    `hard_link`; the original is never deleted, moved or changed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    original = outside / "private.png"
    original.write_bytes(image_bytes())
    harness = Harness(tmp_path / "inbox")
    os.link(original, harness.inbox / "cat.png")
    harness.drop("cat.yaml", SIDECAR)
    inode = os.stat(original).st_ino
    assert reasons(harness.settle()) == [("cat", "hard_link")]
    assert rejected_reason(harness) == ("hard_link", "cat.png")
    assert original.read_bytes() == image_bytes() and os.stat(original).st_ino == inode


# ----- E41 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output_name",
    ["../../x", "/etc/passwd", "a\x00b", "", ".", "..", "x" * 300, "con", "LPT1.txt", "日本", "a/../../b"],
)
def test_e41_output_name_can_never_leave_the_outbox(tmp_path: Path, output_name: str) -> None:
    """Checklist E41: path traversal, absolute paths, NUL, empty, dot names, 300 bytes, Windows device names in
    `output_name`: rejected (`sidecar_invalid`), or reduced to a plain `[A-Za-z0-9._-]` name of at most 64 chars
    whose output file resolves inside the outbox."""
    config = DaemonConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox")
    text = json.dumps({"prompt": "x", "output_name": output_name})  # JSON is YAML: escapes NUL exactly
    try:
        resolved = resolve_job(parse_sidecar(text.encode()), config.generation, config.encode, stem="cat")
    except JobRejected as exc:
        assert exc.reason == "sidecar_invalid" and "output_name" in exc.message
        return
    name = resolved.output_name
    assert SAFE_NAME.fullmatch(name), name
    outbox = config.outbox.resolve()
    assert (outbox / f"video_20260101_000000_{name}.mp4").resolve().parent == outbox


# ----- E42 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image_name", "sidecar_name", "output_name"),
    [
        ("caf\u00e9.png", "cafe\u0301.yaml", "cafe"),  # NFC image, NFD sidecar (a macOS client over SMB)
        ("new\nline.png", "new\nline.yaml", "new_line"),
        ("-rf.png", "-rf.yaml", "rf"),
        ("concat:x.png", "concat:x.yaml", "concat_x"),
        ("a" * 251 + ".png", "a" * 251 + ".yml", "a" * 64),  # 255-byte names
        ("日本.png", "日本.yaml", "image"),
    ],
    ids=["nfc_nfd", "newline", "leading_dash", "concat_prefix", "255_bytes", "no_ascii"],
)
def test_e42_awkward_names_are_processed_deterministically(
    tmp_path: Path, image_name: str, sidecar_name: str, output_name: str
) -> None:
    """Checklist E42: NFC/NFD variants pair up; newline, leading '-', `concat:` and 255-byte names are claimed and
    get a safe output name; a name with nothing ASCII left gets `image`. The JSON log escapes the newline, so a
    name cannot forge a log line."""
    harness = Harness(tmp_path / "inbox")
    harness.drop(image_name, image_bytes())
    harness.drop(sidecar_name, SIDECAR)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        (job,) = harness.settle().accepted
    finally:
        structlog.reset_defaults()
    assert job.resolved is not None and job.resolved.output_name == output_name
    assert (job.image_name, job.sidecar_name) == (image_name, sidecar_name)
    lines = stream.getvalue().splitlines()
    claimed = [json.loads(line) for line in lines if '"job_claimed"' in line]
    assert [entry["image"] for entry in claimed] == [image_name]


def test_e42_255_byte_names_survive_repeated_quarantine(tmp_path: Path) -> None:
    """Checklist E42: a 255-byte name rejected twice lands in failed/NAME and failed/NAME-2 (still under the
    255-byte limit) with its original names."""
    harness = Harness(tmp_path / "inbox")
    stem = "b" * 251
    for attempt in ("", "-2"):
        harness.drop(stem + ".png", image_bytes())
        harness.drop(stem + ".yml", b"prompt: x\ncolour: blue\n")
        assert reasons(harness.settle()) == [(stem, "sidecar_invalid")]
        assert (harness.failed(stem + attempt) / (stem + ".yml")).exists()


def test_e42_a_stem_that_grows_in_nfc_past_255_bytes_is_quarantined_under_a_name_that_fits(tmp_path: Path) -> None:
    """Pairing normalises stems to NFC, and some characters grow there (U+1D160, 4 bytes, is 12 in NFC): a
    248-byte stem becomes 744 bytes. Its failed/ folder name is cut (never inside a character) to fit 255 bytes,
    also with `-2`, and holds the files under their own names."""
    harness = Harness(tmp_path / "inbox")
    stem = "\U0001d160" * 62
    for _ in range(2):
        harness.drop(stem + ".png", image_bytes())
        harness.drop(stem + ".yml", b"prompt: x\ncolour: blue\n")
        assert [reason for _, reason in reasons(harness.settle())] == ["sidecar_invalid"]
    folders = sorted((harness.inbox / "failed").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert len(os.fsencode(folder.name)) <= 255
        assert sorted(p.name for p in folder.iterdir()) == sorted([stem + ".png", stem + ".yml", "reason.json"])
    assert list((harness.config.state_path / "jobs").iterdir()) == []


def test_e42_non_utf8_name_is_quarantined_not_dropped(tmp_path: Path) -> None:
    """Checklist E42: a name that is not UTF-8 is quarantined with reason `bad_filename` (never silently skipped,
    as Unmanic does)."""
    harness = Harness(tmp_path / "inbox")
    stem = os.fsdecode(b"bad\xff")
    harness.drop(stem + ".png", image_bytes())
    harness.drop(stem + ".yaml", SIDECAR)
    assert reasons(harness.settle()) == [(stem, "bad_filename")]


# ----- E43 --------------------------------------------------------------------------------------------------------
def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(os.fspath(path))
        server.close()
    elif kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    else:
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "directory"])
def test_e43_non_regular_entries_are_rejected_without_blocking(tmp_path: Path, kind: str) -> None:
    """Checklist E43: a FIFO, socket, device node or directory named `x.png` is refused as `not_regular_file`
    (a FIFO is never opened in blocking mode, so the scan goes on); the next pair in the same scan is accepted."""
    harness = Harness(tmp_path / "i")  # short path: AF_UNIX socket names are limited to 108 bytes
    make_special(harness.inbox / "x.png", kind)
    harness.drop("x.yaml", SIDECAR)
    harness.drop_pair("y")
    result = harness.settle()
    assert reasons(result) == [("x", "not_regular_file")] and [job.stem for job in result.accepted] == ["y"]
    assert rejected_reason(harness, "x") == ("not_regular_file", "x.png")


# ----- E44 --------------------------------------------------------------------------------------------------------
def test_e44_unreadable_file_does_not_stop_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist E44: a mode-000 image. The tests may run as root, which reads anything, so the permission error
    is also injected at `os.open` for that file: it is held for the grace period (permissions are often fixed
    right after a copy), then failed as `unreadable`; other pairs in the same scans are accepted."""
    harness = Harness(tmp_path / "inbox")
    locked = harness.drop("locked.png", image_bytes())
    harness.drop("locked.yaml", SIDECAR)
    os.chmod(locked, 0)
    harness.drop_pair("fine")

    locked_inode = os.stat(locked).st_ino
    real_open = os.open

    def denying(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        try:
            inode = os.stat(path).st_ino
        except OSError:
            inode = None
        if inode == locked_inode:  # the inbox file, and its claimed copy (same inode after the rename)
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying)
    harness.poll()
    first = harness.poll(harness.stable)
    assert [job.stem for job in first.accepted] == ["fine"] and first.rejected == [] and first.settling == 1
    assert harness.poll(harness.grace - 1.0).rejected == []
    result = harness.poll(1.0)
    assert reasons(result) == [("locked", "unreadable")]
    assert "permission denied" in harness.reason("locked")["message"]


# ----- nothing is written outside -----------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    entries: dict[str, tuple[int, int, int]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            changes = (0, 0) if stat.S_ISDIR(info.st_mode) else (info.st_size, info.st_mtime_ns)  # dirs: moves only
            entries[os.path.relpath(path, root)] = (info.st_ino, *changes)
    return entries


def test_nothing_is_ever_written_outside_the_inbox_state_folders(tmp_path: Path) -> None:
    """Checklist E (all): after a batch of hostile pairs (symlinks and hard links to outside files, a symlinked
    folder, bombs, bad sidecars, special files) every new or changed path lies under `inbox/.i2vd/` or
    `inbox/failed/`, and every file outside the inbox is exactly as it was."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes())
    (outside / "private.png").write_bytes(image_bytes())
    (outside / "x.png").write_bytes(image_bytes())
    (outside / "x.yaml").write_bytes(SIDECAR)
    harness = Harness(tmp_path / "inbox")
    (harness.inbox / "s.png").symlink_to(outside / "secret.png")
    harness.drop("s.yaml", SIDECAR)
    os.link(outside / "private.png", harness.inbox / "h.png")
    harness.drop("h.yaml", SIDECAR)
    (harness.inbox / "dir").symlink_to(outside, target_is_directory=True)
    harness.drop_pair("bomb", image=png_header_only(30000, 30000))
    harness.drop_pair("yaml", sidecar=BILLION_LAUGHS.encode())
    harness.drop_pair("name", sidecar=b"prompt: x\noutput_name: ../../../outside/evil\n")
    os.mkfifo(harness.inbox / "f.png")
    harness.drop("f.yaml", SIDECAR)
    before = tree(tmp_path)
    harness.settle()
    after = tree(tmp_path)
    allowed = (os.path.join("inbox", ".i2vd"), os.path.join("inbox", "failed"))
    changed = {path for path in after if before.get(path) != after[path]}
    assert all(path.startswith(allowed) for path in changed), sorted(changed)
    assert {p: v for p, v in before.items() if p.startswith("outside")} == {
        p: v for p, v in after.items() if p.startswith("outside")
    }
    with Image.open(outside / "secret.png") as image:
        assert image.size == (64, 48)


@pytest.mark.parametrize("stem", ["new\nline", "cafe\u0301", "-rf", "tab\there", "bell\x07"])
def test_e42_status_line_stays_single_line_utf8(tmp_path: Path, stem: str) -> None:
    """Checklist E42: the worker's STATUS text carries the stem (`generating NAME ...`); what reaches the notify
    socket is one line of valid UTF-8 whatever the name holds."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(os.fspath(tmp_path / "n.sock"))
    server.settimeout(5)
    try:
        assert SystemdNotifier(os.fspath(tmp_path / "n.sock")).status(f"generating {stem} (attempt 1)")
        message = server.recv(4096).decode("utf-8")
    finally:
        server.close()
    assert message.startswith("STATUS=generating ") and "\n" not in message and message.isprintable()


# ----- the daemon's own folders inside the inbox ------------------------------------------------------------------
@pytest.mark.parametrize("replacement", ["symlink_outside", "file", "dangling_symlink"])
def test_failed_replaced_by_an_inbox_user_is_moved_aside_and_made_again(tmp_path: Path, replacement: str) -> None:
    """Anyone who can write to the inbox can rename `failed/` and put something in its place: a symbolic link to
    a folder outside the inbox (quarantined files and reasons would be written there), a plain file or a dangling
    link (every later mkdir in it would fail and intake would stop). The next poll moves the impostor aside and
    makes the folder again; nothing is written outside the inbox."""
    harness = Harness(tmp_path / "inbox")
    outside = tmp_path / "outside"
    outside.mkdir()
    failed = harness.inbox / "failed"
    failed.rmdir()
    if replacement == "symlink_outside":
        failed.symlink_to(outside)
    elif replacement == "file":
        failed.write_bytes(b"not a folder")
    else:
        failed.symlink_to(tmp_path / "nowhere")
    harness.drop_pair("bad", sidecar=b"prompt: x\ncolour: blue\n")
    harness.drop_pair("good")
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["good"]
    assert reasons(result) == [("bad", "sidecar_invalid")]
    assert failed.is_dir() and not failed.is_symlink()
    assert (failed / "bad" / "reason.json").is_file()
    assert list(outside.iterdir()) == []
    (aside,) = harness.inbox.glob("failed.displaced-*")
    assert aside.is_symlink() == (replacement != "file")


def test_a_trash_folder_replaced_by_a_link_is_never_emptied_through_it(tmp_path: Path) -> None:
    """The start empties the state folder's `trash/`. If an inbox user replaced it with a link to someone's
    folder, that folder's files must survive: the link is moved aside and a real `trash/` made before recovery."""
    inbox = tmp_path / "inbox"
    store = JobStore(inbox, inbox / ".i2vd")
    victim = tmp_path / "victim"
    (victim / "photos").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    store.trash_dir.rmdir()
    store.trash_dir.symlink_to(victim)
    restarted = JobStore(inbox, inbox / ".i2vd")
    assert restarted.recover() == []
    assert sorted(p.name for p in victim.iterdir()) == ["photos", "thesis.tex"]
    assert restarted.trash_dir.is_dir() and not restarted.trash_dir.is_symlink()


def test_a_forged_job_json_cannot_steer_a_rename_outside_its_folders(tmp_path: Path) -> None:
    """A job.json whose names are not single file names (`../../victim/thesis.tex`) is damaged or forged: it is
    quarantined as `state_corrupt`, and no file outside the job's folder is moved or overwritten."""
    inbox = tmp_path / "inbox"
    store = JobStore(inbox, inbox / ".i2vd")
    harness_image = inbox / "cat.png"
    harness_image.write_bytes(image_bytes())
    (inbox / "cat.yaml").write_bytes(SIDECAR)
    job = store.claim(Pair("cat", harness_image, inbox / "cat.yaml"))
    victim = tmp_path / "victim" / "thesis.tex"
    victim.parent.mkdir()
    victim.write_text("years of work")
    state = json.loads((job.directory / "job.json").read_text())
    state["image_name"] = "../../../victim/thesis.tex"
    (job.directory / "job.json").write_text(json.dumps(state))
    restarted = JobStore(inbox, inbox / ".i2vd")
    assert restarted.recover() == []
    assert restarted.recovery_report["corrupt"] == 1
    assert victim.read_text() == "years of work"
    (folder,) = (inbox / "failed").iterdir()
    assert json.loads((folder / "reason.json").read_text())["reason"] == "state_corrupt"


DECODE_KILLS_THE_PROCESS = """\
import os, signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
import daemon.decodebox
from intake_helpers import SIDECAR, Harness, image_bytes
daemon.decodebox.decode_image = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # a decoder crash, not an error
harness = Harness(Path(sys.argv[1]), stable_seconds=0.0, decode_in_child=False)  # decoding here
harness.drop_pair("crash", image=image_bytes((40, 30)))
harness.settle()
"""


def test_an_image_whose_decode_kills_the_daemon_is_refused_at_the_next_start_not_decoded_again(
    tmp_path: Path,
) -> None:
    """With `intake.decode_in_child: false` (decoding in the daemon's own process), a decoder that crashes the
    process (not an exception) on some bytes would kill the daemon at every start, for the pair stays in the inbox.
    The decode leaves a mark while it runs: the next process finds it and refuses
    the pair as `decode_crashed` without decoding it again; an ordinary pair beside it is accepted."""
    inbox = tmp_path / "inbox"
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.run([sys.executable, "-c", DECODE_KILLS_THE_PROCESS, str(inbox)], cwd=repo, timeout=60)
    assert child.returncode == -9
    assert len(list((inbox / ".i2vd" / "decoding").iterdir())) == 1
    harness = Harness(inbox, stable_seconds=0.0, decode_in_child=False)
    harness.drop_pair("fine")
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["fine"]
    assert reasons(result) == [("crash", "decode_crashed")]
    assert list((inbox / ".i2vd" / "decoding").iterdir()) == []
    again = Harness(inbox, stable_seconds=0.0, decode_in_child=False)  # the same bytes get one more try
    again.drop_pair("retry", image=image_bytes((40, 30)))
    assert [job.stem for job in again.settle().accepted] == ["retry"]


def test_a_claimed_job_whose_validation_killed_the_daemon_is_refused_when_revalidated(tmp_path: Path) -> None:
    """The same for a pair claimed but not yet validated when the process died: the start validates it again,
    finds the mark of its image, and refuses it (`decode_crashed`) instead of decoding it."""
    inbox = tmp_path / "inbox"
    store = JobStore(inbox, inbox / ".i2vd")
    data = image_bytes((40, 30))
    (inbox / "cat.png").write_bytes(data)
    (inbox / "cat.yaml").write_bytes(SIDECAR)
    job = store.claim(Pair("cat", inbox / "cat.png", inbox / "cat.yaml"))
    (store.decoding_dir / hashlib.sha256(data).hexdigest()).write_bytes(b"")  # what the killed decode left
    config = DaemonConfig(inbox=inbox, intake=IntakeConfig(decode_in_child=False))  # decoding in this process
    with pytest.raises(JobRejected) as caught:
        validate_claimed(job, config, guard_dir=store.decoding_dir)
    assert caught.value.reason == "decode_crashed" and "cat.png" in caught.value.message
    assert validate_claimed(job, config, guard_dir=store.decoding_dir)[1] == hashlib.sha256(data).hexdigest()

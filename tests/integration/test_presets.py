"""Every preset of the library through the real bundled ffmpeg, checked from the produced files themselves
(container magic bytes, an independent full decode, Pillow), plus failure injection on the variant path."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from daemon.config import DEFAULT_VARIANTS, EncodeConfig, VariantSpec
from daemon.encode import Encoder, MediaInfo
from daemon.errors import TransientJobError

pytestmark = pytest.mark.integration

FRAMES, WIDTH, HEIGHT, FPS = 16, 96, 64, 8
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def moving_clip() -> npt.NDArray[np.uint8]:
    y = np.linspace(0, 180, HEIGHT)[None, :, None]
    x = np.linspace(0, 180, WIDTH)[None, None, :]
    t = np.arange(FRAMES)[:, None, None] * 4
    clip = np.zeros((FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    clip[..., 0] = np.broadcast_to(x + t, (FRAMES, HEIGHT, WIDTH)).astype(np.uint8)
    clip[..., 1] = np.broadcast_to(y + 2 * t, (FRAMES, HEIGHT, WIDTH)).astype(np.uint8)
    clip[..., 2] = 90
    return clip


def decoded_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) from an independent full decode to raw RGB (not `Encoder.probe`)."""
    header = subprocess.run([FFMPEG, "-nostdin", "-i", f"file:{path}"], capture_output=True, text=True, timeout=60)
    size = next(
        token
        for line in header.stderr.splitlines()
        if "Video:" in line
        for token in line.replace(",", " ").split()
        if "x" in token and token.split("x")[0].isdigit() and token.split("x")[1].isdigit()
    )
    width, height = (int(n) for n in size.split("x"))
    argv = [FFMPEG, "-nostdin", "-v", "error", "-i", f"file:{path}", "-fps_mode", "passthrough"]
    raw = subprocess.run([*argv, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, timeout=60).stdout
    return len(raw) // (width * height * 3), width, height


MAGIC = {
    "mp4": lambda data: data[4:8] == b"ftyp" and b"avc1" in data,
    "webm": lambda data: data[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in data[:64] and b"V_VP9" in data,
    "gif": lambda data: data[:6] == b"GIF89a",
    "png": lambda data: data[:8] == b"\x89PNG\r\n\x1a\n",
    "jpg": lambda data: data[:3] == b"\xff\xd8\xff",
}


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(EncodeConfig())


@pytest.fixture(scope="module")
def source(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MediaInfo]:
    path = tmp_path_factory.mktemp("src") / "main.mp4"
    return path, encoder.write_video(moving_clip(), FPS, path)


# name -> (width, height, frames, fps) the file must hold
EXPECTED = {
    "vertical": (1080, 1920, 16, 8.0),
    "square": (1080, 1080, 16, 8.0),
    "landscape": (1920, 1080, 16, 8.0),
    "fps30": (WIDTH, HEIGHT, 60, 30.0),
    "first_frame": (WIDTH, HEIGHT, 1, None),
    "poster": (WIDTH, HEIGHT, 1, None),
    "gif": (WIDTH, HEIGHT, 16, 8.0),
    "webm": (WIDTH, HEIGHT, 16, 8.0),
    "contact_sheet": (4 * 256, 2 * 256, 1, None),
}


@pytest.mark.parametrize("name", sorted(DEFAULT_VARIANTS))
def test_every_preset_produces_what_it_declares(
    encoder: Encoder, source: tuple[Path, MediaInfo], tmp_path: Path, name: str
) -> None:
    spec = DEFAULT_VARIANTS[name]
    destination = tmp_path / f"out.{name}.{spec.ext}"
    info = encoder.make_variant(name, spec, source[0], source[1], destination)
    width, height, frames, fps = EXPECTED[name]
    assert MAGIC[spec.ext](destination.read_bytes()), f"{name}: not a {spec.ext} file"
    assert (info.width, info.height, info.frames) == (width, height, frames)
    if spec.ext == "gif":
        with Image.open(destination) as image:
            assert (image.n_frames, image.size) == (frames, (width, height))
            assert image.info["loop"] == 0
    elif spec.kind in ("image", "sheet"):
        with Image.open(destination) as image:
            assert image.size == (width, height)
    else:
        assert decoded_frames(destination) == (frames, width, height)
        counted, seconds = imageio_ffmpeg.count_frames_and_secs(str(destination))
        assert counted == frames and counted / seconds == pytest.approx(fps, rel=0.05)
    if fps is not None and spec.ext != "gif":
        assert info.fps == pytest.approx(fps)


def test_poster_is_the_middle_frame_and_sheet_holds_first_and_last(
    encoder: Encoder, source: tuple[Path, MediaInfo], tmp_path: Path
) -> None:
    clip = moving_clip()
    encoder.make_variant("poster", DEFAULT_VARIANTS["poster"], *source, tmp_path / "p.jpg")
    with Image.open(tmp_path / "p.jpg") as image:
        poster = np.asarray(image.convert("RGB")).astype(np.int16)
    errors = [float(np.abs(poster - frame).mean()) for frame in clip]
    assert int(np.argmin(errors)) == (FRAMES - 1) // 2
    spec = VariantSpec(kind="sheet", ext="png", width=WIDTH, height=HEIGHT, columns=2, rows=1)
    encoder.make_variant("sheet", spec, *source, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as image:
        sheet = np.asarray(image.convert("RGB")).astype(np.int16)
    assert float(np.abs(sheet[:, :WIDTH] - clip[0]).mean()) < 6
    assert float(np.abs(sheet[:, WIDTH:] - clip[-1]).mean()) < 6


def test_interpolated_retime_keeps_duration(encoder: Encoder, source: tuple[Path, MediaInfo], tmp_path: Path) -> None:
    spec = VariantSpec(kind="video", ext="mp4", fps=24, interpolate=True, preset="ultrafast")
    info = encoder.make_variant("smooth", spec, *source, tmp_path / "smooth.mp4")
    assert abs(info.frames - 48) <= 1 and info.fps == pytest.approx(24.0)
    assert decoded_frames(tmp_path / "smooth.mp4")[0] == info.frames


def fake_ffmpeg(directory: Path, body: str) -> Path:
    """A wrapper that runs the real ffmpeg for probes and misbehaves on the variant command (no `-f null`)."""
    script = directory / "ffmpeg.sh"
    script.write_text(
        f'#!/bin/sh\ncase "$*" in *"-f null"*) exec "{FFMPEG}" "$@";; esac\n'
        f'for last; do :; done\nout="${{last#file:}}"\n{body}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('"' + FFMPEG + '" "$@" & pid=$!; kill -9 $pid; wait $pid; exit $?', "exit status 137"),
        ('echo "Conversion failed!" >&2; exit 1', "exit status 1: Conversion failed!"),
        (
            '"' + FFMPEG + '" "$@" || exit $?; size=$(wc -c < "$out"); head -c $((size / 3)) "$out" > "$out.t"; '
            'mv "$out.t" "$out"',
            "failed verification|cannot read back",
        ),
    ],
    ids=["killed", "exit-1", "truncated"],
)
def test_variant_failures_are_transient_and_leave_no_file(
    source: tuple[Path, MediaInfo], tmp_path: Path, body: str, match: str
) -> None:
    encoder = Encoder(EncodeConfig(ffmpeg=fake_ffmpeg(tmp_path, body)))
    destination = tmp_path / "v.mp4"
    with pytest.raises(TransientJobError, match=match):
        encoder.make_variant("vertical", DEFAULT_VARIANTS["vertical"], *source, destination)
    assert not destination.exists()


def test_hung_variant_is_killed_at_its_timeout(source: tuple[Path, MediaInfo], tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = fake_ffmpeg(tmp_path, f'echo $$ > "{pid_file}"; sleep 60')
    encoder = Encoder(EncodeConfig(ffmpeg=script, timeout_seconds=1))
    started = time.monotonic()
    with pytest.raises(TransientJobError, match=r"variant gif\) timed out after 1 s"):
        encoder.make_variant("gif", DEFAULT_VARIANTS["gif"], *source, tmp_path / "v.gif")
    assert time.monotonic() - started < 5
    pgid = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        os.killpg(pgid, signal.SIGKILL)
        pytest.fail("the hung ffmpeg's process group survived the timeout")

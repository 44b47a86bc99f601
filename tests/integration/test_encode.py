"""The encoder against the real bundled ffmpeg: main MP4, every variant kind, and the failure paths."""

from __future__ import annotations

import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from daemon.config import DEFAULT_VARIANTS, EncodeConfig, VariantSpec
from daemon.encode import Encoder, MediaInfo, expected_variant_frames, parse_probe_report
from daemon.errors import ConfigError, FatalError, TransientJobError

pytestmark = pytest.mark.integration

FRAMES, SIZE, FPS = 8, 64, 8


def gradient_clip(frames: int = FRAMES, height: int = SIZE, width: int = SIZE) -> npt.NDArray[np.uint8]:
    """Smooth horizontal/vertical ramps plus a per-frame offset: easy for x264, distinct per frame."""
    y = np.linspace(0, 200, height)[None, :, None]
    x = np.linspace(0, 200, width)[None, None, :]
    t = np.arange(frames)[:, None, None] * 6
    clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
    clip[..., 0] = np.broadcast_to(x + t, (frames, height, width)).astype(np.uint8)
    clip[..., 1] = np.broadcast_to(y + t, (frames, height, width)).astype(np.uint8)
    clip[..., 2] = 128
    return clip


def decode(path: Path, width: int, height: int) -> npt.NDArray[np.uint8]:
    """Every frame as RGB, decoded by the bundled ffmpeg independently of `Encoder.probe`.

    (Not `imageio_ffmpeg.read_frames`: when ffmpeg has already exited it leaves its pipes open, a
    ResourceWarning that `filterwarnings = error` turns into a failure.)
    """
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", f"file:{path}"]
    argv += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)


def mean_abs_error(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def write_script(directory: Path, body: str) -> Path:
    script = directory / "fake-ffmpeg.sh"
    script.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(EncodeConfig())


@pytest.fixture(scope="module")
def clip() -> npt.NDArray[np.uint8]:
    return gradient_clip()


@pytest.fixture(scope="module")
def main_video(encoder: Encoder, clip: npt.NDArray[np.uint8], tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("main") / "main.mp4"
    encoder.write_video(clip, FPS, destination)
    return destination


@pytest.fixture(scope="module")
def main_info(encoder: Encoder, main_video: Path) -> MediaInfo:
    return encoder.probe(main_video)


def test_write_video_produces_verified_h264(encoder: Encoder, clip: npt.NDArray[np.uint8], tmp_path: Path) -> None:
    info = encoder.write_video(clip, FPS, tmp_path / "out.mp4")
    assert info == MediaInfo("h264", SIZE, SIZE, FRAMES, 8.0, 1.0, "yuv420p")
    assert encoder.probe(tmp_path / "out.mp4") == info


def test_main_video_decodes_back_to_the_input(main_video: Path, clip: npt.NDArray[np.uint8]) -> None:
    frames = decode(main_video, SIZE, SIZE)
    assert frames.shape == clip.shape
    assert imageio_ffmpeg.count_frames_and_secs(str(main_video)) == (FRAMES, pytest.approx(1.0, abs=0.2))
    assert mean_abs_error(frames, clip) < 4.0
    data = main_video.read_bytes()
    assert data[4:8] == b"ftyp"
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # +faststart: the index precedes the media data


def test_vertical_variant_pads_with_black_bars(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, clip: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    spec = DEFAULT_VARIANTS["vertical"]
    info = encoder.make_variant("vertical", spec, main_video, main_info, tmp_path / "v.mp4")
    assert (info.codec, info.width, info.height, info.frames, info.fps) == ("h264", 1080, 1920, FRAMES, 8.0)
    frames = decode(tmp_path / "v.mp4", 1080, 1920)
    first = frames[0]
    # A square source scaled to 1080x1080 sits in the middle: 420 black rows above and below.
    assert first[:400].max() < 24 and first[-400:].max() < 24
    middle = np.asarray(Image.fromarray(first[420:1500]).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert mean_abs_error(middle, clip[0]) < 8.0


def test_fps30_variant_retimes_keeping_duration(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, tmp_path: Path
) -> None:
    spec = DEFAULT_VARIANTS["fps30"]
    info = encoder.make_variant("fps30", spec, main_video, main_info, tmp_path / "f.mp4")
    assert expected_variant_frames(spec, main_info) == 30
    assert abs(info.frames - 30) <= 1
    assert info.fps == pytest.approx(30.0)
    assert info.duration_seconds == pytest.approx(1.0, abs=0.04)
    assert (info.width, info.height) == (SIZE, SIZE)


@pytest.mark.parametrize("fps", [4.0, 12.5, 23.976])
def test_fps_retime_to_other_rates(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, tmp_path: Path, fps: float
) -> None:
    spec = VariantSpec(kind="video", ext="mp4", fps=fps, preset="ultrafast")
    info = encoder.make_variant("retimed", spec, main_video, main_info, tmp_path / "r.mp4")
    assert abs(info.frames - round(fps)) <= 1
    assert info.fps == pytest.approx(fps, abs=0.01)


def test_first_frame_png_matches_first_frame(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, clip: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    spec = DEFAULT_VARIANTS["first_frame"]
    info = encoder.make_variant("first_frame", spec, main_video, main_info, tmp_path / "first.png")
    assert (info.codec, info.width, info.height, info.frames) == ("png", SIZE, SIZE, 1)
    with Image.open(tmp_path / "first.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert mean_abs_error(pixels, clip[0]) < 4.0
    assert mean_abs_error(pixels, clip[0]) < mean_abs_error(pixels, clip[-1])


def test_jpg_frame_is_clamped_to_last_frame(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, clip: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    spec = VariantSpec(kind="image", ext="jpg", frame=99)
    info = encoder.make_variant("poster", spec, main_video, main_info, tmp_path / "poster.jpg")
    assert (info.codec, info.width, info.height) == ("mjpeg", SIZE, SIZE)
    with Image.open(tmp_path / "poster.jpg") as image:
        assert image.format == "JPEG"
        pixels = np.asarray(image.convert("RGB"))
    assert mean_abs_error(pixels, clip[-1]) < mean_abs_error(pixels, clip[0])


@pytest.mark.parametrize(
    ("fit", "width", "height"),
    [("pad", 128, 64), ("crop", 128, 64), ("stretch", 96, 32), ("pad", 32, 48)],
)
def test_video_fits(
    encoder: Encoder,
    main_video: Path,
    main_info: MediaInfo,
    tmp_path: Path,
    fit: str,
    width: int,
    height: int,
) -> None:
    spec = VariantSpec.model_validate(
        {"kind": "video", "ext": "mp4", "width": width, "height": height, "fit": fit, "preset": "ultrafast"}
    )
    info = encoder.make_variant("sized", spec, main_video, main_info, tmp_path / "s.mp4")
    assert (info.width, info.height, info.frames) == (width, height, FRAMES)
    frames = decode(tmp_path / "s.mp4", width, height)
    side_columns = frames[0][:, : width // 8]
    if fit == "pad" and width > height:
        assert side_columns.max() < 24  # bars left and right
    else:
        assert side_columns.max() > 40  # picture reaches the edge


def test_image_variant_with_custom_size(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, tmp_path: Path
) -> None:
    spec = VariantSpec(kind="image", ext="png", width=32, height=48, fit="crop", frame=3)
    info = encoder.make_variant("thumb", spec, main_video, main_info, tmp_path / "t.png")
    assert (info.width, info.height) == (32, 48)
    with Image.open(tmp_path / "t.png") as image:
        assert image.size == (32, 48)


def test_awkward_output_paths_work(
    encoder: Encoder,
    main_info: MediaInfo,
    clip: npt.NDArray[np.uint8],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "dir with spaces"
    directory.mkdir()
    destination = directory / "-ünï cødé 50%d:x.mp4"
    assert encoder.write_video(clip, FPS, destination).frames == FRAMES
    spec = DEFAULT_VARIANTS["first_frame"]
    image = directory / "-frame %03d.png"
    encoder.make_variant("first_frame", spec, destination, main_info, image)
    assert image.is_file()
    monkeypatch.chdir(directory)
    relative = Path("-relative name.mp4")
    encoder.write_video(clip, FPS, relative)
    assert (directory / relative).is_file()
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        ["-ünï cødé 50%d:x.mp4", "-frame %03d.png", "-relative name.mp4"]
    )


def test_rejects_bad_frame_arrays(encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encoder.write_video(np.zeros((2, 8, 8, 3), dtype=np.uint16), 8, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="even"):
        encoder.write_video(np.zeros((2, 9, 8, 3), dtype=np.uint8), 8, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="fps >= 1"):
        encoder.write_video(np.zeros((2, 8, 8, 3), dtype=np.uint8), 0, tmp_path / "x.mp4")


def test_missing_ffmpeg_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope/ffmpeg"):
        Encoder(EncodeConfig(ffmpeg=tmp_path / "nope" / "ffmpeg"))


def test_ffmpeg_vanishing_after_start_is_fatal(tmp_path: Path, clip: npt.NDArray[np.uint8]) -> None:
    script = write_script(tmp_path, "exit 0\n")
    encoder = Encoder(EncodeConfig(ffmpeg=script))
    script.unlink()
    with pytest.raises(FatalError, match="cannot run ffmpeg"):
        encoder.write_video(clip, FPS, tmp_path / "out.mp4")


def test_ffmpeg_failure_carries_stderr(tmp_path: Path, clip: npt.NDArray[np.uint8]) -> None:
    script = write_script(tmp_path, 'echo "noise" >&2\necho "boom: encoder exploded" >&2\nexit 1\n')
    encoder = Encoder(EncodeConfig(ffmpeg=script))
    with pytest.raises(TransientJobError, match="exit status 1: boom: encoder exploded") as raised:
        encoder.write_video(clip, FPS, tmp_path / "out.mp4")
    assert raised.value.detail["returncode"] == 1
    assert "noise\nboom: encoder exploded" in raised.value.detail["stderr"]
    assert not (tmp_path / "out.mp4").exists()


def test_ffmpeg_that_exits_zero_without_output_is_caught(
    tmp_path: Path, clip: npt.NDArray[np.uint8], main_video: Path, main_info: MediaInfo
) -> None:
    """The imageio-ffmpeg pitfall: a zero exit status proves nothing; the read-back does."""
    encoder = Encoder(EncodeConfig(ffmpeg=write_script(tmp_path, "cat >/dev/null\nexit 0\n")))
    with pytest.raises(TransientJobError, match="cannot read back"):
        encoder.write_video(clip, FPS, tmp_path / "out.mp4")
    with pytest.raises(TransientJobError, match="cannot read back"):
        encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], main_video, main_info, tmp_path / "v.mp4")


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (a zombie is dead, only waiting for its reaper)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_for_group_gone(pgid: int, deadline: float = 3.0) -> list[int]:
    end = time.monotonic() + deadline
    while (members := live_group_members(pgid)) and time.monotonic() < end:
        time.sleep(0.02)
    return members


def test_hanging_ffmpeg_is_killed_with_its_group(tmp_path: Path, clip: npt.NDArray[np.uint8]) -> None:
    pid_file = tmp_path / "pid"
    script = write_script(tmp_path, f'echo $$ > "{pid_file}"\necho "stuck" >&2\nsleep 60 &\nsleep 60\n')
    encoder = Encoder(EncodeConfig(ffmpeg=script, timeout_seconds=1.0))
    started = time.monotonic()
    with pytest.raises(TransientJobError, match=r"ffmpeg \(main video\) timed out after 1 s") as raised:
        encoder.write_video(clip, FPS, tmp_path / "out.mp4")  # 98 KiB of frames: the stdin pipe fills up
    assert time.monotonic() - started < 5.0
    assert "stuck" in raised.value.detail["stderr"]
    pgid = int(pid_file.read_text())
    assert wait_for_group_gone(pgid) == []


def test_probe_mismatch_fails_verification(
    encoder: Encoder, clip: npt.NDArray[np.uint8], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_probe = Encoder.probe

    def short_probe(self: Encoder, path: Path) -> MediaInfo:
        return replace(real_probe(self, path), frames=FRAMES - 1)

    monkeypatch.setattr(Encoder, "probe", short_probe)
    with pytest.raises(TransientJobError, match="frames 7 != expected 8") as raised:
        encoder.write_video(clip, FPS, tmp_path / "out.mp4")
    assert raised.value.detail["got"]["frames"] == FRAMES - 1
    assert not (tmp_path / "out.mp4").exists()


def test_variant_mismatch_names_the_variant(
    encoder: Encoder, main_video: Path, main_info: MediaInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_probe = Encoder.probe

    def wrong_size_probe(self: Encoder, path: Path) -> MediaInfo:
        return replace(real_probe(self, path), width=720)

    monkeypatch.setattr(Encoder, "probe", wrong_size_probe)
    spec = VariantSpec(kind="video", ext="mp4", width=64, height=32, preset="ultrafast")
    with pytest.raises(TransientJobError, match=r"variant small failed verification: width 720 != expected 64"):
        encoder.make_variant("small", spec, main_video, main_info, tmp_path / "v.mp4")
    with pytest.raises(TransientJobError, match="variant first_frame: expected PNG 64x64"):
        encoder.make_variant("first_frame", DEFAULT_VARIANTS["first_frame"], main_video, main_info, tmp_path / "f.png")


REPORT = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/x.mp4':
  Duration: 00:00:02.50, start: 0.000000, bitrate: 22 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 1920x1080 \
[SAR 1:1 DAR 16:9], 14 kb/s, 29.97 fps, 29.97 tbr, 30k tbn (default)
  Stream #0:1[0x2](und): Audio: aac (LC), 48000 Hz, stereo
Stream mapping:
  Stream #0:0 -> #0:0 (h264 (native) -> wrapped_avframe (native))
  Stream #0:0(und): Video: wrapped_avframe, rgb24, 2x2, 1 fps
"""


def test_parse_probe_report() -> None:
    info = parse_probe_report(REPORT, "frame=70\nprogress=continue\nframe=75\nprogress=end\n")
    assert info == MediaInfo("h264", 1920, 1080, 75, 29.97, 2.5, "yuv420p")


def test_parse_probe_report_image_without_duration() -> None:
    report = "  Duration: N/A, bitrate: N/A\n  Stream #0:0: Video: png, rgb24(pc, gbr/unknown), 4x2, 25 tbr\n"
    assert parse_probe_report(report, "frame=1\n") == MediaInfo("png", 4, 2, 1, 25.0, 0.04, "rgb24")


def test_parse_probe_report_without_video() -> None:
    with pytest.raises(ValueError, match="no video stream"):
        parse_probe_report("  Stream #0:0: Audio: aac\n", "frame=0\n")


def test_expected_variant_frames(main_info: MediaInfo) -> None:
    assert expected_variant_frames(DEFAULT_VARIANTS["vertical"], main_info) == FRAMES
    assert expected_variant_frames(DEFAULT_VARIANTS["first_frame"], main_info) == 1
    assert expected_variant_frames(VariantSpec(kind="video", ext="mp4", fps=12.5), main_info) == 12
    assert expected_variant_frames(VariantSpec(kind="video", ext="mp4", fps=4), main_info) == 4

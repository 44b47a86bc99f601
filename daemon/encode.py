"""MP4 writing and ffmpeg finishing variants, each verified by reading the produced file back.

Every ffmpeg run is an argv list (never a shell) built only from our own numbers and absolute `file:`
paths, in a new session so that a timeout can kill the whole process group; the last few KiB of stderr are
kept for the error. Nothing is trusted on exit status alone: imageio-ffmpeg's writer does not notice when
ffmpeg dies (DESIGN.md §5), so each output is decoded again and its codec, size, frame count, rate and
duration are compared with what was asked.
The bundled ffmpeg has no ffprobe, so `probe` decodes with ffmpeg itself and parses its report.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
from PIL import Image

from daemon.config import EncodeConfig, VariantSpec
from daemon.errors import ConfigError, FatalError, TransientJobError

STDERR_TAIL_BYTES = 4096
_PROBE_STDERR_BYTES = 64 * 1024
_WRITE_CHUNK_BYTES = 1 << 20
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_VIDEO_STREAM = re.compile(r"Stream #\d+:\d+\S*: Video: (.*)")
_SIZE = re.compile(r"^(\d+)x(\d+)")
_RATE = re.compile(r"^([\d.]+)(k?) (fps|tbr)$")


@dataclass(frozen=True)
class MediaInfo:
    """What was read back from a produced file (for an image: one frame, fps and duration 0)."""

    codec: str
    width: int
    height: int
    frames: int
    fps: float
    duration_seconds: float
    pix_fmt: str


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: bytes
    stderr: str


def expected_variant_frames(spec: VariantSpec, source_info: MediaInfo) -> int:
    """Frames a variant made from `source_info` must have: 1 for an image; for an `fps` re-time the duration
    stays, so round(frames / source fps * new fps) (the `fps` filter may differ by one); else unchanged."""
    if spec.kind == "image":
        return 1
    if spec.fps is None or source_info.fps <= 0:
        return source_info.frames
    return max(1, round(source_info.frames / source_info.fps * spec.fps))


def _file_url(path: Path) -> str:
    """`file:` + absolute path: a name starting with '-' or holding ':' is never an option/protocol."""
    return f"file:{path.absolute()}"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill ffmpeg and anything it started (it runs in its own session, so its pid is the group id)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _feed_stdin(stdin: IO[bytes], data: memoryview) -> None:
    """Write `data` to ffmpeg's stdin; a reader that died (EPIPE) is reported by its exit status instead."""
    try:
        for start in range(0, len(data), _WRITE_CHUNK_BYTES):
            stdin.write(data[start : start + _WRITE_CHUNK_BYTES])
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(OSError):
            stdin.close()


def _read_tail(handle: IO[bytes], limit: int) -> bytes:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - limit))
    return handle.read()


def _spawn(argv: list[str], *, stdin: int, stdout: IO[bytes], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True)
    except (FileNotFoundError, PermissionError) as exc:
        message = f"cannot run ffmpeg at {argv[0]}: {exc.strerror}"
        raise FatalError(message, detail={"ffmpeg": argv[0]}) from exc
    except OSError as exc:
        raise TransientJobError(f"cannot start ffmpeg: {exc.strerror}", detail={"ffmpeg": argv[0]}) from exc


def _run_process(
    argv: list[str],
    timeout: float,
    what: str,
    stdin_data: memoryview | None = None,
    stderr_limit: int = STDERR_TAIL_BYTES,
) -> _Completed:
    """Run `argv` in a new session; stdout/stderr go to temporary files (no pipe can fill up and deadlock
    us), stdin is fed from a thread (so the timeout holds even if ffmpeg stops reading). On timeout the whole
    process group is killed and `TransientJobError` raised."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL
        process = _spawn(argv, stdin=stdin, stdout=out, stderr=err)
        feeder = None
        if stdin_data is not None and process.stdin is not None:
            feeder = threading.Thread(target=_feed_stdin, args=(process.stdin, stdin_data), daemon=True)
            feeder.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            tail = _read_tail(err, stderr_limit).decode("utf-8", "replace")
            raise TransientJobError(
                f"ffmpeg ({what}) timed out after {timeout:g} s and was killed",
                detail={"argv": argv, "stderr": tail, "timeout_seconds": timeout},
            ) from None
        finally:
            if process.returncode is None:  # interrupted (KeyboardInterrupt...): leave nothing running
                _kill_group(process)
            if feeder is not None:
                feeder.join(timeout=5.0)
        out.seek(0)
        return _Completed(returncode, out.read(), _read_tail(err, stderr_limit).decode("utf-8", "replace"))


def _split_top_level(text: str) -> list[str]:
    """Split ffmpeg's stream description on commas outside parentheses: `yuv420p(tv, bt709)` stays whole."""
    parts: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    parts.append(text[start:].strip())
    return parts


def _parse_rate(fields: list[str]) -> float:
    """The stream's `N fps` (average rate), else `N tbr`; 0.0 when neither is given."""
    rates: dict[str, float] = {}
    for field in fields:
        match = _RATE.match(field)
        if match:
            rates[match.group(3)] = float(match.group(1)) * (1000.0 if match.group(2) else 1.0)
    return rates.get("fps", rates.get("tbr", 0.0))


def parse_probe_report(stderr: str, progress: str) -> MediaInfo:
    """Build `MediaInfo` from `ffmpeg -i FILE ... -progress pipe:1` output (the input header and the last
    `frame=` line of the progress report). Raises `ValueError` when no video stream is described."""
    header = stderr.split("Stream mapping:", 1)[0]
    stream = _VIDEO_STREAM.search(header)
    if stream is None:
        raise ValueError("no video stream in ffmpeg's report")
    fields = _split_top_level(stream.group(1))
    codec = fields[0].split(" ", 1)[0]
    pix_fmt = fields[1].split("(", 1)[0] if len(fields) > 1 else ""
    size = next((m for m in (_SIZE.match(field) for field in fields) if m), None)
    if size is None:
        raise ValueError("no frame size in ffmpeg's report")
    counts = re.findall(r"^frame=\s*(\d+)", progress, flags=re.MULTILINE)
    frames = int(counts[-1]) if counts else 0
    fps = _parse_rate(fields)
    duration = _DURATION.search(header)
    if duration is not None:
        hours, minutes, seconds = duration.groups()
        duration_seconds = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    else:
        duration_seconds = frames / fps if fps > 0 else 0.0
    return MediaInfo(codec, int(size.group(1)), int(size.group(2)), frames, fps, duration_seconds, pix_fmt)


def _scale_filters(width: int, height: int, fit: str) -> list[str]:
    if fit == "pad":
        return [
            f"scale={width}:{height}:force_original_aspect_ratio=decrease:force_divisible_by=2",
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black",
            "setsar=1",
        ]
    if fit == "crop":
        return [
            f"scale={width}:{height}:force_original_aspect_ratio=increase:force_divisible_by=2",
            f"crop={width}:{height}",
            "setsar=1",
        ]
    return [f"scale={width}:{height}", "setsar=1"]


def variant_filters(spec: VariantSpec, source_info: MediaInfo) -> list[str]:
    """The `-vf` chain for `spec`, from its declarative fields only."""
    filters: list[str] = []
    if spec.kind == "image":
        frame = min(spec.frame, max(0, source_info.frames - 1))
        filters.append(f"select=eq(n\\,{frame})")
    if spec.width is not None and spec.height is not None:
        filters.extend(_scale_filters(spec.width, spec.height, spec.fit))
    if spec.kind == "video" and spec.fps is not None:
        filters.append(f"fps={spec.fps:.10g}")
    return filters


def _output_options(spec: VariantSpec) -> list[str]:
    if spec.kind == "video":
        return [
            *("-c:v", spec.codec, "-crf", str(spec.crf), "-preset", spec.preset, "-pix_fmt", "yuv420p"),
            *("-movflags", "+faststart", "-f", "mp4"),
        ]
    codec = ["-c:v", "png", "-pix_fmt", "rgb24"] if spec.ext == "png" else ["-c:v", "mjpeg", "-q:v", "2"]
    # `-update 1`: one image written to exactly this name (no `%d` pattern expansion of the file name).
    return ["-frames:v", "1", *codec, "-update", "1", "-f", "image2"]


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class Encoder:
    """Writes the main MP4 from frames and derives the finishing variants from it, verifying every output."""

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config
        if config.ffmpeg is not None:
            if not (config.ffmpeg.is_file() and os.access(config.ffmpeg, os.X_OK)):
                raise ConfigError(f"encode.ffmpeg: {config.ffmpeg} is not an executable file")
            self.ffmpeg = str(config.ffmpeg.absolute())
        else:
            self.ffmpeg = str(imageio_ffmpeg.get_ffmpeg_exe())

    def _run(self, argv: list[str], what: str, stdin_data: memoryview | None = None) -> _Completed:
        result = _run_process([self.ffmpeg, *argv], self.config.timeout_seconds, what, stdin_data)
        if result.returncode != 0:
            last_line = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise TransientJobError(
                f"ffmpeg failed ({what}) with exit status {result.returncode}: {last_line[0]}",
                detail={
                    "argv": [self.ffmpeg, *argv],
                    "returncode": result.returncode,
                    "stderr": result.stderr,
                },
            )
        return result

    def write_video(self, frames: npt.NDArray[np.uint8], fps: int, destination: Path) -> MediaInfo:
        """Encode RGB frames (F, H, W, 3) uint8 as H.264/yuv420p MP4 (faststart) at `fps`, then verify it."""
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise ValueError(f"frames must be (F, H, W, 3) uint8, F >= 1; got {frames.shape} {frames.dtype}")
        count, height, width = frames.shape[:3]
        if width % 2 or height % 2 or fps < 1:
            raise ValueError(f"need even width and height (yuv420p) and fps >= 1, got {width}x{height} at {fps}")
        data = np.ascontiguousarray(frames).data.cast("B")
        # No -nostdin: stdin carries the frames (ffmpeg turns its key handling off itself for pipe: input).
        argv = [
            *("-hide_banner", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"),
            *("-video_size", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0", "-an"),
            *("-c:v", "libx264", "-crf", str(self.config.crf), "-preset", self.config.preset),
            *("-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", _file_url(destination)),
        ]
        try:
            self._run(argv, "main video", stdin_data=data)
            info = self.probe(destination)
            expected = MediaInfo("h264", width, height, count, float(fps), count / fps, "yuv420p")
            self._check_video("main video", info, expected, frame_slack=0)
        except BaseException:
            _remove_quietly(destination)
            raise
        return info

    def make_variant(
        self, name: str, spec: VariantSpec, source: Path, source_info: MediaInfo, destination: Path
    ) -> MediaInfo:
        """Derive variant `name` from `source` as `spec` declares, into `destination`, and verify it."""
        filters = variant_filters(spec, source_info)
        argv = [
            *("-nostdin", "-hide_banner", "-y", "-v", "error"),
            *("-i", _file_url(source), "-map", "0:v:0", "-an"),
            *(["-vf", ",".join(filters)] if filters else []),
            *_output_options(spec),
            _file_url(destination),
        ]
        try:
            self._run(argv, f"variant {name}")
            if spec.kind == "video":
                return self._verify_video_variant(name, spec, source_info, destination)
            return self._verify_image_variant(name, spec, source_info, destination)
        except BaseException:
            _remove_quietly(destination)
            raise

    def _verify_video_variant(
        self, name: str, spec: VariantSpec, source_info: MediaInfo, destination: Path
    ) -> MediaInfo:
        info = self.probe(destination)
        fps = spec.fps if spec.fps is not None else source_info.fps
        expected = MediaInfo(
            "h264",
            spec.width if spec.width is not None else source_info.width,
            spec.height if spec.height is not None else source_info.height,
            expected_variant_frames(spec, source_info),
            fps,
            source_info.duration_seconds,
            "yuv420p",
        )
        self._check_video(f"variant {name}", info, expected, frame_slack=1 if spec.fps is not None else 0)
        return info

    def _verify_image_variant(
        self, name: str, spec: VariantSpec, source_info: MediaInfo, destination: Path
    ) -> MediaInfo:
        want = (spec.width or source_info.width, spec.height or source_info.height)
        info = self.probe(destination)
        try:
            with Image.open(destination) as image:
                image.load()
                size, image_format = image.size, image.format or "?"
        except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise TransientJobError(f"variant {name}: produced image does not decode: {exc}") from exc
        expected_format = "PNG" if spec.ext == "png" else "JPEG"
        if size != want or image_format != expected_format or (info.width, info.height) != want:
            raise TransientJobError(
                f"variant {name}: expected {expected_format} {want[0]}x{want[1]}, got {image_format} "
                f"{size[0]}x{size[1]}",
                detail={"variant": name, "expected": list(want), "got": list(size)},
            )
        return replace(info, frames=1, fps=0.0, duration_seconds=0.0)

    @staticmethod
    def _check_video(what: str, info: MediaInfo, expected: MediaInfo, frame_slack: int) -> None:
        problems: list[str] = []
        for field in ("codec", "width", "height", "pix_fmt"):
            if getattr(info, field) != getattr(expected, field):
                problems.append(f"{field} {getattr(info, field)!r} != expected {getattr(expected, field)!r}")
        if abs(info.frames - expected.frames) > frame_slack:
            problems.append(f"frames {info.frames} != expected {expected.frames}")
        if not math.isclose(info.fps, expected.fps, rel_tol=1e-3, abs_tol=0.01):
            problems.append(f"fps {info.fps:g} != expected {expected.fps:g}")
        slack_seconds = (frame_slack + 0.5) / expected.fps + 0.01
        if abs(info.duration_seconds - expected.duration_seconds) > slack_seconds:
            problems.append(f"duration {info.duration_seconds:g}s != expected {expected.duration_seconds:g}s")
        if problems:
            details: dict[str, Any] = {"expected": asdict(expected), "got": asdict(info)}
            raise TransientJobError(f"{what} failed verification: {'; '.join(problems)}", detail=details)

    def probe(self, path: Path) -> MediaInfo:
        """Decode `path`'s first video stream with ffmpeg itself (no ffprobe in the bundled build) and report
        its codec, size, pixel format and rate (from ffmpeg's header) and its decoded frame count."""
        argv = [
            *("-nostdin", "-hide_banner", "-nostats", "-v", "info", "-i", _file_url(path), "-map", "0:v:0"),
            *("-fps_mode", "passthrough", "-f", "null", "-progress", "pipe:1", "-"),
        ]
        timeout = self.config.timeout_seconds
        result = _run_process([self.ffmpeg, *argv], timeout, f"probe {path.name}", None, _PROBE_STDERR_BYTES)
        tail = result.stderr[-STDERR_TAIL_BYTES:]
        if result.returncode != 0:
            raise TransientJobError(
                f"cannot read back {path.name}: ffmpeg exit status {result.returncode}",
                detail={"path": str(path), "stderr": tail},
            )
        try:
            return parse_probe_report(result.stderr, result.stdout.decode("utf-8", "replace"))
        except ValueError as exc:
            raise TransientJobError(f"cannot read back {path.name}: {exc}", detail={"stderr": tail}) from exc

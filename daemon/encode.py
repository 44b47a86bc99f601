"""MP4 writing and ffmpeg finishing variants, each verified by reading the produced file back.

Every ffmpeg run is an argv list (never a shell) built only from our own numbers and absolute `file:`
paths, in a new session so that a timeout can kill the whole process group; the last few KiB of stderr are
kept for the error. stdin is /dev/null (or our frame pipe), so ffmpeg never waits on a terminal.

ffmpeg must never outlive the daemon. Under systemd the control group is killed on stop; outside it, a
`kill -9` of the daemon would leave an ffmpeg in its own session running. So on Linux ffmpeg is started through
util-linux `setpriv --pdeathsig KILL` (an exec wrapper: the parent-death signal is set in the child and survives
the exec into ffmpeg). That is thread-safe, unlike a `preexec_fn` calling prctl (subprocess documents
`preexec_fn` as unsafe with threads, and this daemon runs ffmpeg from several). The signal fires when the
*thread* that started ffmpeg ends, which here is also the thread waiting for it, so it never fires early.
Without setpriv the process group and the timeout remain, and `kill_running()` ends every live group at stop.

Nothing is trusted on exit status alone: imageio-ffmpeg's writer does not notice when ffmpeg dies (DESIGN.md
§5), so each output is decoded again and its codec, size, frame count, rate and duration are compared with what
was asked.
The bundled ffmpeg has no ffprobe, so `probe` decodes with ffmpeg itself and parses its report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
from PIL import Image

from daemon.config import EncodeConfig, VariantSpec
from daemon.errors import ConfigError, FatalError, StorageFull, TransientJobError
from daemon.media import MediaInfo, parse_probe_report
from daemon.variants import Expectation, expect_variant, expected_variant_frames, mismatches, output_options
from daemon.variants import variant_filters as variant_filters

__all__ = ["Encoder", "MediaInfo", "expected_variant_frames", "parse_probe_report", "variant_filters"]

STDERR_TAIL_BYTES = 4096
_PROBE_STDERR_BYTES = 64 * 1024
_WRITE_CHUNK_BYTES = 1 << 20
_DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")


def _find_setpriv() -> str | None:
    """util-linux `setpriv` if it knows `--pdeathsig` (2.33+, 2018); None elsewhere (then ffmpeg runs directly)."""
    path = shutil.which("setpriv") if os.uname().sysname == "Linux" else None
    if path is None:
        return None
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in usage else None


SETPRIV = _find_setpriv()
"""Used as `setpriv --pdeathsig KILL -- ffmpeg ...`; None where it is missing or too old."""
NICE = shutil.which("nice")
"""coreutils `nice`, for `encode.nice` (exec'd in place, so the death signal and the process group still hold)."""
_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


def kill_running() -> int:
    """Kill every ffmpeg process group still running (service stop, or an exit path); return how many."""
    with _running_lock:
        processes = list(_running)
    for process in processes:
        _kill_group(process)
    return len(processes)


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: bytes
    stderr: str


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


def launch_command(argv: list[str], niceness: int = 0) -> list[str]:
    """`argv` under `setpriv --pdeathsig KILL` where available (ffmpeg dies with the daemon), at `niceness`
    (through `nice`, where available). The systemd unit's system-call filter must allow what these make."""
    deathsig = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV is not None else []
    nice = [NICE, "-n", str(niceness)] if niceness and NICE is not None else []
    return [*deathsig, *nice, *argv]


def _spawn(
    argv: list[str], *, stdin: int, stdout: IO[bytes], stderr: IO[bytes], niceness: int = 0
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (`launch_command`); track it."""
    command = launch_command(argv, niceness)
    if command[0] != argv[0] and not os.access(argv[0], os.X_OK):  # a wrapper would report it as exit status 127
        raise FatalError(f"cannot run ffmpeg at {argv[0]}: not an executable file", detail={"ffmpeg": argv[0]})
    try:
        process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True)
    except (FileNotFoundError, PermissionError) as exc:
        message = f"cannot run ffmpeg at {argv[0]}: {exc.strerror}"
        raise FatalError(message, detail={"ffmpeg": argv[0]}) from exc
    except OSError as exc:
        raise TransientJobError(f"cannot start ffmpeg: {exc.strerror}", detail={"ffmpeg": argv[0]}) from exc
    with _running_lock:
        _running.add(process)
    return process


def _run_process(
    argv: list[str],
    timeout: float,
    what: str,
    stdin_data: memoryview | None = None,
    stderr_limit: int = STDERR_TAIL_BYTES,
    niceness: int = 0,
) -> _Completed:
    """Run `argv` in a new session; stdout/stderr go to temporary files (no pipe can fill up and deadlock
    us), stdin is fed from a thread (so the timeout holds even if ffmpeg stops reading). On timeout the whole
    process group is killed and `TransientJobError` raised."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL
        process = _spawn(argv, stdin=stdin, stdout=out, stderr=err, niceness=niceness)
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
            with _running_lock:
                _running.discard(process)
            if feeder is not None:
                feeder.join(timeout=5.0)
        out.seek(0)
        return _Completed(returncode, out.read(), _read_tail(err, stderr_limit).decode("utf-8", "replace"))


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class Encoder:
    """Writes the main MP4 from frames and derives the finishing variants from it, verifying every output.

    Thread-safe: the worker writes main videos while a finishing pool makes variants. At most
    `encode.max_concurrent_ffmpeg` ffmpeg processes (probes included) run at once across all threads.
    """

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_concurrent_ffmpeg)
        if config.ffmpeg is not None:
            if not (config.ffmpeg.is_file() and os.access(config.ffmpeg, os.X_OK)):
                raise ConfigError(f"encode.ffmpeg: {config.ffmpeg} is not an executable file")
            self.ffmpeg = str(config.ffmpeg.absolute())
        else:
            self.ffmpeg = str(imageio_ffmpeg.get_ffmpeg_exe())

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        with self._slots:
            yield

    def _run(self, argv: list[str], what: str, stdin_data: memoryview | None = None) -> _Completed:
        with self._slot():
            result = _run_process(
                [self.ffmpeg, *argv], self.config.timeout_seconds, what, stdin_data, niceness=self.config.nice
            )
        if result.returncode != 0:
            last_line = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            status = f"killed by signal {-result.returncode}" if result.returncode < 0 else "failed"
            detail = {"argv": [self.ffmpeg, *argv], "returncode": result.returncode, "stderr": result.stderr}
            message = f"ffmpeg {status} ({what}) with exit status {result.returncode}: {last_line[0]}"
            if any(text in result.stderr for text in _DISK_FULL_MESSAGES):
                raise StorageFull(message, detail=detail)
            raise TransientJobError(message, detail=detail)
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
            expected = Expectation("h264", width, height, count, float(fps), count / fps, "yuv420p")
            self._check("main video", info, expected)
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
            *output_options(spec),
            _file_url(destination),
        ]
        try:
            self._run(argv, f"variant {name}")
            expected = expect_variant(spec, source_info)
            if expected.image_format is not None:
                return self._verify_image(name, expected, destination)
            info = self.probe(destination)
            self._check(f"variant {name}", info, expected)
            return info
        except BaseException:
            _remove_quietly(destination)
            raise

    def _verify_image(self, name: str, expected: Expectation, destination: Path) -> MediaInfo:
        """A still (frame or contact sheet): ffmpeg and Pillow must both decode it at the expected size/format."""
        want = (expected.width, expected.height)
        info = self.probe(destination)
        try:
            with Image.open(destination) as image:
                image.load()
                size, image_format = image.size, image.format or "?"
        except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise TransientJobError(f"variant {name}: produced image does not decode: {exc}") from exc
        if size != want or image_format != expected.image_format or (info.width, info.height) != want:
            raise TransientJobError(
                f"variant {name}: expected {expected.image_format} {want[0]}x{want[1]}, got {image_format} "
                f"{size[0]}x{size[1]}",
                detail={"variant": name, "expected": list(want), "got": list(size)},
            )
        return replace(info, frames=1, fps=0.0, duration_seconds=0.0)

    @staticmethod
    def _check(what: str, info: MediaInfo, expected: Expectation) -> None:
        problems = mismatches(info, expected)
        if problems:
            details = {"expected": asdict(expected), "got": asdict(info)}
            raise TransientJobError(f"{what} failed verification: {'; '.join(problems)}", detail=details)

    def probe(self, path: Path) -> MediaInfo:
        """Decode `path`'s first video stream with ffmpeg itself (no ffprobe in the bundled build) and report
        its codec, size, pixel format and rate (from ffmpeg's header) and its decoded frame count."""
        argv = [
            *("-nostdin", "-hide_banner", "-nostats", "-v", "info", "-i", _file_url(path), "-map", "0:v:0"),
            *("-fps_mode", "passthrough", "-f", "null", "-progress", "pipe:1", "-"),
        ]
        timeout = self.config.timeout_seconds
        with self._slot():
            result = _run_process(
                [self.ffmpeg, *argv], timeout, f"probe {path.name}", None, _PROBE_STDERR_BYTES, self.config.nice
            )
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

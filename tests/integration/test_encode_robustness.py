"""ffmpeg failure modes (reliability-anchors.md §7 D28, D30, D31): every way ffmpeg can fail is detected, raised as
transient (or `StorageFull`), leaves no partial file, and no ffmpeg outlives its caller or the daemon.

Failures are produced by small shell scripts standing in for ffmpeg (or wrapping the real bundled one), the
module boundary the encoder talks to.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
import pytest

from daemon import encode
from daemon.config import DEFAULT_VARIANTS, EncodeConfig
from daemon.encode import Encoder, MediaInfo
from daemon.errors import StorageFull, TransientJobError

pytestmark = pytest.mark.integration

FPS = 8
REAL_FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def clip(frames: int = 8, size: int = 64) -> npt.NDArray[np.uint8]:
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    data = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for index in range(frames):
        data[index, ..., 0] = (ramp[None, :] + index * 6).astype(np.uint8)
        data[index, ..., 1] = (ramp[:, None] + index * 6).astype(np.uint8)
    return data


def fake_ffmpeg(directory: Path, body: str, name: str = "ffmpeg.sh") -> Path:
    script = directory / name
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body), encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_dead(pid: int, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while process_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return not process_alive(pid)


def wait_for_file(path: Path, seconds: float = 10.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and (text := path.read_text().strip()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MediaInfo]:
    destination = tmp_path_factory.mktemp("src") / "main.mp4"
    info = Encoder(EncodeConfig()).write_video(clip(), FPS, destination)
    return destination, info


def test_ffmpeg_killed_by_a_signal_is_transient_and_leaves_no_file(tmp_path: Path) -> None:
    """Checklist D30 (killed): ffmpeg dies of SIGKILL (OOM killer, operator) after writing part of the file ->
    `TransientJobError` naming the signal; the partial file is removed."""
    out = tmp_path / "out.mp4"
    script = fake_ffmpeg(tmp_path, f'cat >/dev/null; printf partial > "{out}"; kill -9 $$\n')
    with pytest.raises(TransientJobError, match="killed by signal 9") as raised:
        Encoder(EncodeConfig(ffmpeg=script)).write_video(clip(), FPS, out)
    assert not isinstance(raised.value, StorageFull)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["main", "variant"])
def test_truncated_output_with_exit_zero_fails_verification(
    tmp_path: Path, source: tuple[Path, MediaInfo], kind: str
) -> None:
    """Checklist D30 (truncated output): the real ffmpeg runs and exits 0, then the file loses its second half
    (a dying disk, a killed writer after close). Exit status alone would pass it; the read-back does not."""
    script = fake_ffmpeg(
        tmp_path,
        f"""\
        for arg; do last=$arg; done
        "{REAL_FFMPEG}" "$@" || exit $?
        case "$last" in file:*) path=${{last#file:}};; *) exit 0;; esac
        size=$(stat -c %s "$path"); truncate -s $((size / 2)) "$path"
        exit 0
        """,
    )
    encoder = Encoder(EncodeConfig(ffmpeg=script))
    out = tmp_path / "out.mp4"
    with pytest.raises(TransientJobError, match=r"verification|cannot read back"):
        if kind == "main":
            encoder.write_video(clip(), FPS, out)
        else:
            main, info = source
            encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], main, info, out)
    assert not out.exists()


def test_disk_full_reported_by_ffmpeg_raises_storage_full(tmp_path: Path, source: tuple[Path, MediaInfo]) -> None:
    """Checklist D28 (ffmpeg exit): ffmpeg reports ENOSPC while writing ("No space left on device", exit 1) ->
    `StorageFull`, which does not consume an attempt; the partial file is removed. Injected: no root for a
    tiny loopback filesystem here."""
    out = tmp_path / "out.webm"
    script = fake_ffmpeg(
        tmp_path,
        f"""\
        head -c 4096 /dev/zero > "{out}"
        echo "[out#0/webm] Error writing trailer: No space left on device" >&2
        exit 1
        """,
    )
    main, info = source
    with pytest.raises(StorageFull, match="No space left") as raised:
        Encoder(EncodeConfig(ffmpeg=script)).make_variant("webm", DEFAULT_VARIANTS["webm"], main, info, out)
    assert raised.value.consumes_attempt is False
    assert not out.exists()


def test_variants_and_probes_never_read_stdin(tmp_path: Path, source: tuple[Path, MediaInfo]) -> None:
    """Checklist D31 (stdin): variant and probe runs pass `-nostdin` and get /dev/null as stdin, so an ffmpeg
    that reads its stdin gets EOF at once instead of waiting on a terminal or the daemon's own stdin."""
    log = tmp_path / "calls"
    script = fake_ffmpeg(
        tmp_path,
        f"""\
        bytes=$(cat | wc -c)
        echo "stdin=$bytes args=$*" >> "{log}"
        exit 1
        """,
    )
    encoder = Encoder(EncodeConfig(ffmpeg=script, timeout_seconds=10))
    main, info = source
    with pytest.raises(TransientJobError):
        encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], main, info, tmp_path / "v.mp4")
    with pytest.raises(TransientJobError):
        encoder.probe(main)
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    assert all(line.startswith("stdin=0 ") and "args=-nostdin" in line.split() for line in calls)


def test_hanging_variant_is_killed_by_the_wall_clock_timeout(tmp_path: Path, source: tuple[Path, MediaInfo]) -> None:
    """Checklist D31 (hang): an ffmpeg that never finishes (and has a child of its own) is killed with its
    whole process group at the wall-clock timeout; the job gets a transient error, nothing keeps running."""
    pids = tmp_path / "pids"
    script = fake_ffmpeg(tmp_path, f'sleep 60 & echo "$$ $!" > "{pids}"; wait\n')
    encoder = Encoder(EncodeConfig(ffmpeg=script, timeout_seconds=1.0))
    main, info = source
    started = time.monotonic()
    with pytest.raises(TransientJobError, match="timed out after 1 s"):
        encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], main, info, tmp_path / "v.mp4")
    assert time.monotonic() - started < 5.0
    assert all(wait_dead(int(pid)) for pid in pids.read_text().split())


def test_kill_running_ends_every_live_ffmpeg_group(tmp_path: Path, source: tuple[Path, MediaInfo]) -> None:
    """Checklist D31 / issue part 7: at stop the service can end every ffmpeg still running (long timeout
    here); the waiting call sees the kill as a transient failure."""
    pids = tmp_path / "pids"
    script = fake_ffmpeg(tmp_path, f'sleep 60 & echo "$$ $!" > "{pids}"; wait\n')
    encoder = Encoder(EncodeConfig(ffmpeg=script, timeout_seconds=300.0))
    main, info = source
    errors: list[BaseException] = []

    def run() -> None:
        try:
            encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], main, info, tmp_path / "v.mp4")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_file(pids)
    assert encode.kill_running() == 1
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransientJobError)
    assert all(wait_dead(int(pid)) for pid in pids.read_text().split())
    assert encode.kill_running() == 0


@pytest.mark.skipif(encode.SETPRIV is None, reason="util-linux setpriv is not installed")
def test_ffmpeg_does_not_outlive_a_daemon_killed_with_sigkill(tmp_path: Path) -> None:
    """Issue part 7 / checklist D31: the process running the encoder is `kill -9`ed while ffmpeg runs in its own
    session. The parent-death signal (setpriv --pdeathsig KILL, exec wrapper: thread-safe, no preexec_fn)
    kills ffmpeg too; without it ffmpeg would run on as an orphan. A real SIGKILL of a real process."""
    pid_file = tmp_path / "ffmpeg.pid"
    script = fake_ffmpeg(tmp_path, f'echo $$ > "{pid_file}"\nexec sleep 60\n')
    program = textwrap.dedent(
        f"""\
        import threading
        from pathlib import Path
        from daemon.config import DEFAULT_VARIANTS, EncodeConfig
        from daemon.encode import Encoder, MediaInfo
        encoder = Encoder(EncodeConfig(ffmpeg=Path({str(script)!r}), timeout_seconds=300))
        info = MediaInfo("h264", 64, 64, 8, 8.0, 1.0, "yuv420p")
        def run():
            encoder.make_variant("fps30", DEFAULT_VARIANTS["fps30"], Path("/nonexistent.mp4"), info, Path("/tmp/x"))
        worker = threading.Thread(target=run)  # ffmpeg started from a thread, as in the daemon
        worker.start()
        worker.join()
        """
    )
    daemon = subprocess.Popen([sys.executable, "-c", program], cwd=Path(__file__).resolve().parents[2])
    try:
        ffmpeg_pid = int(wait_for_file(pid_file))
        assert process_alive(ffmpeg_pid)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        assert wait_dead(ffmpeg_pid), "ffmpeg outlived the daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if pid_file.exists() and process_alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("niceness", [0, 10])
def test_ffmpeg_runs_at_the_configured_niceness(tmp_path: Path, niceness: int) -> None:
    """`encode.nice`: every ffmpeg (writes and read-backs) runs at that niceness, so finishing on a loaded host
    does not take the CPU from the generation process feeding the GPU (BENCHMARKS.md, the daemon on the GPU). The
    stand-in records the niceness it runs at (field 19 of /proc/self/stat), then runs the real ffmpeg."""
    record = tmp_path / "niceness.txt"
    script = fake_ffmpeg(
        tmp_path,
        f"""\
        cut -d' ' -f19 /proc/self/stat >> "{record}"
        exec "{REAL_FFMPEG}" "$@"
        """,
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    Encoder(EncodeConfig(ffmpeg=script, nice=niceness)).write_video(clip(), FPS, tmp_path / "out.mp4")
    seen = [int(line) for line in record.read_text().split()]
    assert len(seen) == 2  # the write and its read-back
    assert all(value == min(19, base + niceness) for value in seen)

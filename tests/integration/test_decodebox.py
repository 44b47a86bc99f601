"""Decoding inbox images in a child process under limits (`daemon/decodebox.py`): real children of the fork
server, real signals and real resource limits. Each failure is the refusal of that one image; the calling process
goes on and the next decode works."""

from __future__ import annotations

import hashlib
import io
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import decode_faults
import pytest
from intake_helpers import SIDECAR, Harness, image_bytes
from PIL import Image

from daemon.checks import decode_isolation, load_image_rgb
from daemon.config import DaemonConfig
from daemon.decodebox import DecodeError, DecodeLimits, isolated_oriented_size
from daemon.safeopen import InputRejected

LIMITS = DecodeLimits.for_image(1_000_000, 1_000_000, 5.0)


def refusal(data: bytes, limits: DecodeLimits = LIMITS, **kwargs: object) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        isolated_oriented_size(data, 60_000_000, "cat.png", limits, **kwargs)  # type: ignore[arg-type]
    return caught.value


def exif_rotated_jpeg(size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the model sees it upright
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_the_child_decodes_and_returns_the_size_after_exif_rotation() -> None:
    assert isolated_oriented_size(image_bytes((64, 48)), 1_000_000, "cat.png", LIMITS) == (64, 48)
    assert isolated_oriented_size(exif_rotated_jpeg((64, 48)), 1_000_000, "cat.jpg", LIMITS) == (48, 64)


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (40, 30))
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    image.paste(1, (10, 5, 30, 25))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data", [exif_rotated_jpeg((64, 48)), palette_png_with_transparency(), image_bytes((33, 21), "WEBP")]
)
def test_the_workers_image_from_the_child_is_the_one_decoded_in_process(tmp_path: Path, data: bytes) -> None:
    """The worker's decode for the model (`load_image_rgb` with `isolation`): upright RGB pixels through the
    pipe, equal to the in-process decode of the same bytes, under the same checksum check."""
    path = tmp_path / "cat.img"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    in_process = load_image_rgb(path, 1_000_000, expected_sha256=digest)
    isolated = load_image_rgb(path, 1_000_000, expected_sha256=digest, isolation=LIMITS)
    assert isolated.mode == in_process.mode == "RGB"
    assert isolated.size == in_process.size
    assert isolated.tobytes() == in_process.tobytes()
    with pytest.raises(InputRejected) as caught:
        load_image_rgb(path, 1_000_000, expected_sha256="0" * 64, isolation=LIMITS)
    assert caught.value.reason == "input_changed"


def test_intake_decodes_in_a_child_unless_the_config_says_otherwise() -> None:
    assert decode_isolation(DaemonConfig(inbox=Path("inbox"))) is not None
    assert decode_isolation(DaemonConfig(inbox=Path("inbox"), intake={"decode_in_child": False})) is None  # type: ignore[arg-type]


def test_the_images_own_refusals_come_back_with_their_reason() -> None:
    assert refusal(b"GIF89a" + bytes(64)).reason == "image_format"
    assert refusal(image_bytes((64, 48))[:60]).reason == "image_unreadable"
    with pytest.raises(InputRejected) as caught:
        isolated_oriented_size(image_bytes((2000, 1000)), 1_000_000, "big.png", LIMITS)
    assert caught.value.reason == "decompression_bomb" and "big.png" in caught.value.message


def test_a_decoder_crash_refuses_the_image_and_the_next_decode_works() -> None:
    problem = refusal(image_bytes(), decode=decode_faults.segfault)
    assert problem.reason == "decode_crashed" and problem.detail == {"exit": "SIGSEGV"}
    assert "cat.png" in problem.message and problem.input_name == "cat.png"
    assert refusal(image_bytes(), decode=decode_faults.exit_quietly).detail == {"exit": "exit status 3"}
    assert isolated_oriented_size(image_bytes((64, 48)), 1_000_000, "next.png", LIMITS) == (64, 48)


def test_a_ctrl_c_or_hangup_to_the_process_group_does_not_refuse_the_image_being_decoded() -> None:
    assert isolated_oriented_size(image_bytes(), 1_000_000, "cat.png", LIMITS, decode=decode_faults.interrupted) == (
        7,
        5,
    )


def test_an_ordinary_error_in_the_child_is_an_internal_error_not_a_refusal() -> None:
    with pytest.raises(DecodeError, match="KeyError"):
        isolated_oriented_size(image_bytes(), 1_000_000, "cat.png", LIMITS, decode=decode_faults.raise_bug)


def test_a_small_file_that_decodes_to_more_memory_than_the_limit_is_refused() -> None:
    """A 7000x7000 RGBA PNG of one colour: 0.2 MB on disk, 196 MB decoded; under a 128 MiB address space the
    decode fails with MemoryError in the child, which is reported, not taken for damage."""
    buffer = io.BytesIO()
    Image.new("RGBA", (7000, 7000), (1, 2, 3, 4)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 1_000_000
    tight = DecodeLimits(memory_bytes=128 * 1024 * 1024, cpu_seconds=20, wall_seconds=60.0)
    problem = refusal(buffer.getvalue(), tight)
    assert problem.reason == "decode_too_costly"
    assert problem.detail == {"limit": "memory", "memory_mib": 128}
    roomy = DecodeLimits.for_image(60_000_000, 1_000_000, 20.0)
    assert isolated_oriented_size(buffer.getvalue(), 60_000_000, "cat.png", roomy) == (7000, 7000)


def test_a_decode_that_burns_cpu_is_stopped_by_the_cpu_limit() -> None:
    limits = DecodeLimits(memory_bytes=LIMITS.memory_bytes, cpu_seconds=1, wall_seconds=30.0)
    started = time.monotonic()
    problem = refusal(image_bytes(), limits, decode=decode_faults.spin)
    assert problem.reason == "decode_too_costly" and problem.detail == {"limit": "cpu", "cpu_seconds": 1}
    assert "1 s of CPU" in problem.message
    assert time.monotonic() - started < 10


def test_a_decode_that_blocks_is_killed_after_the_wall_clock_limit() -> None:
    limits = DecodeLimits(memory_bytes=LIMITS.memory_bytes, cpu_seconds=1, wall_seconds=0.5)
    started = time.monotonic()
    problem = refusal(image_bytes(), limits, decode=decode_faults.stall)
    assert problem.reason == "decode_too_costly" and problem.detail == {"limit": "wall", "wall_seconds": 0.5}
    assert "within 0.5 s" in problem.message
    assert time.monotonic() - started < 3  # killed when the time is up, not after a grace period


UNDER_A_LOWER_HARD_LIMIT = """\
import io, resource
from PIL import Image
from daemon.decodebox import DecodeLimits, isolated_oriented_size

if __name__ == "__main__":
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "PNG")
    limits = DecodeLimits.for_image(500_000_000, 50_000_000, 5.0)
    assert limits.memory_bytes > resource.getrlimit(resource.RLIMIT_AS)[1]
    print(isolated_oriented_size(buffer.getvalue(), 1_000_000, "cat.png", limits))
"""


def test_a_daemon_under_a_lower_hard_limit_still_decodes(tmp_path: Path) -> None:
    """Under systemd's `LimitAS=` or a `ulimit -v` lower than the computed limit, the child keeps the lower one
    (a process cannot raise its hard limit) instead of failing every decode."""
    script = tmp_path / "decode.py"
    script.write_text(UNDER_A_LOWER_HARD_LIMIT)
    four_gib = 4 * 1024**3

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (four_gib, four_gib))

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=60, preexec_fn=lower
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(64, 48)"


def test_limits_cover_every_image_the_size_and_pixel_checks_let_through() -> None:
    limits = DecodeLimits.for_image(50_000_000, 50 * 1024 * 1024, 2.5)
    assert limits.memory_bytes >= 4 * 50_000_000 + 2 * 50 * 1024 * 1024
    assert (limits.cpu_seconds, limits.wall_seconds) == (3, 11.0)


def test_intake_decodes_in_the_child_by_default_and_refuses_through_it(tmp_path: Path) -> None:
    """The daemon's path: with the default config a pair is decoded in a child, accepted with its size, and a
    damaged image is refused with the child's reason."""
    assert DaemonConfig(inbox=tmp_path).intake.decode_in_child
    harness = Harness(tmp_path / "inbox", stable_seconds=0.0, incomplete_grace_seconds=0.0)
    harness.drop_pair("fine", image=image_bytes((64, 48)))
    harness.drop_pair("other", image=b"GIF89a" + bytes(64), sidecar=SIDECAR)
    result = harness.settle()
    assert [job.stem for job in result.accepted] == ["fine"]
    assert [(stem, problem.reason) for stem, problem, _ in result.rejected] == [("other", "image_format")]


MAIN_THAT_IMPORTS_TORCH = """\
import io
import torch  # multiprocessing runs this again in the decode child: gigabytes of address space mapped there
from PIL import Image
from daemon.decodebox import DecodeLimits, isolated_oriented_size

if __name__ == "__main__":
    buffer = io.BytesIO()
    Image.new("RGBA", (7000, 7000), (1, 2, 3, 4)).save(buffer, "PNG")
    limits = DecodeLimits(memory_bytes=300 * 2**20, cpu_seconds=20, wall_seconds=60.0)  # less than torch maps
    print(isolated_oriented_size(buffer.getvalue(), 60_000_000, "cat.png", limits))
"""


def test_the_memory_limit_counts_from_what_the_child_already_maps(tmp_path: Path) -> None:
    """The address-space limit is added to what the child has mapped when it starts. A main script that imports
    torch has the child import it again (multiprocessing re-runs the main); an absolute limit would then sit below
    the child's own libraries and refuse every large image."""
    script = tmp_path / "decode.py"
    script.write_text(MAIN_THAT_IMPORTS_TORCH)
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(7000, 7000)"


SIGNALS_TO_THE_GROUP_WHILE_DECODING = """\
import io, os, signal, threading, time
from PIL import Image
from daemon.decodebox import DecodeLimits, isolated_oriented_size

if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)  # this process survives them; its exec'd helpers would not
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "PNG")
    limits = DecodeLimits.for_image(1_000_000, 1_000_000, 5.0)
    done = threading.Event()

    def storm():
        while not done.is_set():
            for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                os.killpg(0, signum)
            time.sleep(0.002)

    threading.Thread(target=storm, daemon=True).start()
    sizes = [isolated_oriented_size(buffer.getvalue(), 1_000_000, "cat.png", limits) for _ in range(60)]
    done.set()
    print(sizes.count((64, 48)))
"""


def test_signals_to_the_whole_process_group_never_refuse_an_image(tmp_path: Path) -> None:
    """A Ctrl-C, a hangup or a group SIGTERM at any moment of a decode (the fork server's start and each child's
    own start included, before the child could ignore them) must not kill the server or a child: they are blocked
    from the server's start. 60 decodes under a storm of all three signals, every one answered."""
    script = tmp_path / "storm.py"
    script.write_text(SIGNALS_TO_THE_GROUP_WHILE_DECODING)
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120, start_new_session=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "60"


class _Unstartable:
    """A multiprocessing context whose processes cannot start (the fork server failed)."""

    def __init__(self, real: Any) -> None:
        self.Pipe = real.Pipe

    def Process(self, **kwargs: Any) -> Any:
        class Broken:
            def start(self) -> None:
                raise OSError(11, "Resource temporarily unavailable")

        return Broken()


def test_without_a_decode_child_intake_decodes_in_process_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import daemon.decodebox as decodebox

    monkeypatch.setattr(decodebox, "_CONTEXT", _Unstartable(decodebox._CONTEXT))
    with pytest.raises(decodebox.DecodeUnavailable):
        isolated_oriented_size(image_bytes(), 1_000_000, "cat.png", LIMITS)
    harness = Harness(tmp_path / "inbox", stable_seconds=0.0)
    harness.drop_pair("fine", image=image_bytes((64, 48)))
    assert [job.stem for job in harness.settle().accepted] == ["fine"]
    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes((33, 21)))
    assert load_image_rgb(path, 1_000_000, isolation=LIMITS).size == (33, 21)

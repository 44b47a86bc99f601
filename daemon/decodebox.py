"""Decoding an inbox image in a child process, under memory and CPU limits.

Why: Pillow's decoders are C code, and inbox files are hostile. The checks in `safeopen.decode_image` refuse the
bombs that announce themselves (header pixel counts, JPEG scan counts), but a decoder bug can still crash the
process that decodes, and a crafted file can still cost far more memory or CPU than its size suggests. In the
daemon's own process, a crash would stop every job, and a runaway decode would stall intake until the service
watchdog killed the daemon. Decoding in a child with `RLIMIT_AS` and `RLIMIT_CPU` (and no core dumps and no file
writes) turns each of these into the refusal of that one pair, while the daemon goes on.

The children fork from multiprocessing's fork server, not from the daemon. The fork server is a small process,
started once, that has imported Pillow and this module and nothing else. The daemon has threads and, with a model,
gigabytes of memory, so forking it would be unsafe and costly; a fork of the server costs milliseconds and inherits
none of the daemon's state. Intake's check gets back only the image's size after EXIF rotation; the worker, which
decodes the validated bytes again for the model (after checking their sha256), gets the upright RGB pixels.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any

from PIL import Image

from daemon.safeopen import InputRejected, decode_image, oriented_size, rejected, upright_rgb

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["daemon.cli", "daemon.decodebox"])
"""What the server imports once, so that its children inherit it. multiprocessing runs the parent's main script
again in each child (as `__mp_main__`, which its `__name__` guard keeps from acting), and the `i2vd` script's only
import is the CLI: preloaded, that costs nothing; not preloaded, ~150 ms per image. (A `python -m` main is not run
again; `"__main__"` in this list does nothing on Python 3.11, whose fork server is not given the main's path.)"""

BASE_MEMORY_BYTES = 256 * 1024 * 1024
"""Address space a decode may add beyond the pixels and the bytes: Pillow's codec state and buffers, the
allocator's arenas."""
BYTES_PER_PIXEL = 16
"""Decoded pixels at their widest with the decoder's own buffers: libwebp peaks at ~14.7 bytes per pixel, a
progressive CMYK JPEG at ~12 (RGBA or 32-bit modes hold 4 per pixel themselves)."""
GUARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGHUP, signal.SIGTERM})
"""Blocked in the fork server (so in every child it forks) from its start: a Ctrl-C, a hangup or a SIGTERM to the
whole process group must neither kill the server nor a child before it ignores them itself, or an innocent image
would be refused as crashed. The daemon decides when a decode stops."""
JOIN_SECONDS = 5.0
"""How long a child that has answered (or was killed) gets to exit before it is killed (again)."""

Decode = Callable[[bytes, int, str], tuple[int, int]]


class DecodeError(RuntimeError):
    """The decode raised an error that is not a refusal of the image (a bug, as in-process it would be)."""


class DecodeUnavailable(RuntimeError):
    """No child could be started (the fork server failed): not the image's fault; the caller decodes in process."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one image's decode may use: address space beyond what the child has mapped when it starts (the fork
    server's interpreter and libraries, and whatever the parent's main script imports again in it), CPU seconds
    (`RLIMIT_CPU` counts whole seconds) and wall seconds (a child blocked on something other than CPU is killed
    after these)."""

    memory_bytes: int
    cpu_seconds: int
    wall_seconds: float

    @classmethod
    def for_image(cls, max_pixels: int, max_bytes: int, cpu_seconds: float) -> DecodeLimits:
        """Limits that fit any image that passes the pixel and size checks: the base, the pixels at their widest,
        and the file's bytes twice (the copy received and Pillow's buffer)."""
        memory = BASE_MEMORY_BYTES + BYTES_PER_PIXEL * max_pixels + 2 * max_bytes
        whole = max(1, int(cpu_seconds + 0.999))
        return cls(memory_bytes=memory, cpu_seconds=whole, wall_seconds=2.0 * whole + 5.0)


def decode_oriented_size(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """The full decode (`safeopen.decode_image`) and the size after EXIF rotation: intake's check."""
    return oriented_size(decode_image(data, max_pixels, name))


def decode_model_rgb(data: bytes, max_pixels: int, name: str) -> tuple[int, int, bytes, bool]:
    """The full decode, upright and in RGB (`safeopen.upright_rgb`): the worker's image for the model, as
    (width, height, RGB bytes, whether the EXIF rotation could be read)."""
    image, rotated = upright_rgb(decode_image(data, max_pixels, name))
    return image.width, image.height, image.tobytes(), rotated


def isolated_oriented_size(
    data: bytes, max_pixels: int, name: str, limits: DecodeLimits, decode: Decode = decode_oriented_size
) -> tuple[int, int]:
    """`decode(data, max_pixels, name)` (the size after EXIF rotation) in a child under `limits` (`in_child`)."""
    width, height = in_child(decode, data, max_pixels, name, limits)
    return int(width), int(height)


def isolated_model_rgb(data: bytes, max_pixels: int, name: str, limits: DecodeLimits) -> tuple[Image.Image, bool]:
    """`decode_model_rgb` in a child under `limits` (`in_child`): the RGB image and whether its EXIF rotation
    could be read. The pixels come back through the pipe (36 MB for a 12-megapixel photo)."""
    width, height, pixels, rotated = in_child(decode_model_rgb, data, max_pixels, name, limits)
    return Image.frombytes("RGB", (width, height), pixels), rotated


def in_child(decode: Callable[..., Any], data: bytes, max_pixels: int, name: str, limits: DecodeLimits) -> Any:
    """`decode(data, max_pixels, name)` in a child under `limits`, and its (picklable) result; raises
    `InputRejected` for the image's own refusals, and for a decode that ran out of memory or time
    (`decode_too_costly`) or crashed (`decode_crashed`); `DecodeError` for any other error it raised.
    `decode` must be a module-level function (it is sent to the child by name)."""
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(
        target=_child_main, args=(sender, data, max_pixels, name, limits, decode), name="i2vd-decode", daemon=True
    )
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GUARDED_SIGNALS)  # inherited by a fork server started now
    try:
        # The fork server needs multiprocessing's resource tracker, whose start unblocks SIGINT and SIGTERM in
        # this thread when it is done: start it first, then block them again for the fork server's start.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, GUARDED_SIGNALS)
        child.start()
    except (OSError, EOFError) as exc:
        receiver.close()
        sender.close()
        raise DecodeUnavailable(f"no decode child could be started: {exc!r}") from exc
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    sender.close()  # the child holds the only writer: its death reads as end-of-file here
    answer: tuple[Any, ...] | None = ("wall",)  # what an interrupted wait amounts to: kill the child
    try:
        answer = _answer(receiver, limits.wall_seconds)
    finally:
        receiver.close()
        _reap(child, at_once=answer == ("wall",))
    return _outcome(answer, child.exitcode, name, limits)


def _answer(receiver: multiprocessing.connection.Connection, seconds: float) -> tuple[Any, ...] | None:
    """The child's message; `("wall",)` if none came in time; None if it died without one."""
    if not receiver.poll(seconds):
        return ("wall",)
    try:
        message: tuple[Any, ...] = receiver.recv()
    except (EOFError, OSError):
        return None
    return message


def _reap(child: Any, at_once: bool) -> None:
    """Wait for the child to exit (it does right after answering); kill it `at_once` (out of time) or if it
    does not."""
    if not at_once:
        child.join(JOIN_SECONDS)
    if child.exitcode is None:
        child.kill()
        child.join(JOIN_SECONDS)


def _outcome(answer: tuple[Any, ...] | None, exitcode: int | None, name: str, limits: DecodeLimits) -> Any:
    if answer is not None and answer[0] == "value":
        return answer[1]
    if answer is not None and answer[0] == "rejected":
        raise rejected(name, answer[1], answer[2], answer[3])
    if answer is not None and answer[0] == "error":
        raise DecodeError(f"decoding {name} in the child failed: {answer[1]}")
    if answer is not None and answer[0] == "memory":
        mib = limits.memory_bytes // (1024 * 1024)
        message = f"Decoding {name} needed more than {mib} MiB of memory; it was not accepted."
        raise rejected(name, "decode_too_costly", message, {"limit": "memory", "memory_mib": mib})
    if exitcode == -signal.SIGXCPU:
        message = f"Decoding {name} took more than {limits.cpu_seconds} s of CPU; it was not accepted."
        raise rejected(name, "decode_too_costly", message, {"limit": "cpu", "cpu_seconds": limits.cpu_seconds})
    if answer is not None and answer[0] == "wall":
        message = f"Decoding {name} did not finish within {limits.wall_seconds:g} s; it was not accepted."
        raise rejected(name, "decode_too_costly", message, {"limit": "wall", "wall_seconds": limits.wall_seconds})
    how = _describe_exit(exitcode)
    message = f"The image decoder crashed on {name} ({how}); it was not accepted."
    raise rejected(name, "decode_crashed", message, {"exit": how})


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def _child_main(
    sender: multiprocessing.connection.Connection,
    data: bytes,
    max_pixels: int,
    name: str,
    limits: DecodeLimits,
    decode: Callable[..., Any],
) -> None:
    """In the child: limits first, then the decode; the answer is a plain tuple (exceptions with keyword
    arguments do not always survive pickling). A Ctrl-C or a hangup to the terminal's process group reaches the
    child too: the daemon decides what stops (it kills the child when the time is up), or an innocent image would
    be refused as crashed."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    answer: tuple[Any, ...]
    try:
        _lower(resource.RLIMIT_CORE, 0, 0)
        _lower(resource.RLIMIT_FSIZE, 0, 0)
        address_space = _address_space_in_use() + limits.memory_bytes
        _lower(resource.RLIMIT_AS, address_space, address_space)
        _lower(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)
        answer = ("value", decode(data, max_pixels, name))
    except InputRejected as exc:
        answer = ("rejected", exc.reason, exc.message, exc.detail)
    except MemoryError:
        answer = ("memory",)
    except Exception as exc:  # a bug of ours, not the image's fault: the caller's internal-error path
        answer = ("error", f"{type(exc).__name__}: {exc}")
    try:
        sender.send(answer)
    except MemoryError:  # pickling a large result under the limit
        sender.send(("memory",))
    sender.close()


def _lower(kind: int, soft: int, hard: int) -> None:
    """Set a limit no higher than the one the daemon already runs under (systemd's `LimitAS=`, `ulimit`): a
    process may lower its hard limits but not raise them."""
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def _address_space_in_use() -> int:
    """This process's mapped address space (`/proc/self/statm`'s first field); 0 where there is no /proc. A
    process that has imported a large library (torch maps gigabytes) must not be limited below what it has."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0

"""Decoders that fail the way a hostile image can make a real one fail, for `decodebox`'s tests. They run in the
decode child, which imports this module by name (the tests folder is on `sys.path` for pytest and its children)."""

from __future__ import annotations

import ctypes
import time


def segfault(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """A decoder bug: a read through a null pointer, a real SIGSEGV."""
    ctypes.string_at(0)
    return 0, 0


def spin(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """A decode that never ends and only burns CPU (a scan bomb)."""
    while True:
        pass


def stall(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """A decode blocked without using CPU."""
    time.sleep(3600)
    return 0, 0


def exit_quietly(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """A decoder that ends the process without an answer."""
    import os

    os._exit(3)


def raise_bug(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """Our own bug in the decode path: an ordinary exception."""
    raise KeyError("orientation")


def interrupted(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """A Ctrl-C and a hangup to the terminal's process group arrive during the decode."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGHUP)
    return 7, 5

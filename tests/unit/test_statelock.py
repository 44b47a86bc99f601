"""One daemon per inbox (`daemon/statelock.py`): the lock is exclusive, names its holder, dies with its process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import FatalError
from daemon.statelock import StateLock


def test_a_second_lock_on_the_same_state_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(FatalError, match=r"another i2vd \(pid \d+\) is already running on this inbox"):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again once released
    second.release()
    second.release()  # twice is harmless


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves no stale lock: the kernel drops a flock with its last descriptor."""
    script = (
        "import os, sys; from pathlib import Path; from daemon.statelock import StateLock;"
        "StateLock(Path(sys.argv[1])).acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "daemon.lock").exists()
    lock = StateLock(tmp_path)
    lock.acquire()
    lock.release()


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "daemon.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FatalError, match="cannot open the lock file"):
        StateLock(tmp_path).acquire()
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_a_start_that_fails_half_way_gives_back_the_lock_and_the_metrics_port(tmp_path: Path) -> None:
    """The model does not load (after the lock, the metrics server and recovery): `start` raises, and an
    in-process caller can start another Service on the same folders and port at once."""
    import socket

    from daemon.config import DaemonConfig
    from daemon.service import Service

    def no_model(config: DaemonConfig) -> object:
        raise FatalError("model directory /nowhere does not exist")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = DaemonConfig(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        metrics={"port": port},  # type: ignore[arg-type]
    )
    for _ in range(2):  # the second start would fail on the lock (or the port) if the first had kept them
        service = Service(config, generator_factory=no_model)  # type: ignore[arg-type]
        with pytest.raises(FatalError, match="does not exist"):
            service.start()
    lock = StateLock(config.state_path)
    lock.acquire()
    lock.release()
    with socket.socket() as probe:  # the metrics port is free again
        probe.bind(("127.0.0.1", port))

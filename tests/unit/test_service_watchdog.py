"""The systemd watchdog is pinged from the main loop only while the daemon is really alive.

In-process (a subprocess cannot be made to hang on cue): a real `Service` with a stub generator and a fake
NOTIFY_SOCKET; WATCHDOG_USEC=200 ms. Pings flow while the loop runs, stop while `_supervise` hangs, and stop when
the intake loop stalls even though the main loop itself goes on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from daemon import service as service_module
from daemon.config import DaemonConfig
from daemon.generate.base import GenerationRequest, GenerationResult, ModelInfo
from daemon.service import Service
from daemon.systemd import SystemdNotifier


class StubGenerator:
    info = ModelInfo(model_id="stub", revision=None, device="cpu", dtype="float32", load_seconds=0.01)

    def generate(
        self, request: GenerationRequest, on_step: object = None, should_interrupt: object = None
    ) -> GenerationResult:
        raise AssertionError("no job is dropped in these tests")

    def memory_stats(self) -> Mapping[str, int]:
        return {}


class Pings:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)

    def count_for(self, seconds: float) -> int:
        deadline, count = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            try:
                count += self.sock.recv(4096) == b"WATCHDOG=1"
            except TimeoutError:
                continue
        return count


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Service, Pings]]:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(service_module, "SUPERVISE_SECONDS", 0.05)
    pings = Pings(tmp_path / "notify.sock")
    config = DaemonConfig(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        metrics={"enabled": False},  # type: ignore[arg-type]
        intake={"rescan_seconds": 0.1},  # type: ignore[arg-type]
    )
    service = Service(
        config, notifier=SystemdNotifier(str(tmp_path / "notify.sock")), generator_factory=lambda c: StubGenerator()
    )
    service.start()
    loop = threading.Thread(target=service.run_until_stopped, daemon=True)
    loop.start()
    yield service, pings
    service.request_stop()
    loop.join(timeout=10)
    pings.sock.close()


def test_pings_stop_while_the_main_loop_hangs(running: tuple[Service, Pings], monkeypatch: pytest.MonkeyPatch) -> None:
    service, pings = running
    assert pings.count_for(0.6) >= 3
    release = threading.Event()
    supervise = service._supervise
    monkeypatch.setattr(service, "_supervise", lambda: release.wait(5) and supervise())
    pings.count_for(0.3)  # drain the ones already on their way
    assert pings.count_for(0.6) == 0, "a hung main loop must not ping"
    release.set()
    assert pings.count_for(2.0) >= 1, "pings resume once the loop runs again"


def test_pings_stop_when_intake_stalls(running: tuple[Service, Pings], monkeypatch: pytest.MonkeyPatch) -> None:
    service, pings = running
    assert service.alive()
    monkeypatch.setattr(service_module, "INTAKE_STALL_SECONDS", -1.0)  # any age is now too old
    pings.count_for(0.3)
    assert not service.alive()
    assert pings.count_for(0.6) == 0

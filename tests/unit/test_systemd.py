"""sd_notify datagrams reach a real AF_UNIX socket like systemd's; without NOTIFY_SOCKET nothing happens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from daemon.systemd import SystemdNotifier, single_line, watchdog_interval_seconds


def test_notify_sends_ready_and_status(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        notifier = SystemdNotifier(str(path))
        assert notifier.ready("ready; 0 queued")
        assert listener.recv(4096) == b"READY=1\nSTATUS=ready; 0 queued"
        assert notifier.watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"


def test_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready("x") is False


def test_dead_socket_never_raises(tmp_path: Path) -> None:
    assert SystemdNotifier(str(tmp_path / "gone.sock")).status("x") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_seconds() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_seconds() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_seconds() is None


def test_status_is_one_utf8_line_whatever_the_name(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        notifier = SystemdNotifier(str(path))
        assert notifier.status("generating kätzchen\nREADY=1")
        assert listener.recv(4096).decode("utf-8") == "STATUS=generating kätzchen\\nREADY=1"
        assert notifier.extend_timeout(1.5, "loading model")
        assert listener.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000\nSTATUS=loading model"
        assert notifier.stopping("stopping")
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_single_line() -> None:
    assert single_line("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"

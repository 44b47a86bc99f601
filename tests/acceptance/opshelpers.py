"""Helpers of the acceptance tests: a real `i2vd run` process with a chosen environment and arguments, its JSON log
and metrics, free ports, the CLI, and the external tools (promtool, prometheus, systemd-analyze) found on PATH or
skipped with the reason. (A plain module, not conftest.py: `tests/conftest.py` already owns that module name.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

STARTUP_SECONDS = 120.0
JOB_SECONDS = 120.0


def find_tool(name: str) -> str:
    """The tool's path, or skip: `scripts/install-ops-tools.sh` (run by scripts/test.sh) installs it when it can."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed and could not be installed (run scripts/install-ops-tools.sh as root)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`i2vd ARGS --config root/daemon.yaml`, run from `root` like an operator would."""
    command = [sys.executable, "-m", "daemon", *args, "--config", str(root / "daemon.yaml")]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60, check=False)


class OpsDaemon:
    """A running `i2vd run`; JSON log lines from stderr (stdout too, should it log there)."""

    def __init__(
        self, root: Path, config: dict[str, Any], env: dict[str, str], extra_args: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        (root / "daemon.yaml").write_text(yaml.safe_dump(config))
        self.log_path = root / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"):
            if key not in env:
                full_env.pop(key, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(root / "daemon.yaml"), *extra_args],
            cwd=root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # its own process group, as under a terminal: `stop(..., group=True)`
        )

    def events(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                parsed.append(item)
        return parsed

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        if predicate():
            return
        tail = self.log_path.read_text(errors="replace")[-4000:]
        raise AssertionError(f"timed out waiting for {what}; exit={self.process.poll()}\n{tail}")

    def wait_for_event(self, event: str, timeout: float = STARTUP_SECONDS, **fields: Any) -> dict[str, Any]:
        def matches() -> list[dict[str, Any]]:
            return [e for e in self.events() if e.get("event") == event and fields.items() <= e.items()]

        self.wait_for(lambda: bool(matches()), timeout, f"log event {event} {fields}")
        return matches()[0]

    def metrics_text(self) -> str:
        port = self.wait_for_event("metrics_serving")["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def scrape(self) -> dict[str, float]:
        """Every sample of /metrics keyed `name{label="value",...}` (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0, group: bool = False) -> int:
        """Send `signum` to the daemon (systemd's KillMode=mixed), or with `group` to its whole process group, as a
        terminal does on Ctrl-C or hangup (its generation process included); its exit status."""
        if group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


def drop_pair(inbox: Path, stem: str, sidecar: str) -> None:
    """An image, then its sidecar by rename (the daemon pairs only complete files)."""
    from PIL import Image

    inbox.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (40, 120, 200)).save(inbox / f"{stem}.png")
    partial = inbox / f"{stem}.yaml.part"
    partial.write_text(sidecar)
    partial.rename(inbox / f"{stem}.yaml")

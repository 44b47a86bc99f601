"""Acceptance: the real `i2vd run` process, the real tiny model, real files, real signals.

Each test starts `python -m daemon run` as a subprocess with its own inbox/outbox, drops files, waits for the
outbox, reads the JSON log lines from stderr, scrapes `/metrics`, and signals the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]

STARTUP_SECONDS = 240.0
JOB_SECONDS = 180.0


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One materialised tiny model for every daemon process of the session (as the daemon's cache_dir would be)."""
    return tmp_path_factory.mktemp("model-cache")


class DaemonProcess:
    """A running `i2vd run` with helpers to wait on its JSON log and outbox."""

    def __init__(self, root: Path, config: dict[str, Any], extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.config_path = root / "daemon.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config_path), *extra_args],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        parsed = []
        for line in lines:
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

    def wait_for_event(self, name: str, timeout: float = STARTUP_SECONDS) -> dict[str, Any]:
        self.wait_for(lambda: any(e.get("event") == name for e in self.events()), timeout, f"log event {name}")
        return next(e for e in self.events() if e.get("event") == name)

    def metrics_port(self) -> int:
        return int(self.wait_for_event("metrics_serving")["port"])

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port()}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
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


@pytest.fixture
def start_daemon(tmp_path: Path, model_cache: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*extra_args: str, **overrides: Any) -> DaemonProcess:
        config: dict[str, Any] = {
            "inbox": "inbox",
            "outbox": "outbox",
            "model": {
                "source": "embedded-tiny",
                "device": "cpu",
                "dtype": "float32",
                "cache_dir": str(model_cache),
            },
            "generation": {"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 2}},
            "intake": {"stable_seconds": 0.3, "rescan_seconds": 0.5},
            "worker": {"retry_delay_seconds": 0.5},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "logging": {"format": "json"},
        }
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value}
        daemon = DaemonProcess(tmp_path, config, extra_args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def drop_pair(inbox: Path, make_image: Callable[..., Path], stem: str, sidecar: str, ext: str = ".png") -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    make_image(f"{stem}{ext}", size=(96, 64), directory=inbox)
    partial = inbox / f"{stem}.yaml.part"
    partial.write_text(sidecar)
    partial.rename(inbox / f"{stem}.yaml")


def manifests(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(outbox.glob("video_*.json"))]


def test_daemon_processes_good_pairs_rejects_bad_one_and_stops_on_sigterm(
    start_daemon: Callable[..., DaemonProcess], make_image: Callable[..., Path]
) -> None:
    daemon = start_daemon()
    daemon.wait_for_event("service_ready")
    drop_pair(daemon.inbox, make_image, "cat", "prompt: a cat surfing a wave\nseed: 7\n")
    drop_pair(daemon.inbox, make_image, "dog", "prompt: a dog\nnum_frames: 12\nvariants: [first_frame]\n", ".jpg")
    drop_pair(daemon.inbox, make_image, "bad", "prompt: x\nstrength: 0.8\n")

    daemon.wait_for(lambda: len(manifests(daemon.outbox)) == 2, JOB_SECONDS, "two manifests")
    reason_path = daemon.inbox / "failed" / "bad" / "reason.json"
    daemon.wait_for(reason_path.exists, JOB_SECONDS, "reason.json for the bad pair")

    by_input = {m["input"]["image"]: m for m in manifests(daemon.outbox)}
    assert set(by_input) == {"cat.png", "dog.jpg"}
    cat, dog = by_input["cat.png"], by_input["dog.jpg"]
    assert cat["used"]["seed"] == 7 and cat["seed"] == 7
    assert {o["role"] for o in cat["outputs"]} == {"main", "vertical", "fps30", "first_frame"}
    assert {o["role"] for o in dog["outputs"]} == {"main", "first_frame"}
    for manifest, frames in ((cat, 8), (dog, 12)):
        assert manifest["schema"] == "i2vd.manifest/1"
        assert manifest["model"]["id"] == "embedded-tiny"
        main = next(o for o in manifest["outputs"] if o["role"] == "main")
        assert main["name"].startswith("video_") and main["name"].endswith(".mp4")
        path = daemon.outbox / main["name"]
        assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == frames
        assert main["frames"] == frames and main["codec"] == "h264"
        for output in manifest["outputs"]:
            assert (daemon.outbox / output["name"]).stat().st_size == output["bytes"]
    vertical = next(o for o in cat["outputs"] if o["role"] == "vertical")
    assert (vertical["width"], vertical["height"]) == (1080, 1920)

    reason = json.loads(reason_path.read_text())
    assert reason["reason"] == "sidecar_invalid"
    assert "strength" in reason["message"]
    assert (daemon.inbox / "failed" / "bad" / "bad.png").exists()
    assert not any(daemon.inbox.glob("*.png")) and not any(daemon.inbox.glob("*.yaml"))
    assert not list((daemon.outbox).glob("*.part")) and not list(daemon.outbox.glob(".*tmp*"))

    samples = daemon.scrape()
    assert samples['i2vd_jobs_total{outcome="succeeded"}'] == 2
    assert samples['i2vd_jobs_total{outcome="rejected"}'] == 1
    assert samples["i2vd_frames_generated_total{}"] == 20
    assert samples["i2vd_jobs_received_total{}"] == 3
    assert samples["i2vd_model_load_seconds{}"] > 0
    assert samples["i2vd_watcher_up{}"] == 1
    assert samples['i2vd_stage_duration_seconds_count{stage="generate"}'] == 2

    published = [e for e in daemon.events() if e.get("event") == "job_published"]
    assert len(published) == 2 and all(e.get("job_id") for e in published)

    assert daemon.stop(signal.SIGTERM) == 0
    assert any(e.get("event") == "service_stopped" for e in daemon.events())


def test_once_drains_the_inbox_and_exits_zero(
    start_daemon: Callable[..., DaemonProcess], make_image: Callable[..., Path], tmp_path: Path
) -> None:
    drop_pair(tmp_path / "inbox", make_image, "early", "prompt: already waiting\nvariants: []\n")
    daemon = start_daemon("--once")
    assert daemon.process.wait(timeout=STARTUP_SECONDS) == 0
    assert len(manifests(daemon.outbox)) == 1
    assert any(e.get("event") == "inbox_drained" for e in daemon.events())


def test_sigterm_mid_job_releases_it_and_the_next_start_finishes_it(
    start_daemon: Callable[..., DaemonProcess], make_image: Callable[..., Path], tmp_path: Path
) -> None:
    daemon = start_daemon()
    daemon.wait_for_event("service_ready")
    # Long enough on the CPU that the signal lands between denoising steps.
    drop_pair(daemon.inbox, make_image, "slow", "prompt: slow\nwidth: 128\nheight: 128\nsteps: 60\nvariants: []\n")
    daemon.wait_for_event("generate_step", JOB_SECONDS)
    assert daemon.stop(signal.SIGTERM) == 0
    assert any(e.get("event") == "job_released" for e in daemon.events())
    assert manifests(daemon.outbox) == []
    claimed = list((daemon.inbox / ".i2vd" / "jobs").iterdir())
    assert len(claimed) == 1, "the interrupted job must stay claimed on disk"

    restarted = start_daemon(
        "--once", generation={"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 2}}
    )
    assert restarted.process.wait(timeout=STARTUP_SECONDS + JOB_SECONDS) == 0
    assert any(e.get("event") == "job_recovered" for e in restarted.events())
    [manifest] = manifests(restarted.outbox)
    assert manifest["attempts"] == 2
    assert manifest["used"]["steps"] == 60
    assert list((restarted.inbox / ".i2vd" / "jobs").iterdir()) == []

"""Acceptance: the generation process under the real `i2vd run` (real tiny model, real signals).

The model runs in a supervised child process (`daemon/genproc.py`). These tests kill that child, kill the whole
daemon, and send two stop signals, and check that no job is lost, none runs twice, and no process outlives the
daemon. Checklist cases C20 (kill -9 during inference), C21/C23 (crash and hang of the worker process) and the
lifecycle part of issue "reliability" (second signal stops at once).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opshelpers import OpsDaemon, drop_pair

pytestmark = [pytest.mark.acceptance, pytest.mark.slow, pytest.mark.timeout(600)]

STARTUP_SECONDS = 240.0
JOB_SECONDS = 180.0
SLOW_JOB = "prompt: slow\nwidth: 128\nheight: 128\nsteps: 80\nvariants: []\n"


def status(daemon: OpsDaemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.inbox / ".i2vd" / "status.json").read_text())
    return data


def generation_pid(daemon: OpsDaemon) -> int:
    daemon.wait_for(lambda: bool(status(daemon).get("workers")), STARTUP_SECONDS, "status.json with workers")
    pid = status(daemon)["workers"][0]["pid"]
    assert isinstance(pid, int) and pid != daemon.process.pid
    return pid


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is gone for our purposes when /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.1)
    return False


def manifests(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(outbox.glob("video_*.json"))]


def test_a_killed_generation_process_is_restarted_and_its_job_retried(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """C21/C23: SIGKILL the model's process mid-job -> `WorkerCrashed`, a new process loads, the job is retried and
    published once with attempts=2; the daemon itself never stops."""
    daemon = ops_daemon(generation={"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 40}})
    daemon.wait_for_event("service_ready")
    first = generation_pid(daemon)
    drop_pair(daemon.inbox, "victim", "prompt: a cat\nvariants: []\n")
    daemon.wait_for_event("generate_step", JOB_SECONDS)
    os.kill(first, signal.SIGKILL)
    daemon.wait_for(lambda: len(manifests(daemon.outbox)) == 1, STARTUP_SECONDS + JOB_SECONDS, "the retried job")
    [manifest] = manifests(daemon.outbox)
    assert manifest["attempts"] == 2
    assert daemon.process.poll() is None
    assert any(e.get("event") == "generator_process_restarting" for e in daemon.events())
    failure = next(e for e in daemon.events() if e.get("event") == "job_failed")
    assert "SIGKILL" in failure["error"]
    assert generation_pid(daemon) != first
    samples = daemon.scrape()
    assert samples['i2vd_worker_restarts_total{device="cpu",worker="w0"}'] == 1
    assert samples['i2vd_jobs_total{outcome="succeeded"}'] == 1
    assert daemon.stop() == 0


def test_kill_9_of_the_daemon_takes_its_children_and_the_job_reruns_once(
    ops_daemon: Callable[..., OpsDaemon],
) -> None:
    """C20: kill -9 of the daemon mid-inference: the generation process exits with it (it watches its parent), the job
    stays claimed, and the next start runs it again (attempts=2) and publishes it exactly once."""
    daemon = ops_daemon()
    daemon.wait_for_event("service_ready")
    child = generation_pid(daemon)
    drop_pair(daemon.inbox, "slow", SLOW_JOB)
    daemon.wait_for_event("generate_step", JOB_SECONDS)
    daemon.process.kill()
    daemon.process.wait(timeout=30)
    assert wait_gone(child), "the generation process outlived the daemon"
    assert len(list((daemon.inbox / ".i2vd" / "jobs").iterdir())) == 1
    quick = {"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 2}}
    restarted = ops_daemon("--once", generation=quick)
    assert restarted.process.wait(timeout=STARTUP_SECONDS + JOB_SECONDS) == 0
    [manifest] = manifests(restarted.outbox)
    assert manifest["attempts"] == 2
    assert list((restarted.inbox / ".i2vd" / "jobs").iterdir()) == []


def test_second_signal_stops_at_once_and_leaves_the_job_claimed(ops_daemon: Callable[..., OpsDaemon]) -> None:
    """Lifecycle: with a long stop grace period the first SIGTERM waits for the running job; a second SIGTERM
    kills the generation process and exits promptly; the job stays claimed (resumed by the next start)."""
    daemon = ops_daemon(worker={"retry_delay_seconds": 0.5, "stop_grace_seconds": 600})
    daemon.wait_for_event("service_ready")
    child = generation_pid(daemon)
    drop_pair(daemon.inbox, "slow", SLOW_JOB)
    daemon.wait_for_event("generate_step", JOB_SECONDS)
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_event("stop_grace", 30)
    time.sleep(1.0)
    assert daemon.process.poll() is None, "the first signal must let the running job go on"
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - started < 30
    assert wait_gone(child)
    assert manifests(daemon.outbox) == []
    assert len(list((daemon.inbox / ".i2vd" / "jobs").iterdir())) == 1
    assert not any(e.get("event") == "job_failed" for e in daemon.events())

"""Operator control: the pause flag, the paused queue, cancel requests (pending and running), retry of a failed pair."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon import control
from daemon.controller import Controller
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore, Pair


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def _failed_pair(inbox: Path, name: str = "cat") -> Path:
    failed = inbox / "failed" / name
    failed.mkdir(parents=True)
    (failed / f"{name}.png").write_bytes(b"png")
    (failed / f"{name}.yaml").write_text("prompt: x\n")
    (failed / "reason.json").write_text("{}")
    return failed


def test_pause_resume_flag(tmp_path: Path) -> None:
    assert not control.is_paused(tmp_path)
    assert control.pause(tmp_path) is True
    assert control.pause(tmp_path) is False
    assert control.is_paused(tmp_path)
    assert control.resume(tmp_path) is True
    assert control.resume(tmp_path) is False


def test_paused_queue_holds_items_until_resumed() -> None:
    queue: JobQueue[str] = JobQueue()
    queue.set_paused(True)
    queue.put("a", priority=0, sequence=1)
    assert queue.get(timeout=0.05) is None
    taken: list[str | None] = []
    getter = threading.Thread(target=lambda: taken.append(queue.get(timeout=5)))
    getter.start()
    queue.set_paused(False)
    getter.join(timeout=5)
    assert taken == ["a"]


def test_queue_remove_takes_matching_items_only() -> None:
    queue: JobQueue[str] = JobQueue()
    for sequence, item in enumerate(("a", "b", "a2")):
        queue.put(item, priority=0, sequence=sequence)
    assert queue.remove(lambda item: item.startswith("a")) == ["a", "a2"]
    assert queue.snapshot() == ["b"]


def test_retry_moves_the_pair_back_and_removes_the_failed_dir(inbox: Path) -> None:
    _failed_pair(inbox)
    image, sidecar = control.retry_failed(inbox, "cat")
    assert image == inbox / "cat.png" and image.read_bytes() == b"png"
    assert sidecar.read_text() == "prompt: x\n"
    assert not (inbox / "failed" / "cat").exists()


def test_retry_never_overwrites(inbox: Path) -> None:
    failed = _failed_pair(inbox)
    (inbox / "cat.yaml").write_text("prompt: someone else's\n")
    with pytest.raises(control.ControlError, match="will not overwrite"):
        control.retry_failed(inbox, "cat")
    assert (inbox / "cat.yaml").read_text() == "prompt: someone else's\n"
    assert not (inbox / "cat.png").exists()
    assert (failed / "cat.png").exists() and (failed / "cat.yaml").exists()


@pytest.mark.parametrize("name", ["nope", "..", "", "a/b"])
def test_retry_unknown_or_unsafe_name(inbox: Path, name: str) -> None:
    with pytest.raises(control.ControlError):
        control.retry_failed(inbox, name)


def test_retry_refuses_a_dir_without_exactly_one_pair(inbox: Path) -> None:
    failed = _failed_pair(inbox)
    (failed / "cat.jpg").write_bytes(b"jpg")
    with pytest.raises(control.ControlError, match="exactly one image"):
        control.retry_failed(inbox, "cat")


def test_cancel_requests_round_trip_and_junk_is_dropped(tmp_path: Path) -> None:
    request = control.request_cancel(tmp_path, "odd\nname")
    (tmp_path / "control" / "cancel-junk.json").write_text("not json")
    [found] = control.pending_cancels(tmp_path)
    assert found.name == "odd\nname" and found.path == request
    assert not (tmp_path / "control" / "cancel-junk.json").exists()


class _Worker:
    def __init__(self, job_id: str | None, name: str | None) -> None:
        self.current_job, self.current_name = job_id, name
        self.name = "w0"
        self.cancelled: list[str] = []

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def _claim(store: JobStore, inbox: Path, stem: str) -> ClaimedJob:
    (inbox / f"{stem}.png").write_bytes(b"png")
    (inbox / f"{stem}.yaml").write_text("prompt: x\n")
    return store.claim(Pair(stem, inbox / f"{stem}.png", inbox / f"{stem}.yaml"))


def _controller(inbox: Path, worker: Any) -> tuple[Controller, JobStore, JobQueue[ClaimedJob], DaemonMetrics]:
    store = JobStore(inbox, inbox / ".i2vd")
    queue: JobQueue[ClaimedJob] = JobQueue()
    metrics = DaemonMetrics()
    workers = [worker] if worker is not None else []
    return Controller(inbox / ".i2vd", queue, store, metrics, lambda: workers), store, queue, metrics


def test_controller_cancels_a_pending_job_to_failed(inbox: Path) -> None:
    controller, store, queue, metrics = _controller(inbox, None)
    job = _claim(store, inbox, "cat")
    queue.put(job, priority=0, sequence=job.sequence)
    metrics.pending.inc()
    control.request_cancel(inbox / ".i2vd", "cat")
    controller.apply()
    assert len(queue) == 0
    reason = json.loads((inbox / "failed" / "cat" / "reason.json").read_text())
    assert reason["reason"] == "cancelled"
    assert (inbox / "failed" / "cat" / "cat.png").exists()
    assert metrics.registry.get_sample_value("i2vd_jobs_total", {"outcome": "cancelled"}) == 1
    assert metrics.registry.get_sample_value("i2vd_jobs_pending") == 0
    assert control.pending_cancels(inbox / ".i2vd") == []


def test_controller_interrupts_the_running_job(inbox: Path) -> None:
    worker = _Worker("job-1", "cat")
    controller, store, _queue, _metrics = _controller(inbox, worker)
    _claim(store, inbox, "cat")
    control.request_cancel(inbox / ".i2vd", "cat")
    controller.apply()
    assert worker.cancelled == ["job-1"]


def test_controller_keeps_a_request_for_a_job_waiting_for_retry_and_drops_unknown_ones(inbox: Path) -> None:
    controller, store, _queue, _metrics = _controller(inbox, _Worker(None, None))
    _claim(store, inbox, "waiting")  # claimed on disk, not queued: between retries
    control.request_cancel(inbox / ".i2vd", "waiting")
    control.request_cancel(inbox / ".i2vd", "unknown")
    controller.apply()
    assert [r.name for r in control.pending_cancels(inbox / ".i2vd")] == ["waiting"]


def test_controller_follows_the_pause_flag(inbox: Path) -> None:
    controller, _store, queue, metrics = _controller(inbox, None)
    control.pause(inbox / ".i2vd")
    controller.apply()
    assert queue.paused and metrics.registry.get_sample_value("i2vd_queue_paused") == 1
    control.resume(inbox / ".i2vd")
    controller.apply()
    assert not queue.paused


def test_snapshot_reports_progress_outcomes_and_memory(inbox: Path) -> None:
    worker = SimpleNamespace(current_job="job-1", current_name="cat", progress=(3, 10), name="w0")
    controller, _store, _queue, metrics = _controller(inbox, worker)
    metrics.jobs.labels(outcome="succeeded").inc()
    snapshot = controller.snapshot({"allocated": 5, "total": 10})
    assert snapshot["running"] == {"job_id": "job-1", "name": "cat", "step": 3, "steps": 10, "worker": "w0"}
    assert snapshot["running_jobs"] == [snapshot["running"]]
    assert snapshot["outcomes"]["succeeded"] == 1 and snapshot["outcomes"]["cancelled"] == 0
    assert snapshot["gpu_memory_bytes"] == {"allocated": 5, "total": 10}

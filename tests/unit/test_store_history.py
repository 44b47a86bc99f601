"""The attempt history in job.json: each attempt's start, end, outcome and error, kept across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clocks import SteppingClock

from daemon.store import JobStore, Pair

Clock = SteppingClock


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    (path / "cat.png").write_bytes(b"png")
    (path / "cat.yaml").write_bytes(b"prompt: a cat\n")
    return path


def open_store(inbox: Path, max_attempts: int = 3) -> JobStore:
    return JobStore(inbox, inbox / ".i2vd", now=Clock(), max_attempts=max_attempts)


def the_pair(inbox: Path) -> Pair:
    return Pair("cat", inbox / "cat.png", inbox / "cat.yaml")


def test_history_records_start_end_outcome_and_error_and_survives_a_restart(inbox: Path) -> None:
    """Issue 4 part 1: job.json holds attempts and history (each attempt's start/end/outcome/error)."""
    store = open_store(inbox)
    job = store.claim(the_pair(inbox))
    job = store.end_attempt(store.record_attempt(job), "retried", "ffmpeg failed with exit status 1")
    job = store.record_attempt(job)
    state = json.loads((job.directory / "job.json").read_text())
    assert state["attempts"] == 2
    first, second = state["history"]
    assert (first["number"], first["outcome"], first["error"]) == (1, "retried", "ffmpeg failed with exit status 1")
    assert first["started_at"] < first["ended_at"]
    assert (second["number"], second["ended_at"], second["outcome"]) == (2, None, None)
    (recovered,) = open_store(inbox).recover()
    assert [r.outcome for r in recovered.history] == ["retried", "crashed"]


def test_a_new_attempt_closes_one_left_open_without_a_recorded_end(inbox: Path) -> None:
    """An attempt whose end was never recorded (an in-process retry) is closed as `unrecorded`, not `crashed`:
    only a restart knows the daemon died."""
    store = open_store(inbox)
    job = store.record_attempt(store.record_attempt(store.claim(the_pair(inbox))))
    assert [(r.number, r.outcome) for r in job.history] == [(1, "unrecorded"), (2, None)]


def test_legacy_job_json_without_history_at_the_limit_is_poison(inbox: Path) -> None:
    """A job.json written before histories were kept, already at `max_attempts`: treated as poison too."""
    store = open_store(inbox, max_attempts=2)
    job = store.claim(the_pair(inbox))
    path = job.directory / "job.json"
    state = json.loads(path.read_text())
    state["attempts"] = 2
    del state["history"]
    path.write_text(json.dumps(state))
    assert open_store(inbox, max_attempts=2).recover() == []
    reason = json.loads((inbox / "failed" / "cat" / "reason.json").read_text())
    assert reason["reason"] == "poison" and "history" not in reason


def test_below_the_limit_a_crashed_job_is_requeued(inbox: Path) -> None:
    """Checklist C20: one death is not poison; the job is re-queued with its attempt count."""
    store = open_store(inbox, max_attempts=3)
    store.record_attempt(store.claim(the_pair(inbox)))
    (job,) = open_store(inbox, max_attempts=3).recover()
    assert job.attempts == 1


def test_completion_closes_the_attempt_as_succeeded_in_the_archived_state(inbox: Path) -> None:
    """The archived job.json (done/<id>/) shows how the last attempt ended."""
    store = open_store(inbox)
    job = store.record_attempt(store.claim(the_pair(inbox)))
    assert store.complete(job, archive=True)
    state = json.loads((inbox / ".i2vd" / "done" / job.job_id / "job.json").read_text())
    assert state["history"][-1]["outcome"] == "succeeded" and state["history"][-1]["ended_at"]

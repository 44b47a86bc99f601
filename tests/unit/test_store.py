"""The on-disk job store: claims are atomic renames, state survives a restart, nothing is ever lost."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from clocks import SteppingClock

from daemon.config import EncodeConfig, GenerationConfig
from daemon.errors import JobRejected
from daemon.jobspec import ResolvedJob, parse_sidecar, resolve_job
from daemon.store import ClaimedJob, JobStore, Pair

REASON_KEYS = {"input", "reason", "detail", "message", "attempts", "at"}


def FakeNow() -> SteppingClock:
    return SteppingClock(datetime(2025, 11, 25, 8, 30, 0, tzinfo=UTC))


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def store(inbox: Path) -> JobStore:
    return JobStore(inbox, inbox / ".i2vd", now=FakeNow())


def drop_pair(inbox: Path, stem: str = "cat", image_ext: str = ".png", sidecar_ext: str = ".yaml") -> Pair:
    image = inbox / f"{stem}{image_ext}"
    sidecar = inbox / f"{stem}{sidecar_ext}"
    image.write_bytes(b"image bytes of " + stem.encode())
    sidecar.write_text("prompt: a cat\nseed: 7\n")
    return Pair(stem=stem, image=image, sidecar=sidecar)


def resolved_job() -> ResolvedJob:
    spec = parse_sidecar(b"prompt: a cat\nseed: 7\n")
    return resolve_job(spec, GenerationConfig(), EncodeConfig(), stem="cat", image_size=(64, 48))


def reopen(inbox: Path) -> JobStore:
    return JobStore(inbox, inbox / ".i2vd", now=FakeNow())


def read_reason(directory: Path) -> dict[str, object]:
    record = json.loads((directory / "reason.json").read_text())
    assert REASON_KEYS <= set(record) <= REASON_KEYS | {"history"}  # history: only for jobs that ran
    assert datetime.fromisoformat(str(record["at"])).tzinfo is not None
    return dict(record)


def test_claim_moves_both_files_and_writes_job_json(store: JobStore, inbox: Path) -> None:
    pair = drop_pair(inbox)
    job = store.claim(pair)
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", job.job_id)
    assert job.directory == inbox / ".i2vd" / "jobs" / job.job_id
    assert not pair.image.exists() and not pair.sidecar.exists()
    assert job.image_path == job.directory / "input.png"
    assert job.image_path.read_bytes() == b"image bytes of cat"
    assert job.sidecar_path == job.directory / "sidecar.yaml"
    assert job.sidecar_path.read_text().startswith("prompt:")
    state = json.loads((job.directory / "job.json").read_text())
    assert state["phase"] == "claimed"
    assert state["image_name"] == "cat.png" and state["sidecar_name"] == "cat.yaml"
    assert (job.stem, job.attempts, job.resolved, job.image_sha256) == ("cat", 0, None, None)
    assert job.received_at.tzinfo is not None
    assert store.counts() == {"claimed": 1, "done": 0, "failed": 0, "not_removed": 0}


def test_claim_moves_a_symlink_as_a_link_without_touching_its_target(
    store: JobStore, inbox: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    pair = drop_pair(inbox)
    pair.image.unlink()
    pair.image.symlink_to(secret)
    job = store.claim(pair)
    assert job.image_path.is_symlink()
    assert secret.read_text() == "top secret"


def test_sequence_increases_and_persists_across_instances(store: JobStore, inbox: Path) -> None:
    first = store.claim(drop_pair(inbox, "a"))
    second = store.claim(drop_pair(inbox, "b"))
    assert second.sequence == first.sequence + 1
    third = reopen(inbox).claim(drop_pair(inbox, "c"))
    assert third.sequence == second.sequence + 1


def test_sequence_survives_a_lost_counter_file(store: JobStore, inbox: Path) -> None:
    jobs = [store.claim(drop_pair(inbox, stem)) for stem in ("a", "b")]
    (inbox / ".i2vd" / "sequence").unlink()
    later = reopen(inbox).claim(drop_pair(inbox, "c"))
    assert later.sequence > max(job.sequence for job in jobs)


def test_record_attempt_persists(store: JobStore, inbox: Path) -> None:
    job = store.record_attempt(store.record_attempt(store.claim(drop_pair(inbox))))
    assert job.attempts == 2
    (recovered,) = reopen(inbox).recover()
    assert recovered.attempts == 2


def test_recover_returns_claimed_jobs_with_resolved_job_and_seed(store: JobStore, inbox: Path) -> None:
    resolved = resolved_job()
    first = store.mark_validated(store.claim(drop_pair(inbox, "a")), resolved, "ab" * 32)
    second = store.claim(drop_pair(inbox, "b"))
    recovered = reopen(inbox).recover()
    assert [job.job_id for job in recovered] == [first.job_id, second.job_id]
    assert recovered[0] == first
    assert recovered[0].resolved == resolved and recovered[0].resolved is not None
    assert recovered[0].resolved.seed == 7
    assert recovered[0].image_sha256 == "ab" * 32
    assert recovered[1].resolved is None


@pytest.mark.parametrize("damage", ["garbage", "missing", "wrong_schema"])
def test_recover_quarantines_a_job_with_broken_state_and_keeps_its_files(
    store: JobStore, inbox: Path, damage: str
) -> None:
    job = store.claim(drop_pair(inbox))
    state_file = job.directory / "job.json"
    if damage == "garbage":
        state_file.write_text("{not json")
    elif damage == "missing":
        state_file.unlink()
    else:
        state_file.write_text(json.dumps({"job_id": job.job_id}))
    assert reopen(inbox).recover() == []
    failed = inbox / "failed" / job.job_id
    assert (failed / "input.png").read_bytes() == b"image bytes of cat"
    assert (failed / "sidecar.yaml").exists()
    assert read_reason(failed)["reason"] == "state_corrupt"
    assert not job.directory.exists()


def test_recover_rolls_back_a_claim_interrupted_by_a_crash(
    store: JobStore, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = drop_pair(inbox)
    real_rename = os.rename
    calls: list[str] = []

    def crash_on_second_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append(str(src))
        if len(calls) == 2:
            raise SystemExit("power cut")  # not an OSError: the claim cannot clean up after itself
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second_rename)
    with pytest.raises(SystemExit):
        store.claim(pair)
    monkeypatch.undo()
    assert not pair.sidecar.exists() and pair.image.exists()
    assert reopen(inbox).recover() == []
    assert pair.sidecar.read_text().startswith("prompt:")
    assert pair.image.read_bytes() == b"image bytes of cat"
    assert store.counts()["claimed"] == 0


def test_recover_fails_a_claimed_job_whose_input_went_missing(store: JobStore, inbox: Path) -> None:
    job = store.claim(drop_pair(inbox))
    job.image_path.unlink()
    assert reopen(inbox).recover() == []
    record = read_reason(inbox / "failed" / "cat")
    assert record["reason"] == "state_corrupt" and record["detail"] == ["input.png"]
    assert (inbox / "failed" / "cat" / "cat.yaml").exists()


def test_recover_empties_the_trash_of_an_interrupted_delete(store: JobStore, inbox: Path) -> None:
    leftover = inbox / ".i2vd" / "trash" / "20250101T000000-deadbeef"
    leftover.mkdir()
    (leftover / "input.png").write_bytes(b"x")
    reopen(inbox).recover()
    assert not leftover.exists()


@pytest.mark.parametrize("archive", [True, False])
def test_complete_archives_or_deletes(store: JobStore, inbox: Path, archive: bool) -> None:
    job = store.claim(drop_pair(inbox))
    store.complete(job, archive=archive)
    assert not job.directory.exists()
    archived = inbox / ".i2vd" / "done" / job.job_id
    assert archived.exists() is archive
    if archive:
        assert (archived / "input.png").read_bytes() == b"image bytes of cat"
        assert (archived / "job.json").exists()
    assert store.counts() == {"claimed": 0, "done": int(archive), "failed": 0, "not_removed": 0}
    assert list((inbox / ".i2vd" / "trash").iterdir()) == []


def test_fail_moves_inputs_back_under_original_names_with_reason(store: JobStore, inbox: Path) -> None:
    job = store.record_attempt(store.claim(drop_pair(inbox, "cat", ".JPG", ".yml")))
    rejection = JobRejected("prompt: Field required", reason="sidecar_invalid", detail=["prompt: Field required"])
    failed = store.fail(job, rejection, rejection.reason, rejection.message, rejection.detail)
    assert failed == inbox / "failed" / "cat"
    assert sorted(p.name for p in failed.iterdir()) == ["cat.JPG", "cat.yml", "reason.json"]
    assert (failed / "cat.JPG").read_bytes() == b"image bytes of cat"
    record = read_reason(failed)
    assert record == {
        "input": "cat.JPG",
        "reason": "sidecar_invalid",
        "detail": ["prompt: Field required"],
        "message": "prompt: Field required",
        "attempts": 1,
        "at": record["at"],
        "history": [
            {
                "number": 1,
                "started_at": "2025-11-25T08:30:03Z",
                "ended_at": "2025-11-25T08:30:04Z",
                "outcome": "sidecar_invalid",
                "error": "prompt: Field required",
                "counted": True,
            }
        ],
    }
    assert not job.directory.exists()
    assert store.counts() == {"claimed": 0, "done": 0, "failed": 1, "not_removed": 0}


def test_fail_takes_defaults_from_the_rejection_and_numbers_repeats(store: JobStore, inbox: Path) -> None:
    first = store.fail(store.claim(drop_pair(inbox)), JobRejected("bad image", reason="image_unreadable"))
    second = store.fail(store.claim(drop_pair(inbox)), None, "retries_exhausted", "gave up", "OOM")
    third = store.fail(store.claim(drop_pair(inbox)), None, input_name="cat.yaml")
    assert [first.name, second.name, third.name] == ["cat", "cat-2", "cat-3"]
    assert read_reason(first)["reason"] == "image_unreadable"
    assert read_reason(first)["message"] == "bad image"
    assert read_reason(second)["detail"] == "OOM"
    assert read_reason(third)["input"] == "cat.yaml"
    assert read_reason(third)["reason"] == "failed"


def test_claim_of_a_pair_whose_image_vanished_puts_the_sidecar_back(store: JobStore, inbox: Path) -> None:
    pair = drop_pair(inbox)
    pair.image.unlink()
    with pytest.raises(FileNotFoundError):
        store.claim(pair)
    assert pair.sidecar.read_text().startswith("prompt:")
    assert store.counts()["claimed"] == 0
    assert list((inbox / ".i2vd" / "jobs").iterdir()) == []


def test_claim_of_a_pair_whose_sidecar_vanished_changes_nothing(store: JobStore, inbox: Path) -> None:
    pair = drop_pair(inbox)
    pair.sidecar.unlink()
    with pytest.raises(FileNotFoundError):
        store.claim(pair)
    assert pair.image.exists()
    assert store.counts()["claimed"] == 0


def test_quarantine_moves_inbox_files_without_following_links(store: JobStore, inbox: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (inbox / "a.png").symlink_to(secret)
    (inbox / "a.jpg").write_bytes(b"jpg")
    failed = store.quarantine([inbox / "a.jpg", inbox / "a.png"], "ambiguous_pair", "two images", ["a.jpg", "a.png"])
    assert failed == inbox / "failed" / "a"
    assert (failed / "a.png").is_symlink() and secret.read_text() == "top secret"
    record = read_reason(failed)
    assert (record["input"], record["reason"], record["attempts"]) == ("a.jpg", "ambiguous_pair", 0)
    pair_dir = store.quarantine(drop_pair(inbox, "a"), "bad_filename", "bad name")
    assert pair_dir.name == "a-2"
    assert sorted(p.name for p in pair_dir.iterdir()) == ["a.png", "a.yaml", "reason.json"]


def test_quarantine_of_vanished_files_raises_and_leaves_nothing(store: JobStore, inbox: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.quarantine([inbox / "gone.png"], "ambiguous_pair", "gone")
    assert list((inbox / "failed").iterdir()) == []


def test_claimed_job_is_a_frozen_value(store: JobStore, inbox: Path) -> None:
    job = store.claim(drop_pair(inbox))
    assert isinstance(job, ClaimedJob)
    with pytest.raises(AttributeError):
        job.attempts = 3  # type: ignore[misc]


def test_failing_a_job_that_is_already_gone_raises_and_leaves_no_empty_folder(store: JobStore, inbox: Path) -> None:
    job = store.claim(drop_pair(inbox))
    store.complete(job, archive=True)
    with pytest.raises(FileNotFoundError):
        store.fail(job, None, "failed", "late")
    assert list((inbox / "failed").iterdir()) == []


def test_recover_drops_a_half_written_job_json_temp_file(store: JobStore, inbox: Path) -> None:
    job = store.claim(drop_pair(inbox))
    temp = job.directory / ".job.json.tmp-12345"
    temp.write_text("{half")
    (recovered,) = reopen(inbox).recover()
    assert recovered.job_id == job.job_id
    assert not temp.exists()

"""What the store keeps per job (`job.json`) and the values it hands out: pairs, claimed jobs, attempt history.

`job.json` is the job's whole durable memory: the original names, the resolved settings (seed included, so a retry
makes the same video), the input's sha256, every attempt with its start, end, outcome and error (so a job that
kills the daemon each time is recognised as poison after a restart), and, while the outputs are being delivered,
which names it is delivering (so a crash in the middle is reconciled instead of publishing a second set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from daemon.fsio import atomic_write_bytes, check_single_name
from daemon.jobspec import ResolvedJob

JOB_FILE = "job.json"
SIDECAR_FILE = "sidecar.yaml"
_SHARED_FIELDS = {"job_id", "stem", "image_name", "sidecar_name", "received_at", "sequence", "attempts"}
CRASHED = "crashed"
"""Outcome of an attempt that was still open when the daemon started again: it died during that attempt."""


@dataclass(frozen=True)
class Pair:
    """An image and its sidecar in the inbox's top level, sharing `stem`."""

    stem: str
    image: Path
    sidecar: Path


class AttemptRecord(BaseModel):
    """One attempt: when it started and ended, how it ended, and whether it counted against `max_attempts`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    number: int
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    error: str | None = None
    counted: bool = True


class PublishingMark(BaseModel):
    """Set just before the manifest is delivered: the outputs already carry these names in `directory`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    directory: str
    base: str
    names: list[str]
    sha256: list[str]
    archive: bool = True


@dataclass(frozen=True)
class ClaimedJob:
    """A job whose inputs now live in the store; `resolved` is set once intake validated it."""

    job_id: str
    stem: str
    image_name: str
    sidecar_name: str
    directory: Path
    image_path: Path
    sidecar_path: Path
    received_at: datetime
    sequence: int
    attempts: int
    image_sha256: str | None
    resolved: ResolvedJob | None
    history: tuple[AttemptRecord, ...] = ()


class JobState(BaseModel):
    """What `job.json` holds: enough to rebuild a `ClaimedJob`, resolved seed included, after a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    phase: Literal["claiming", "claimed"]
    job_id: str
    stem: str
    image_name: str
    sidecar_name: str
    image_file: str
    received_at: datetime
    sequence: int
    attempts: int = 0
    image_sha256: str | None = None
    resolved: ResolvedJob | None = None
    history: list[AttemptRecord] = []
    publishing: PublishingMark | None = None

    @field_validator("job_id", "stem", "image_name", "sidecar_name", "image_file")
    @classmethod
    def _single_name(cls, value: str) -> str:
        """Every name here becomes one path component under the inbox or the state folder: a job.json that says
        otherwise (`../../elsewhere`) is damaged or forged, and must never steer a rename."""
        check_single_name(value, "job.json name")
        return value


def image_file_name(image_name: str) -> str:
    """`input.<ext>` keeps the extension (lower-cased) so tools can still guess the claimed copy's type."""
    suffix = Path(image_name).suffix.lower()
    return f"input{suffix}" if suffix else "input"


def read_state(directory: Path) -> JobState:
    data = (directory / JOB_FILE).read_bytes()
    return JobState.model_validate_json(data)


def write_state(directory: Path, state: JobState) -> None:
    # json.dumps escapes lone surrogates (names that are not UTF-8) instead of failing like model_dump_json.
    text = json.dumps(state.model_dump(mode="json", exclude_defaults=False), indent=2, ensure_ascii=True)
    atomic_write_bytes(directory / JOB_FILE, text.encode("ascii") + b"\n")


def to_job(directory: Path, state: JobState) -> ClaimedJob:
    same = state.model_dump(include=_SHARED_FIELDS)  # plain values only: `resolved` stays a model below
    return ClaimedJob(
        **same,
        directory=directory,
        image_path=directory / state.image_file,
        sidecar_path=directory / SIDECAR_FILE,
        image_sha256=state.image_sha256,
        resolved=state.resolved,
        history=tuple(state.history),
    )


def history_json(history: tuple[AttemptRecord, ...] | list[AttemptRecord]) -> list[dict[str, object]]:
    """The attempts as plain JSON values (for reason.json)."""
    return [record.model_dump(mode="json") for record in history]


def close_open_attempt(
    history: tuple[AttemptRecord, ...],
    now: datetime,
    outcome: str,
    error: str | None = None,
    *,
    counted: bool = True,
) -> tuple[AttemptRecord, ...]:
    """The history with its last attempt ended (if it is still open); unchanged otherwise."""
    if not history or history[-1].ended_at is not None:
        return history
    last = history[-1].model_copy(update={"ended_at": now, "outcome": outcome, "error": error, "counted": counted})
    return (*history[:-1], last)


def skipped_attempt(now: datetime, earlier_job_id: str) -> AttemptRecord:
    """The history entry of a duplicate skipped by policy (not an attempt: `counted` is False)."""
    return AttemptRecord(
        number=0, started_at=now, ended_at=now, outcome="skipped_duplicate", error=earlier_job_id, counted=False
    )

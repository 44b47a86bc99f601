"""The durable on-disk job state: claim, attempts, recovery after a crash, and the done/failed moves.

Every pair that enters the inbox ends in exactly one place: still in the inbox, claimed under
`jobs/<id>/`, archived under `done/<id>/` (or deleted after publishing) or quarantined under
`inbox/failed/NAME[-N]/` with a `reason.json`. Each step between those places is one `rename(2)` on the same
filesystem, so a crash leaves a job in one place or the other, never half-copied. `job.json` is rewritten
atomically (temp, fsync, rename, fsync dir).

A claim writes `job.json` (phase `claiming`, with the original names) *before* it moves the inputs, so a crash
in the middle of a claim is undone by `recover()`: the files already moved go back to the inbox under their
names.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.errors import FatalError, JobRejected
from daemon.fsio import atomic_write_bytes, fsync_dir, link_no_clobber
from daemon.jobspec import ResolvedJob

log = structlog.get_logger(__name__)

JOB_FILE = "job.json"
REASON_FILE = "reason.json"
SIDECAR_FILE = "sidecar.yaml"
SEQUENCE_FILE = "sequence"
_SHARED_FIELDS = {"job_id", "stem", "image_name", "sidecar_name", "received_at", "sequence", "attempts"}


@dataclass(frozen=True)
class Pair:
    """An image and its sidecar in the inbox's top level, sharing `stem`."""

    stem: str
    image: Path
    sidecar: Path


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


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _image_file_name(image_name: str) -> str:
    """`input.<ext>` keeps the extension (lower-cased) so tools can still guess the claimed copy's type."""
    suffix = Path(image_name).suffix.lower()
    return f"input{suffix}" if suffix else "input"


def _read_state(directory: Path) -> JobState:
    data = (directory / JOB_FILE).read_bytes()
    return JobState.model_validate_json(data)


def _write_state(directory: Path, state: JobState) -> None:
    # json.dumps escapes lone surrogates (names that are not UTF-8) instead of failing like model_dump_json.
    text = json.dumps(state.model_dump(mode="json"), indent=2, ensure_ascii=True)
    atomic_write_bytes(directory / JOB_FILE, text.encode("ascii") + b"\n")


def _to_job(directory: Path, state: JobState) -> ClaimedJob:
    same = state.model_dump(include=_SHARED_FIELDS)  # plain values only: `resolved` stays a model below
    return ClaimedJob(
        **same,
        directory=directory,
        image_path=directory / state.image_file,
        sidecar_path=directory / SIDECAR_FILE,
        image_sha256=state.image_sha256,
        resolved=state.resolved,
    )


def _count_dirs(directory: Path) -> int:
    try:
        return sum(1 for e in os.scandir(directory) if e.is_dir(follow_symlinks=False) and e.name[0] != ".")
    except FileNotFoundError:
        return 0


class JobStore:
    """The job state under `state_dir` (`jobs/`, `done/`, `sequence`) plus the quarantine `inbox/failed/`.

    Thread-safe: the intake thread claims and rejects while the worker thread records attempts and completes.
    `state_dir` must be on the inbox's filesystem, because every move is an atomic same-filesystem rename.
    """

    def __init__(self, inbox: Path, state_dir: Path, now: Callable[[], datetime] = _utc_now) -> None:
        self.inbox = inbox
        self.state_dir = state_dir
        self.jobs_dir = state_dir / "jobs"
        self.done_dir = state_dir / "done"
        self.trash_dir = state_dir / "trash"
        self.failed_dir = inbox / "failed"
        self._now = now
        self._lock = threading.Lock()
        for directory in (inbox, self.jobs_dir, self.done_dir, self.trash_dir, self.failed_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if os.stat(inbox).st_dev != os.stat(state_dir).st_dev:
            raise FatalError(f"state_dir {state_dir} must be on the same filesystem as the inbox {inbox}")
        self._sequence = self._last_sequence()

    # ----- sequence -----------------------------------------------------------------------------------------
    def _last_sequence(self) -> int:
        """The highest sequence handed out: the counter file, or a job that got past it (crash in between)."""
        try:
            last = int((self.state_dir / SEQUENCE_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            last = 0
        for directory in self._job_dirs():
            try:
                last = max(last, _read_state(directory).sequence)
            except (OSError, ValueError):
                continue
        return last

    def _next_sequence(self) -> int:
        with self._lock:
            self._sequence += 1
            atomic_write_bytes(self.state_dir / SEQUENCE_FILE, f"{self._sequence}\n".encode("ascii"))
            return self._sequence

    def _job_dirs(self) -> list[Path]:
        entries = sorted(os.scandir(self.jobs_dir), key=lambda entry: entry.name)
        return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.name[0] != "."]

    # ----- claim --------------------------------------------------------------------------------------------
    def claim(self, pair: Pair) -> ClaimedJob:
        """Move the pair into `jobs/<job_id>/` (sidecar, then image) and persist its state.

        Raises FileNotFoundError, with the inbox as it was, if either file vanished before it could be moved.
        """
        received = self._now()
        job_id = f"{received.astimezone(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
        directory = self.jobs_dir / job_id
        directory.mkdir()
        state = JobState(
            phase="claiming",
            job_id=job_id,
            stem=pair.stem,
            image_name=pair.image.name,
            sidecar_name=pair.sidecar.name,
            image_file=_image_file_name(pair.image.name),
            received_at=received,
            sequence=self._next_sequence(),
        )
        _write_state(directory, state)
        fsync_dir(self.jobs_dir)
        job = _to_job(directory, state)
        try:
            os.rename(pair.sidecar, job.sidecar_path)
            os.rename(pair.image, job.image_path)
        except OSError:
            self._roll_back_claim(job)
            raise
        fsync_dir(self.inbox)
        state = state.model_copy(update={"phase": "claimed"})
        _write_state(directory, state)
        log.debug("pair_claimed", job_id=job_id, stem=pair.stem)
        return _to_job(directory, state)

    def _roll_back_claim(self, job: ClaimedJob) -> None:
        """Put back whatever an interrupted claim already moved, then drop the job directory."""
        moved = [(job.sidecar_path, job.sidecar_name), (job.image_path, job.image_name)]
        leftovers = [path for path, _ in moved if os.path.lexists(path)]
        for path, name in moved:
            if os.path.lexists(path) and link_no_clobber(path, self.inbox / name):
                leftovers.remove(path)
        if leftovers:
            # Someone dropped a new file with the same name meanwhile: keep ours visibly, never overwrite.
            self.quarantine(
                leftovers,
                "claim_conflict",
                "A file with the same name appeared while this one was being claimed.",
            )
        fsync_dir(self.inbox)
        shutil.rmtree(job.directory, ignore_errors=True)
        fsync_dir(self.jobs_dir)

    # ----- state updates ------------------------------------------------------------------------------------
    def _update(self, job: ClaimedJob, **changes: Any) -> ClaimedJob:
        state = _read_state(job.directory)
        _write_state(job.directory, JobState.model_validate({**state.model_dump(), **changes}))
        return replace(job, **changes)

    def mark_validated(self, job: ClaimedJob, resolved: ResolvedJob, image_sha256: str) -> ClaimedJob:
        """Persist the resolved job (its seed included, so a retry after a restart makes the same video)."""
        return self._update(job, resolved=resolved, image_sha256=image_sha256)

    def record_attempt(self, job: ClaimedJob) -> ClaimedJob:
        """Count an attempt before work starts, so a job that crashes the daemon is not retried forever."""
        return self._update(job, attempts=job.attempts + 1)

    # ----- recovery -----------------------------------------------------------------------------------------
    def recover(self) -> list[ClaimedJob]:
        """Every claimed job left by a previous run, oldest sequence first; broken state goes to failed/."""
        self._empty_trash()
        jobs: list[ClaimedJob] = []
        for directory in self._job_dirs():
            try:
                job = self._recover_one(directory)
            except Exception:
                log.exception("job_recovery_failed", directory=str(directory))
                continue
            if job is not None:
                jobs.append(job)
        return sorted(jobs, key=lambda job: job.sequence)

    def _recover_one(self, directory: Path) -> ClaimedJob | None:
        for temp in directory.glob(f".{JOB_FILE}.tmp-*"):
            temp.unlink()  # a job.json rewrite interrupted by the crash; the old job.json is intact
        try:
            state = _read_state(directory)
        except (OSError, ValueError, ValidationError) as exc:
            self._quarantine_corrupt(directory, f"job.json is missing or unreadable: {exc}")
            return None
        job = _to_job(directory, state)
        if state.phase == "claiming":
            log.warning("claim_rolled_back", job_id=job.job_id, stem=job.stem)
            self._roll_back_claim(job)
            return None
        missing = [p.name for p in (job.image_path, job.sidecar_path) if not os.path.lexists(p)]
        if missing:
            self.fail(job, None, "state_corrupt", "The claimed job lost some of its input files.", missing)
            return None
        return job

    def _quarantine_corrupt(self, directory: Path, detail: str) -> None:
        if not any(directory.iterdir()):
            directory.rmdir()  # a crash between mkdir and the first job.json write: nothing to keep
            return
        target = self._rename_to_failed(directory, directory.name)
        message = "The daemon's record of this job was damaged; its files are kept here."
        self._write_reason(target, directory.name, "state_corrupt", message, detail, 0)
        log.error("job_rejected", reason="state_corrupt", failed_dir=str(target), detail=detail)

    def _empty_trash(self) -> None:
        for entry in os.scandir(self.trash_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    # ----- terminal moves -----------------------------------------------------------------------------------
    def complete(self, job: ClaimedJob, archive: bool) -> None:
        """Archive the job's inputs under `done/<id>/`, or delete them; only after its outputs are durable."""
        target = (self.done_dir if archive else self.trash_dir) / job.job_id
        os.rename(job.directory, target)
        fsync_dir(self.jobs_dir)
        fsync_dir(target.parent)
        if not archive:
            shutil.rmtree(target)

    def fail(
        self,
        job: ClaimedJob,
        rejection: JobRejected | None = None,
        reason: str | None = None,
        message: str | None = None,
        detail: Any = None,
        *,
        input_name: str | None = None,
    ) -> Path:
        """Quarantine a claimed job to `inbox/failed/NAME[-N]/` under its original names, with `reason.json`.

        Explicit `reason`/`message`/`detail` win over the rejection's. The whole job directory moves in one
        rename, so a crash afterwards leaves the files in failed/ (perhaps under their claimed names), not
        lost.
        """
        reason = reason or (rejection.reason if rejection is not None else "failed")
        message = message or (rejection.message if rejection is not None else "The job failed.")
        if detail is None and rejection is not None:
            detail = rejection.detail
        input_name = input_name or getattr(rejection, "input_name", None) or job.image_name
        target = self._rename_to_failed(job.directory, job.stem)
        fsync_dir(self.jobs_dir)
        for claimed, original in ((job.image_path.name, job.image_name), (SIDECAR_FILE, job.sidecar_name)):
            if os.path.lexists(target / claimed):
                os.rename(target / claimed, target / original)
        self._write_reason(target, input_name, reason, message, detail, job.attempts)
        (target / JOB_FILE).unlink(missing_ok=True)
        fsync_dir(target)
        return target

    def quarantine(self, pair_or_paths: Pair | Sequence[Path], reason: str, message: str, detail: Any = None) -> Path:
        """Move files still in the inbox to `inbox/failed/NAME[-N]/` with `reason.json` (links not followed).

        Raises FileNotFoundError if none of the files is there any more.
        """
        if isinstance(pair_or_paths, Pair):
            paths, stem = [pair_or_paths.image, pair_or_paths.sidecar], pair_or_paths.stem
        else:
            paths = list(pair_or_paths)
            stem = paths[0].name.rsplit(".", 1)[0] or paths[0].name
        target = self._make_failed_dir(stem)
        moved = [path for path in paths if self._move_into(path, target)]
        if not moved:
            target.rmdir()
            raise FileNotFoundError(errno.ENOENT, "files vanished before quarantine", str(paths[0]))
        self._write_reason(target, moved[0].name, reason, message, detail, 0)
        fsync_dir(target)
        for parent in {path.parent for path in moved}:
            fsync_dir(parent)
        return target

    @staticmethod
    def _move_into(path: Path, target: Path) -> bool:
        try:
            os.rename(path, target / path.name)
        except FileNotFoundError:
            return False
        return True

    def _make_failed_dir(self, name: str) -> Path:
        with self._lock:
            counter = 1
            while True:
                candidate = self.failed_dir / (name if counter == 1 else f"{name}-{counter}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    counter += 1
                    continue
                fsync_dir(self.failed_dir)
                return candidate

    def _rename_to_failed(self, directory: Path, name: str) -> Path:
        """Move a whole directory to a fresh `failed/NAME[-N]` in one rename (rename(2) never merges dirs)."""
        target = self._make_failed_dir(name)
        try:
            os.rename(directory, target)  # replaces the empty placeholder atomically
        except OSError:
            target.rmdir()
            raise
        fsync_dir(self.failed_dir)
        return target

    def _write_reason(
        self, target: Path, input_name: str, reason: str, message: str, detail: Any, attempts: int
    ) -> None:
        at = self._now().isoformat()
        record = {"input": input_name, "reason": reason, "detail": detail, "message": message}
        record |= {"attempts": attempts, "at": at}
        text = json.dumps(record, indent=2, ensure_ascii=True, default=str)
        atomic_write_bytes(target / REASON_FILE, text.encode("ascii") + b"\n")

    # ----- observation --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many jobs are claimed, archived as done, and quarantined, as found on disk now."""
        dirs = {"claimed": self.jobs_dir, "done": self.done_dir, "failed": self.failed_dir}
        return {name: _count_dirs(directory) for name, directory in dirs.items()}

"""The durable on-disk job state: claim, attempts, recovery after a crash, and the done/failed moves.

Every pair that enters the inbox ends in exactly one place: still in the inbox, claimed under
`jobs/<id>/`, archived under `done/<id>/` (or deleted after publishing) or quarantined under
`inbox/failed/NAME[-N]/` with a `reason.json`. Each step between those places is one `rename(2)` on the same
filesystem, so a crash leaves a job in one place or the other, never half-copied. `job.json` is rewritten
atomically (temp, fsync, rename, fsync dir); what it holds is described in `daemon/jobstate.py`.

A claim writes `job.json` (phase `claiming`, with the original names) *before* it moves the inputs, so a crash
in the middle of a claim is undone by `recover()`: the files already moved go back to the inbox under their
names. An attempt is recorded in `job.json` *before* it starts, so `recover()` knows which attempt the daemon
died in: after `max_attempts` such deaths the job is poison and goes to failed/ with its history instead of
killing the daemon again. Published jobs are recorded in the completed-input ledger (`daemon/ledger.py`) before
their inputs move, so a crash (or a read-only inbox) after publication never makes a job run twice.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import ValidationError

from daemon.config import WorkerConfig
from daemon.errors import FatalError, JobRejected
from daemon.fsio import atomic_write_bytes, fsync_dir, link_no_clobber
from daemon.jobspec import ResolvedJob
from daemon.jobstate import (
    CRASHED,
    JOB_FILE,
    SIDECAR_FILE,
    AttemptRecord,
    ClaimedJob,
    JobState,
    Pair,
    PublishingMark,
    history_json,
    image_file_name,
    read_state,
    to_job,
    write_state,
)
from daemon.ledger import DEFAULT_MAX_ENTRIES, LEDGER_FILE, CompletedLedger, LedgerEntry, input_key
from daemon.publish import sha256_file

__all__ = ["ClaimedJob", "JobState", "JobStore", "Pair"]

log = structlog.get_logger(__name__)

REASON_FILE = "reason.json"
DUPLICATE_FILE = "duplicate_of.json"
SEQUENCE_FILE = "sequence"
DEFAULT_MAX_ATTEMPTS: int = WorkerConfig.model_fields["max_attempts"].default
DuplicatePolicy = Literal["process", "skip"]
_JOB_FIELDS = {field.name for field in fields(ClaimedJob)}


def _utc_now() -> datetime:
    return datetime.now(UTC)


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

    def __init__(
        self,
        inbox: Path,
        state_dir: Path,
        now: Callable[[], datetime] = _utc_now,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        ledger_max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.inbox = inbox
        self.max_attempts = max_attempts
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
        self.ledger = CompletedLedger(state_dir / LEDGER_FILE, ledger_max_entries)
        self.recovery_report: Counter[str] = Counter()
        """What the last `recover()` did besides re-queueing: `poison`, `completed`, `rolled_back`, `corrupt`..."""
        self.not_removed: set[str] = set()
        """Published jobs whose inputs could not be moved away (read-only share); never run again (ledger)."""

    # ----- sequence -----------------------------------------------------------------------------------------
    def _last_sequence(self) -> int:
        """The highest sequence handed out: the counter file, or a job that got past it (crash in between)."""
        try:
            last = int((self.state_dir / SEQUENCE_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            last = 0
        for directory in self._job_dirs():
            try:
                last = max(last, read_state(directory).sequence)
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
            image_file=image_file_name(pair.image.name),
            received_at=received,
            sequence=self._next_sequence(),
        )
        write_state(directory, state)
        fsync_dir(self.jobs_dir)
        job = to_job(directory, state)
        try:
            _claim_move(pair.sidecar, job.sidecar_path)
            _claim_move(pair.image, job.image_path)
        except OSError:
            self._roll_back_claim(job)
            raise
        fsync_dir(self.inbox)
        state = state.model_copy(update={"phase": "claimed"})
        write_state(directory, state)
        log.debug("pair_claimed", job_id=job_id, stem=pair.stem)
        return to_job(directory, state)

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
        state = read_state(job.directory)
        write_state(job.directory, JobState.model_validate({**state.model_dump(), **changes}))
        return replace(job, **{key: value for key, value in changes.items() if key in _JOB_FIELDS})

    def mark_validated(self, job: ClaimedJob, resolved: ResolvedJob, image_sha256: str) -> ClaimedJob:
        """Persist the resolved job (its seed included, so a retry after a restart makes the same video)."""
        return self._update(job, resolved=resolved, image_sha256=image_sha256)

    def record_attempt(self, job: ClaimedJob) -> ClaimedJob:
        """Count an attempt and note its start in the history *before* work starts, so a job that kills the
        daemon is known at the next start (and becomes poison after `max_attempts`) instead of looping."""
        history = _close_open(job.history, self._now(), "unrecorded")
        started = AttemptRecord(number=job.attempts + 1, started_at=self._now())
        return self._update(job, attempts=job.attempts + 1, history=(*history, started))

    def end_attempt(self, job: ClaimedJob, outcome: str, error: str | None = None) -> ClaimedJob:
        """Note how the running attempt ended (`succeeded`, `retried`, `failed`...) in the job's history."""
        return self._update(job, history=_close_open(job.history, self._now(), outcome, error))

    def release_attempt(self, job: ClaimedJob, outcome: str, error: str | None = None) -> ClaimedJob:
        """End the running attempt *without* counting it (disk full: `StorageFull.consumes_attempt` is False;
        service stopping): the job stays claimed and pending, with the same attempts left as before."""
        history = _close_open(job.history, self._now(), outcome, error, counted=False)
        return self._update(job, attempts=max(0, job.attempts - 1), history=history)

    def mark_publishing(
        self, job: ClaimedJob, directory: Path, base: str, names: Sequence[str], digests: Sequence[str], archive: bool
    ) -> None:
        """Note, before the manifest is delivered, which names (and bytes) the outputs already have, so
        `recover()` can finish a publication a crash cut short (manifest there) or take its orphan outputs back
        (no manifest)."""
        mark = PublishingMark(
            directory=str(directory), base=base, names=list(names), sha256=list(digests), archive=archive
        )
        self._update(job, publishing=mark)

    # ----- recovery -----------------------------------------------------------------------------------------
    def recover(self) -> list[ClaimedJob]:
        """Every claimed job left by a previous run, oldest sequence first, each exactly once.

        On the way: interrupted claims are rolled back, broken state goes to failed/ (`state_corrupt`), a job the
        ledger knows as published is archived instead of re-run, a publication a crash cut short is finished or
        taken back, the attempt the daemon died in is closed as `crashed`, and a job that already used
        `max_attempts` that way is quarantined as `poison` with its history. `recovery_report` counts each.
        """
        self._empty_trash()
        self.recovery_report = Counter()
        jobs: list[ClaimedJob] = []
        for directory in self._job_dirs():
            try:
                job = self._recover_one(directory)
            except Exception:
                log.exception("job_recovery_failed", directory=str(directory))
                continue
            if job is not None:
                jobs.append(job)
        self.recovery_report["requeued"] = len(jobs)
        return sorted(jobs, key=lambda job: job.sequence)

    def _recover_one(self, directory: Path) -> ClaimedJob | None:
        for temp in directory.glob(f".{JOB_FILE}.tmp-*"):
            temp.unlink()  # a job.json rewrite interrupted by the crash; the old job.json is intact
        try:
            state = read_state(directory)
        except (OSError, ValueError, ValidationError) as exc:
            self._quarantine_corrupt(directory, f"job.json is missing or unreadable: {exc}")
            self.recovery_report["corrupt"] += 1
            return None
        job = to_job(directory, state)
        if state.phase == "claiming":
            log.warning("claim_rolled_back", job_id=job.job_id, stem=job.stem)
            self._roll_back_claim(job)
            self.recovery_report["rolled_back"] += 1
            return None
        if self.ledger.has_job(job.job_id) or self._publication_done(job, state.publishing):
            self._finish_completed(job, state.publishing.archive if state.publishing else True)
            return None
        missing = [p.name for p in (job.image_path, job.sidecar_path) if not os.path.lexists(p)]
        if missing:
            self.fail(job, None, "state_corrupt", "The claimed job lost some of its input files.", missing)
            self.recovery_report["corrupt"] += 1
            return None
        return self._recover_attempts(job)

    def _recover_attempts(self, job: ClaimedJob) -> ClaimedJob | None:
        """Close the attempt the daemon died in; quarantine the job as poison once it died in `max_attempts`."""
        died = bool(job.history) and job.history[-1].ended_at is None
        if died:
            error = "the daemon stopped during this attempt (killed, crashed or lost power)"
            job = self._update(job, history=_close_open(job.history, self._now(), CRASHED, error))
        legacy = not job.history and job.attempts > 0  # job.json from before the history was kept
        if job.attempts >= self.max_attempts and (died or legacy):
            message = (
                f"The daemon stopped during each of this job's last attempts ({job.attempts} of "
                f"{self.max_attempts} allowed); it is kept here so it cannot stop the daemon again."
            )
            detail = {"attempts": job.attempts, "max_attempts": self.max_attempts}
            target = self.fail(job, None, "poison", message, detail)
            log.error("job_poison", job_id=job.job_id, stem=job.stem, attempts=job.attempts, failed_dir=str(target))
            self.recovery_report["poison"] += 1
            return None
        return job

    def _publication_done(self, job: ClaimedJob, mark: PublishingMark | None) -> bool:
        """A crash during delivery: manifest there (ours) -> done; else take the orphan outputs back out."""
        if mark is None:
            return False
        directory = Path(mark.directory)
        manifest = directory / f"{mark.base}.json"
        try:
            if json.loads(manifest.read_bytes()).get("job_id") == job.job_id:
                names = [*mark.names, manifest.name]
                self._record_published(job, [directory / name for name in names], manifest)
                return True
        except (OSError, ValueError, AttributeError):
            pass
        for name, digest in zip(mark.names, mark.sha256, strict=True):
            path = directory / name
            if path.is_file() and not path.is_symlink() and sha256_file(path) == digest:
                path.unlink()  # ours, delivered without its manifest: never complete from a reader's view
                log.warning("orphan_output_removed", job_id=job.job_id, output=name)
        self._update(job, publishing=None)
        return False

    def _finish_completed(self, job: ClaimedJob, archive: bool) -> None:
        log.warning("job_already_published", job_id=job.job_id, stem=job.stem)
        self.recovery_report["completed"] += 1
        self._move_inputs_away(job, archive)

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

    # ----- completed-input ledger -----------------------------------------------------------------------------
    def input_key(self, job: ClaimedJob) -> str:
        """The ledger key of the job's inputs (image and sidecar content)."""
        image = job.image_sha256 or sha256_file(job.image_path)
        return input_key(image, sha256_file(job.sidecar_path))

    def find_duplicate(self, job: ClaimedJob) -> LedgerEntry | None:
        """The earlier published job with byte-identical inputs, if the ledger remembers one."""
        return self.ledger.lookup(self.input_key(job))

    def settle_duplicate(self, job: ClaimedJob, policy: DuplicatePolicy) -> LedgerEntry | None:
        """Apply `intake.duplicate_policy` to a validated job. Returns the earlier entry when the job was
        *skipped* (its inputs archived under `done/<id>/` with `duplicate_of.json`; do not queue it), else None
        (queue it: `process` publishes it again under a new, never-clashing name)."""
        earlier = self.find_duplicate(job)
        if earlier is None:
            return None
        pointer = {"job_id": earlier.job_id, "outputs": earlier.outputs, "manifest": earlier.manifest}
        if policy == "process":
            log.info("duplicate_input", job_id=job.job_id, stem=job.stem, policy=policy, earlier=pointer)
            return None
        text = json.dumps({**pointer, "at": self._now().isoformat()}, indent=2, ensure_ascii=True)
        atomic_write_bytes(job.directory / DUPLICATE_FILE, text.encode("ascii") + b"\n")
        self._update(job, history=(*job.history, _skipped(self._now(), earlier.job_id)))
        self._move_inputs_away(job, archive=True)
        log.info("duplicate_skipped", job_id=job.job_id, stem=job.stem, earlier=pointer)
        return earlier

    def _record_published(self, job: ClaimedJob, outputs: Sequence[Path], manifest: Path | None) -> None:
        image = job.image_sha256 or sha256_file(job.image_path)
        sidecar = sha256_file(job.sidecar_path)
        entry = LedgerEntry(
            key=input_key(image, sidecar),
            job_id=job.job_id,
            stem=job.stem,
            image_sha256=image,
            sidecar_sha256=sidecar,
            outputs=[str(path) for path in outputs],
            manifest=str(manifest) if manifest is not None else None,
            at=self._now(),
        )
        self.ledger.record(entry)

    # ----- terminal moves -----------------------------------------------------------------------------------
    def complete(self, job: ClaimedJob, archive: bool, outputs: Sequence[Path] = ()) -> bool:
        """Record the published job in the ledger, then archive its inputs under `done/<id>/` or delete them;
        only after its outputs are durable. Returns False when the inputs could not be moved away (read-only
        share): the job is still done (the ledger says so; it is never run again) and counted in `not_removed`.
        """
        manifest = next((path for path in outputs if path.suffix == ".json"), None)
        try:
            self._record_published(job, outputs, manifest)
        except OSError:
            log.exception("ledger_write_failed", job_id=job.job_id)
        return self._move_inputs_away(job, archive)

    def _move_inputs_away(self, job: ClaimedJob, archive: bool) -> bool:
        target = (self.done_dir if archive else self.trash_dir) / job.job_id
        try:
            os.rename(job.directory, target)
            fsync_dir(self.jobs_dir)
            fsync_dir(target.parent)
            if not archive:
                shutil.rmtree(target)
        except OSError as exc:
            self.not_removed.add(job.job_id)
            log.warning("inputs_not_removed", job_id=job.job_id, stem=job.stem, error=str(exc), errno=exc.errno)
            return False
        self.not_removed.discard(job.job_id)
        return True

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
        history = _close_open(job.history, self._now(), reason, message)
        self._write_reason(target, input_name, reason, message, detail, job.attempts, history)
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
        self,
        target: Path,
        input_name: str,
        reason: str,
        message: str,
        detail: Any,
        attempts: int,
        history: tuple[AttemptRecord, ...] = (),
    ) -> None:
        """`reason.json`; jobs that ran also get `history` (each attempt's start, end, outcome and error)."""
        at = self._now().isoformat()
        record = {"input": input_name, "reason": reason, "detail": detail, "message": message}
        record |= {"attempts": attempts, "at": at}
        if history:
            record["history"] = history_json(history)
        text = json.dumps(record, indent=2, ensure_ascii=True, default=str)
        atomic_write_bytes(target / REASON_FILE, text.encode("ascii") + b"\n")

    # ----- observation --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many jobs are claimed, archived as done, and quarantined, as found on disk now; `not_removed`: done
        jobs whose inputs could not be moved out of `jobs/` (not counted as claimed: they never run again)."""
        dirs = {"claimed": self.jobs_dir, "done": self.done_dir, "failed": self.failed_dir}
        counts = {name: _count_dirs(directory) for name, directory in dirs.items()}
        counts["not_removed"] = len(self.not_removed)
        counts["claimed"] = max(0, counts["claimed"] - counts["not_removed"])
        return counts


def _close_open(
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


def _skipped(now: datetime, earlier_job_id: str) -> AttemptRecord:
    return AttemptRecord(
        number=0, started_at=now, ended_at=now, outcome="skipped_duplicate", error=earlier_job_id, counted=False
    )


def _claim_move(source: Path, destination: Path) -> None:
    """Rename one input into the job directory. On NFS a rename reported failed may have happened (rename(2),
    BUGS): source gone and destination the same file -> claimed (Postfix `sane_rename`). Any other failure
    (ENOENT: another daemon or thread claimed it first) goes up, for a quiet roll-back."""
    identity = os.lstat(source)
    try:
        os.rename(source, destination)
    except OSError:
        if os.path.lexists(source) or not os.path.lexists(destination):
            raise
        moved = os.lstat(destination)
        if (moved.st_dev, moved.st_ino) != (identity.st_dev, identity.st_ino):
            raise
        log.warning("claim_rename_reconciled", source=source.name)

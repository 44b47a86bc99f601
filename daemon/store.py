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
import stat
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from daemon.config import WorkerConfig
from daemon.errors import FatalError, JobRejected
from daemon.fsio import atomic_write_bytes, fsync_dir, link_no_clobber, rename_or_confirm
from daemon.jobspec import ResolvedJob
from daemon.jobstate import (
    JOB_FILE,
    SIDECAR_FILE,
    AttemptRecord,
    ClaimedJob,
    JobState,
    Pair,
    PublishingMark,
    close_open_attempt,
    image_file_name,
    read_state,
    skipped_attempt,
    to_job,
    write_state,
)
from daemon.ledger import DEFAULT_MAX_ENTRIES, LEDGER_FILE, CompletedLedger, LedgerEntry, input_key
from daemon.publish import sha256_file
from daemon.quarantine import FailedFolder, move_into
from daemon.recovery import recover_jobs

__all__ = ["ClaimedJob", "JobState", "JobStore", "Pair"]

log = structlog.get_logger(__name__)

DUPLICATE_FILE = "duplicate_of.json"
SEQUENCE_FILE = "sequence"
DEFAULT_MAX_ATTEMPTS: int = WorkerConfig.model_fields["max_attempts"].default
DuplicatePolicy = Literal["process", "skip"]
_JOB_FIELDS = {field.name for field in fields(ClaimedJob)}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _with_own_name(path: Path, name: str) -> Path:
    """`path` renamed, inside its own folder, to the user's file name `name` (from job.json, whose names are
    single path components: `JobState`); `path` itself where that is not possible."""
    target = path.with_name(name)
    if os.path.lexists(target):
        return path
    try:
        os.rename(path, target)
    except OSError:
        return path
    return target


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
        self.decoding_dir = state_dir / "decoding"
        """Marks of images being decoded in this process (`checks.decoding_guarded`)."""
        self.failed_dir = inbox / "failed"
        self.now = now
        self._lock = threading.Lock()
        inbox.mkdir(parents=True, exist_ok=True)
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.ensure_folders()
        if os.stat(inbox).st_dev != os.stat(state_dir).st_dev:
            raise FatalError(f"state_dir {state_dir} must be on the same filesystem as the inbox {inbox}")
        self._sequence = self._last_sequence()
        self.failed_folder = FailedFolder(self.failed_dir, now)
        self.ledger = CompletedLedger(state_dir / LEDGER_FILE, ledger_max_entries)
        self.recovery_report: Counter[str] = Counter()
        """What the last `recover()` did besides re-queueing: `poison`, `completed`, `rolled_back`, `corrupt`..."""
        self.not_removed: set[str] = set()
        """Published jobs whose inputs could not be moved away (read-only share); never run again (ledger)."""

    def ensure_folders(self) -> list[Path]:
        """Make the store's folders where missing, and return those made. Anything else found under one of their
        names (a file, or a symbolic link that an inbox user put there, perhaps to a folder outside the inbox) is
        renamed aside first: the daemon only ever moves, writes and deletes inside folders it made itself."""
        made = []
        folders = (self.state_dir, self.jobs_dir, self.done_dir, self.trash_dir, self.decoding_dir, self.failed_dir)
        for directory in folders:
            try:
                kind = stat.S_IFMT(os.lstat(directory).st_mode)
            except FileNotFoundError:
                kind = None
            if kind is not None and kind != stat.S_IFDIR:
                aside = directory.with_name(f"{directory.name}.displaced-{secrets.token_hex(4)}")
                os.rename(directory, aside)
                log.error(
                    "state_folder_displaced", folder=str(directory), moved_to=aside.name, symlink=kind == stat.S_IFLNK
                )
                kind = None
            if kind is None:
                directory.mkdir()  # never `parents`: that would recreate an inbox deleted meanwhile
                made.append(directory)
        return made

    # ----- sequence -----------------------------------------------------------------------------------------
    def _last_sequence(self) -> int:
        """The highest sequence handed out: the counter file, or a job that got past it (crash in between)."""
        try:
            last = int((self.state_dir / SEQUENCE_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            last = 0
        for directory in self.job_dirs():
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

    def job_dirs(self) -> list[Path]:
        entries = sorted(os.scandir(self.jobs_dir), key=lambda entry: entry.name)
        return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.name[0] != "."]

    # ----- claim --------------------------------------------------------------------------------------------
    def claim(self, pair: Pair) -> ClaimedJob:
        """Move the pair into `jobs/<job_id>/` (sidecar, then image) and persist its state.

        Raises FileNotFoundError, with the inbox as it was, if either file vanished before it could be moved.
        """
        received = self.now()
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
            for source, destination in ((pair.sidecar, job.sidecar_path), (pair.image, job.image_path)):
                if rename_or_confirm(source, destination):
                    log.warning("claim_rename_reconciled", job_id=job_id, source=source.name)
        except OSError:
            self.roll_back_claim(job)
            raise
        fsync_dir(self.inbox)
        state = state.model_copy(update={"phase": "claimed"})
        write_state(directory, state)
        log.debug("pair_claimed", job_id=job_id, stem=pair.stem)
        return to_job(directory, state)

    def roll_back_claim(self, job: ClaimedJob) -> None:
        """Put back whatever an interrupted claim already moved, then drop the job directory."""
        moved = [(job.sidecar_path, job.sidecar_name), (job.image_path, job.image_name)]
        leftovers = [path for path, _ in moved if os.path.lexists(path)]
        for path, name in moved:
            if os.path.lexists(path) and link_no_clobber(path, self.inbox / name):
                leftovers.remove(path)
        if leftovers:
            # Someone dropped a new file with the same name meanwhile: keep ours visibly, never overwrite, under
            # the name it was dropped with.
            names = dict(moved)
            self.quarantine(
                [_with_own_name(path, names[path]) for path in leftovers],
                "claim_conflict",
                "A file with the same name appeared while this one was being claimed.",
            )
        fsync_dir(self.inbox)
        shutil.rmtree(job.directory, ignore_errors=True)
        fsync_dir(self.jobs_dir)

    # ----- state updates ------------------------------------------------------------------------------------
    def update_state(self, job: ClaimedJob, **changes: Any) -> ClaimedJob:
        state = read_state(job.directory)
        write_state(job.directory, JobState.model_validate({**state.model_dump(), **changes}))
        return replace(job, **{key: value for key, value in changes.items() if key in _JOB_FIELDS})

    def mark_validated(self, job: ClaimedJob, resolved: ResolvedJob, image_sha256: str) -> ClaimedJob:
        """Persist the resolved job (its seed included, so a retry after a restart makes the same video)."""
        return self.update_state(job, resolved=resolved, image_sha256=image_sha256)

    def record_attempt(self, job: ClaimedJob) -> ClaimedJob:
        """Count an attempt and note its start in the history *before* work starts, so a job that kills the
        daemon is known at the next start (and becomes poison after `max_attempts`) instead of looping."""
        history = close_open_attempt(job.history, self.now(), "unrecorded")
        started = AttemptRecord(number=job.attempts + 1, started_at=self.now())
        return self.update_state(job, attempts=job.attempts + 1, history=(*history, started))

    def end_attempt(self, job: ClaimedJob, outcome: str, error: str | None = None) -> ClaimedJob:
        """Note how the running attempt ended (`succeeded`, `retried`, `failed`...) in the job's history."""
        return self.update_state(job, history=close_open_attempt(job.history, self.now(), outcome, error))

    def release_attempt(self, job: ClaimedJob, outcome: str, error: str | None = None) -> ClaimedJob:
        """End the running attempt *without* counting it (disk full: `StorageFull.consumes_attempt` is False;
        service stopping): the job stays claimed and pending, with the same attempts left as before."""
        return self.update_state(job, **self.released(job, outcome, error))

    def released(self, job: ClaimedJob, outcome: str, error: str | None = None) -> dict[str, Any]:
        """The state changes of `release_attempt`, unwritten (for a job whose state cannot be written now)."""
        history = close_open_attempt(job.history, self.now(), outcome, error, counted=False)
        return {"attempts": max(0, job.attempts - 1), "history": history}

    def mark_publishing(
        self, job: ClaimedJob, directory: Path, base: str, names: Sequence[str], digests: Sequence[str], archive: bool
    ) -> None:
        """Note, before the manifest is delivered, which names (and bytes) the outputs already have, so
        `recover()` can finish a publication a crash cut short (manifest there) or take its orphan outputs back
        (no manifest)."""
        mark = PublishingMark(
            directory=str(directory), base=base, names=list(names), sha256=list(digests), archive=archive
        )
        self.update_state(job, publishing=mark)

    # ----- recovery -----------------------------------------------------------------------------------------
    def recover(self) -> list[ClaimedJob]:
        """Every claimed job left by a previous run, oldest sequence first, each exactly once (daemon/recovery.py
        says what else happens on the way); `recovery_report` counts what was not re-queued and why."""
        jobs, self.recovery_report = recover_jobs(self)
        return jobs

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
        text = json.dumps({**pointer, "at": self.now().isoformat()}, indent=2, ensure_ascii=True)
        atomic_write_bytes(job.directory / DUPLICATE_FILE, text.encode("ascii") + b"\n")
        self.update_state(job, history=(*job.history, skipped_attempt(self.now(), earlier.job_id)))
        self.move_inputs_away(job, archive=True)
        log.info("duplicate_skipped", job_id=job.job_id, stem=job.stem, earlier=pointer)
        return earlier

    def record_published(self, job: ClaimedJob, outputs: Sequence[Path], manifest: Path | None) -> None:
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
            at=self.now(),
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
            self.record_published(job, outputs, manifest)
            if job.history and job.history[-1].ended_at is None:
                job = self.update_state(job, history=close_open_attempt(job.history, self.now(), "succeeded"))
        except OSError:
            log.exception("ledger_write_failed", job_id=job.job_id)
        return self.move_inputs_away(job, archive)

    def move_inputs_away(self, job: ClaimedJob, archive: bool) -> bool:
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
        target = self.failed_folder.rename_in(job.directory, job.stem)
        fsync_dir(self.jobs_dir)
        for claimed, original in ((job.image_path.name, job.image_name), (SIDECAR_FILE, job.sidecar_name)):
            if os.path.lexists(target / claimed):
                os.rename(target / claimed, target / original)
        history = close_open_attempt(job.history, self.now(), reason, message)
        self.failed_folder.write_reason(target, input_name, reason, message, detail, job.attempts, history)
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
        target = self.failed_folder.make_dir(stem)
        moved = [path for path in paths if move_into(path, target)]
        if not moved:
            target.rmdir()
            raise FileNotFoundError(errno.ENOENT, "files vanished before quarantine", str(paths[0]))
        self.failed_folder.write_reason(target, moved[0].name, reason, message, detail, 0)
        fsync_dir(target)
        for parent in {path.parent for path in moved}:
            fsync_dir(parent)
        return target

    # ----- observation --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many jobs are claimed, archived as done, and quarantined, as found on disk now; `not_removed`: done
        jobs whose inputs could not be moved out of `jobs/` (not counted as claimed: they never run again)."""
        dirs = {"claimed": self.jobs_dir, "done": self.done_dir, "failed": self.failed_dir}
        counts = {name: _count_dirs(directory) for name, directory in dirs.items()}
        counts["not_removed"] = len(self.not_removed)
        counts["claimed"] = max(0, counts["claimed"] - counts["not_removed"])
        return counts

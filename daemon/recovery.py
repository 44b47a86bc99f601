"""Recovery at start: every job a previous run left claimed is re-queued exactly once, or settled.

On the way (reliability-anchors.md §7 B18, C20, C21): interrupted claims are rolled back into the inbox, broken
state goes to failed/ (`state_corrupt`), a job the completed-input ledger knows as published is archived instead
of re-run, a publication a crash cut short is finished (our manifest is there) or taken back (orphan outputs
removed, job re-queued), the attempt the daemon died in is closed as `crashed`, and a job that already used
`max_attempts` that way is quarantined as `poison` with its history instead of killing the daemon again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from daemon.fsio import fsync_dir
from daemon.jobstate import CRASHED, JOB_FILE, ClaimedJob, PublishingMark, close_open_attempt, read_state, to_job
from daemon.publish import sha256_file

if TYPE_CHECKING:
    from daemon.store import JobStore

log = structlog.get_logger(__name__)


def recover_jobs(store: JobStore) -> tuple[list[ClaimedJob], Counter[str]]:
    """The jobs to re-queue (oldest sequence first) and what happened to the others (`poison`, `completed`,
    `rolled_back`, `corrupt`; `requeued` counts the returned ones)."""
    recovery = _Recovery(store)
    return recovery.run(), recovery.report


def _manifest_job_id(manifest: Path) -> object:
    """The `job_id` a delivered manifest names (None: none there, unreadable, or not one of ours)."""
    try:
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("job_id") if isinstance(data, dict) else None


class _Recovery:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.report: Counter[str] = Counter()

    def run(self) -> list[ClaimedJob]:
        self._empty_trash()
        jobs: list[ClaimedJob] = []
        for directory in self.store.job_dirs():
            try:
                job = self._recover_one(directory)
            except Exception:
                log.exception("job_recovery_failed", directory=str(directory))
                continue
            if job is not None:
                jobs.append(job)
        self.report["requeued"] = len(jobs)
        return sorted(jobs, key=lambda job: job.sequence)

    def _recover_one(self, directory: Path) -> ClaimedJob | None:
        for temp in directory.glob(f".{JOB_FILE}.tmp-*"):
            temp.unlink()  # a job.json rewrite interrupted by the crash; the old job.json is intact
        try:
            state = read_state(directory)
        except (OSError, ValueError, ValidationError) as exc:
            self._quarantine_corrupt(directory, f"job.json is missing or unreadable: {exc}")
            self.report["corrupt"] += 1
            return None
        job = to_job(directory, state)
        if state.phase == "claiming":
            log.warning("claim_rolled_back", job_id=job.job_id, stem=job.stem)
            self.store.roll_back_claim(job)
            self.report["rolled_back"] += 1
            return None
        if self.store.ledger.has_job(job.job_id) or self._publication_done(job, state.publishing):
            self._finish_completed(job, state.publishing.archive if state.publishing else True)
            return None
        missing = [p.name for p in (job.image_path, job.sidecar_path) if not os.path.lexists(p)]
        if missing:
            self.store.fail(job, None, "state_corrupt", "The claimed job lost some of its input files.", missing)
            self.report["corrupt"] += 1
            return None
        return self._recover_attempts(job)

    def _recover_attempts(self, job: ClaimedJob) -> ClaimedJob | None:
        """Close the attempt the daemon died in; quarantine the job as poison once it died in `max_attempts`."""
        died = bool(job.history) and job.history[-1].ended_at is None
        if died:
            error = "the daemon stopped during this attempt (killed, crashed or lost power)"
            job = self.store.update_state(
                job, history=close_open_attempt(job.history, self.store.now(), CRASHED, error)
            )
        legacy = not job.history and job.attempts > 0  # job.json from before the history was kept
        if job.attempts >= self.store.max_attempts and (died or legacy):
            message = (
                f"The daemon stopped during each of this job's last attempts ({job.attempts} of "
                f"{self.store.max_attempts} allowed); it is kept here so it cannot stop the daemon again."
            )
            detail = {"attempts": job.attempts, "max_attempts": self.store.max_attempts}
            target = self.store.fail(job, None, "poison", message, detail)
            log.error("job_poison", job_id=job.job_id, stem=job.stem, attempts=job.attempts, failed_dir=str(target))
            self.report["poison"] += 1
            return None
        return job

    def _publication_done(self, job: ClaimedJob, mark: PublishingMark | None) -> bool:
        """A crash during delivery: manifest there (ours) -> done; else take the orphan outputs back out.

        Only reading the manifest decides which: once it is ours the outputs are published, so a failure to record
        that (the ledger's disk full) leaves the job and its mark for the next start instead of removing them."""
        if mark is None:
            return False
        directory = Path(mark.directory)
        manifest = directory / f"{mark.base}.json"
        owner = _manifest_job_id(manifest)
        if owner == job.job_id:
            names = [*mark.names, manifest.name]
            self.store.record_published(job, [directory / name for name in names], manifest)
            return True
        if owner is not None:
            # The names are noted before the first rename, so another job can have taken this base meanwhile
            # (its set is complete, with its manifest): none of these files is ours to remove.
            log.warning("publication_base_taken", job_id=job.job_id, base=mark.base, by=owner)
            self.store.update_state(job, publishing=None)
            return False
        removed = False
        for name, digest in zip(mark.names, mark.sha256, strict=True):
            path = directory / name
            if path.is_file() and not path.is_symlink() and sha256_file(path) == digest:
                path.unlink()  # ours, delivered without its manifest: never complete from a reader's view
                removed = True
                log.warning("orphan_output_removed", job_id=job.job_id, output=name)
        if removed:
            fsync_dir(directory)  # the removals are durable before the mark that lists them goes
        self.store.update_state(job, publishing=None)
        return False

    def _finish_completed(self, job: ClaimedJob, archive: bool) -> None:
        log.warning("job_already_published", job_id=job.job_id, stem=job.stem)
        self.report["completed"] += 1
        self.store.move_inputs_away(job, archive)

    def _quarantine_corrupt(self, directory: Path, detail: str) -> None:
        if not any(directory.iterdir()):
            directory.rmdir()  # a crash between mkdir and the first job.json write: nothing to keep
            return
        target = self.store.failed_folder.rename_in(directory, directory.name)
        message = "The daemon's record of this job was damaged; its files are kept here."
        self.store.failed_folder.write_reason(target, directory.name, "state_corrupt", message, detail, 0)
        log.error("job_rejected", reason="state_corrupt", failed_dir=str(target), detail=detail)

    def _empty_trash(self) -> None:
        for entry in os.scandir(self.store.trash_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

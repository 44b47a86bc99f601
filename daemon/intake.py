"""Intake: find image + sidecar pairs in the inbox, wait until both are complete, claim them, validate the copies.

The inbox is shared with people and scripts we do not control, so every step assumes hostile input:
- a pair is looked at only after both files kept the same (size, mtime, inode) for `stable_seconds`, because
  events arrive before a copy ends and network filesystems send none at all;
- then it is checked *in place* (safe open, hash, full decode, sidecar parse). A result that can mean "still being
  written" (truncated image, sidecar `sha256` not matching yet, half a YAML document, unreadable mode) holds the
  pair for up to `incomplete_grace_seconds` more of unchanged files; any change restarts the wait. That covers
  writers that pause longer than the window and preallocated files (`ftruncate` to the final size, then slow
  writes), whose size looks final long before the content is. A sidecar's optional `sha256:` makes it exact;
- a complete-looking pair is claimed (atomic rename) and validated again on the claimed copies, so nobody can swap
  a file between the check and the use (TOCTOU); the image is decoded from exactly the bytes that were hashed;
- a lone image or sidecar that stays unchanged for `orphan_timeout_seconds` goes to `failed/` (`orphan_timeout`);
- a missing, replaced or unmounted inbox is reported (`IntakeResult.inbox_available`) and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from daemon.checks import Inspection, inspect_data, inspect_inputs
from daemon.checks import decode_isolation as decode_isolation  # re-exported for the worker
from daemon.checks import image_pixel_limit as image_pixel_limit  # re-exported for tests and tools
from daemon.checks import load_image_rgb as load_image_rgb  # re-exported: the worker and CLI load images from here
from daemon.config import DaemonConfig
from daemon.errors import JobRejected
from daemon.jobspec import ResolvedJob, resolve_job
from daemon.pairing import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported for the CLI and tests
from daemon.pairing import SIDECAR_EXTENSIONS as SIDECAR_EXTENSIONS
from daemon.pairing import StabilityTracker as StabilityTracker
from daemon.pairing import ambiguous_groups as ambiguous_groups
from daemon.pairing import find_pairs as find_pairs
from daemon.pairing import is_ignored as is_ignored
from daemon.pairing import signature_of, stem_of
from daemon.safeopen import InputRejected as InputRejected
from daemon.safeopen import read_checked, rejected
from daemon.store import ClaimedJob, JobStore
from daemon.store import Pair as Pair  # re-exported: intake's callers may import Pair from here

log = structlog.get_logger(__name__)

# Reasons that may only mean "the writer is not done yet": hold the pair (files unchanged) before rejecting it.
HOLD_REASONS = frozenset(
    {"image_unreadable", "sha256_mismatch", "sidecar_yaml", "sidecar_encoding", "unreadable", "replaced"}
)


def validate_claimed(
    job: ClaimedJob, config: DaemonConfig, known: Inspection | None = None, guard_dir: Path | None = None
) -> tuple[ResolvedJob, str]:
    """Check a claimed pair and decide every setting; return (resolved job, image sha256) or raise JobRejected.

    A job validated before (recovered after a restart) keeps its seed, so it still makes the same video.
    """
    names = (job.image_name, job.sidecar_name)
    inspection = inspect_inputs(job.image_path, job.sidecar_path, names, config, known, guard_dir)
    seed = job.resolved.seed if job.resolved is not None else None
    try:
        resolved = resolve_job(
            inspection.spec,
            config.generation,
            config.encode,
            stem=job.stem,
            image_size=inspection.image_size,
            seed=seed,
            decode_chunk=config.model.decode_chunk_size,
        )
    except JobRejected as exc:
        message = f"The sidecar {job.sidecar_name} asks for something this daemon cannot do: {exc.message}"
        raise rejected(job.sidecar_name, exc.reason, message, exc.detail) from exc
    return resolved, inspection.image_sha256


# ----- the poll loop ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntakeResult:
    """One poll's outcome.

    `settling` counts complete pairs (and ambiguous groups) whose files are still changing or held as incomplete:
    the caller should look again soon rather than at the rescan period. `waiting` adds files that still lack their
    partner; those wait until `orphan_timeout_seconds`, so `--once` does not wait for them. `inbox_available` is
    False when the inbox could not be listed or is no longer the directory the daemon started on.
    """

    accepted: list[ClaimedJob] = field(default_factory=list)
    rejected: list[tuple[str, JobRejected, Path]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    """Stems skipped as identical to an already published pair (`intake.duplicate_policy: skip`)."""
    waiting: int = 0
    settling: int = 0
    inbox_available: bool = True


class Intake:
    """Turns what is in the inbox into validated claimed jobs; one bad pair never stops the others."""

    def __init__(self, config: DaemonConfig, store: JobStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._store = store
        grace = config.intake.incomplete_grace_seconds  # an empty file waits as long as an incomplete one
        self._tracker = StabilityTracker(config.intake.stable_seconds, clock, empty_grace_seconds=grace)
        self._clock = clock
        self._announced: set[tuple[str, str]] = set()
        self._inspected: dict[str, tuple[tuple[bytes, bytes], float, Inspection | InputRejected | None]] = {}
        self._inbox_device = os.stat(config.inbox).st_dev
        self._inbox_problem: str | None = None

    def poll(self, room: int | None = None) -> IntakeResult:
        """Scan once: claim and validate every pair that is complete; quarantine ambiguous pairs and old orphans.

        `room`: claim at most this many pairs (the queue's free room), so a flood of thousands of pairs waits in
        the inbox, where it is safe, instead of in memory; the rest counts as settling (the caller polls again
        soon, and `--once` does not mistake it for a drained inbox)."""
        try:
            self._check_inbox()
            pairs, unpaired = find_pairs(self._config.inbox)
        except OSError as exc:
            self._report_inbox_problem(f"{exc.strerror or exc}")
            return IntakeResult(inbox_available=False)
        if self._inbox_problem is not None:
            log.info("inbox_available", inbox=str(self._config.inbox))
            self._inbox_problem = None
        result = IntakeResult()  # filled in place by the helpers; `waiting` is set at the end
        settling = 0
        for pair in pairs:
            if room is not None and len(result.accepted) >= room:
                settling += 1  # deferred: claimed by a later poll once the queue has room
                continue
            try:
                settling += self._handle_pair(pair, result)
            except Exception:
                log.exception("intake_pair_failed", stem=_printable(pair.stem))
        orphans, unsettled_groups = self._handle_unpaired(unpaired, result)
        settling += unsettled_groups
        self._tracker.retain([p for pair in pairs for p in (pair.image, pair.sidecar)] + unpaired)
        stems = {pair.stem for pair in pairs}
        self._announced = {(stem, event) for stem, event in self._announced if stem in stems}
        self._inspected = {stem: value for stem, value in self._inspected.items() if stem in stems}
        return replace(result, waiting=settling + orphans, settling=settling)

    # ----- the inbox itself ------------------------------------------------------------------------------------
    def _check_inbox(self) -> None:
        """Raise OSError unless the inbox is the directory we started on; recreate the store's folders if gone.

        A different device means the share was unmounted and we would be looking at (and writing into) the empty
        mount point underneath. A deleted and recreated inbox is fine: the store's folders are made again.
        """
        info = os.stat(self._config.inbox)
        if info.st_dev != self._inbox_device:
            raise OSError(0, "the inbox is on another filesystem than at start (unmounted?)")
        missing = self._store.ensure_folders()  # a file or a link in a folder's place is moved aside first
        if missing:
            log.warning("inbox_state_recreated", folders=[str(d) for d in missing])

    def _report_inbox_problem(self, problem: str) -> None:
        if problem != self._inbox_problem:
            log.error("inbox_unavailable", inbox=str(self._config.inbox), error=problem)
        self._inbox_problem = problem

    # ----- pairs -----------------------------------------------------------------------------------------------
    def _is_stable(self, path: Path) -> bool:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self._tracker.forget(path)
            return False
        return self._tracker.observe(path, info)

    def _announce(self, stem: str, event: str, **fields: Any) -> None:
        """Log `event` once per pair and state, not on every poll."""
        if (stem, event) not in self._announced:
            self._announced.add((stem, event))
            log.info(event, stem=_printable(stem), **fields)

    def _handle_pair(self, pair: Pair, result: IntakeResult) -> int:
        """Claim and validate the pair once both files are stable and look complete; 1 if it is still settling."""
        image_stable, sidecar_stable = self._is_stable(pair.image), self._is_stable(pair.sidecar)
        if not (image_stable and sidecar_stable):
            self._announce(pair.stem, "pair_waiting")
            return 1
        inspection = self._inspect_in_place(pair)
        if isinstance(inspection, InputRejected) and self._hold(pair, inspection):
            return 1
        self._announced -= {(pair.stem, "pair_waiting"), (pair.stem, "pair_incomplete")}
        self._inspected.pop(pair.stem, None)
        for path in (pair.image, pair.sidecar):
            self._tracker.forget(path)
        if not _is_text(pair.image.name, pair.sidecar.name):
            message = "The file name is not valid UTF-8 text. Rename the files and drop them in again."
            self._quarantine(pair.stem, pair, "bad_filename", message, None, result)
            return 0
        try:
            job = self._store.claim(pair)
        except FileNotFoundError:
            log.info("pair_vanished", stem=_printable(pair.stem))
            return 0
        log.info("job_claimed", job_id=job.job_id, stem=job.stem, image=job.image_name, sidecar=job.sidecar_name)
        if isinstance(inspection, InputRejected) and inspection.reason == "decode_crashed":
            # Final, and not to be tried again on the claimed copy: that decode is what killed the last process.
            self._reject(job, inspection, result)
            return 0
        self._admit(job, result, inspection if isinstance(inspection, Inspection) else None)
        return 0

    def _inspect_in_place(self, pair: Pair) -> Inspection | InputRejected | None:
        """Check the pair where it lies. The result is kept per content (not per stat signature, which stale NFS
        attributes or a preallocated file can freeze), so a held pair is re-read but not re-decoded while its
        bytes stay the same. None: the check itself crashed (the claimed copy is validated again anyway)."""
        try:
            image_data, sidecar_data = self._read_unchanged(pair)
        except InputRejected as exc:
            self._inspected.pop(pair.stem, None)
            return exc
        names = (pair.image.name, pair.sidecar.name)
        content = (hashlib.sha256(image_data).digest(), hashlib.sha256(sidecar_data).digest())
        cached = self._inspected.get(pair.stem)
        if cached is not None and cached[0] == content:
            return cached[2]
        outcome: Inspection | InputRejected | None
        try:
            outcome = inspect_data(image_data, sidecar_data, names, self._config, None, self._store.decoding_dir)
        except InputRejected as exc:
            outcome = exc
        except Exception:
            log.exception("inspection_crashed", stem=_printable(pair.stem))
            outcome = None
        self._inspected[pair.stem] = (content, self._clock(), outcome)
        return outcome

    def _read_unchanged(self, pair: Pair) -> tuple[bytes, bytes]:
        """Both files' bytes, provided each still has the signature that was found stable (a file swapped or
        written to between that `lstat` and the end of the read is `replaced`, which holds the pair)."""
        limits = self._config.intake
        data: list[bytes] = []
        for path, limit in ((pair.sidecar, limits.max_sidecar_bytes), (pair.image, limits.max_image_bytes)):
            content, info = read_checked(path, limit, path.name)
            if signature_of(info) != self._tracker.signature(path):
                self._tracker.observe(path, info)  # the window starts again on the fresh attributes
                raise rejected(path.name, "replaced", f"{path.name} changed while it was being checked.")
            data.append(content)
        return data[1], data[0]

    def _hold(self, pair: Pair, problem: InputRejected) -> bool:
        """True while a problem that may mean "not written yet" gets its grace period of unchanged files.

        Unchanged means: the same (size, mtime, inode) for window + grace, *and* the same bytes for the grace period
        (the first in-place check happens once the window has passed).
        """
        if problem.reason not in HOLD_REASONS:
            return False
        settings = self._config.intake
        cached = self._inspected.get(pair.stem)
        same_content = self._clock() - cached[1] if cached is not None else float("inf")
        unchanged = min(self._tracker.unchanged_for(pair.image), self._tracker.unchanged_for(pair.sidecar))
        grace = settings.incomplete_grace_seconds
        if unchanged >= settings.stable_seconds + grace and same_content >= grace:
            return False
        self._announce(pair.stem, "pair_incomplete", reason=problem.reason, input=_printable(problem.input_name))
        return True

    def _admit(self, job: ClaimedJob, result: IntakeResult, known: Inspection | None) -> None:
        """Validate a claimed job into `result.accepted`, or quarantine it into `result.rejected`."""
        try:
            resolved, image_sha256 = validate_claimed(job, self._config, known, self._store.decoding_dir)
        except JobRejected as exc:
            rejection = exc
        except Exception as exc:
            log.exception("validation_crashed", job_id=job.job_id)
            message = (
                f"The daemon hit an internal error while checking {job.image_name} and {job.sidecar_name} (not a "
                "problem with the files as far as we know). They are kept here: drop them in again to retry."
            )
            rejection = JobRejected(message, reason="validation_error", detail=repr(exc))
        else:
            validated = self._store.mark_validated(job, resolved, image_sha256)
            # Completed-input ledger (checklist C24/C25): an identical pair already published is skipped or
            # processed again under a new name, per `intake.duplicate_policy`.
            if self._store.settle_duplicate(validated, self._config.intake.duplicate_policy) is not None:
                result.duplicates.append(validated.stem)
            else:
                result.accepted.append(validated)
            return
        self._reject(job, rejection, result)

    def _reject(self, job: ClaimedJob, rejection: JobRejected, result: IntakeResult) -> None:
        failed_dir = self._store.fail(job, rejection)
        log.warning(
            "job_rejected", job_id=job.job_id, stem=job.stem, reason=rejection.reason, failed_dir=str(failed_dir)
        )
        result.rejected.append((job.stem, rejection, failed_dir))

    # ----- unpaired files --------------------------------------------------------------------------------------
    def _handle_unpaired(self, unpaired: list[Path], result: IntakeResult) -> tuple[int, int]:
        """Quarantine stable ambiguous groups and timed-out orphans; the rest waits for a partner.

        Returns (files waiting for a partner, ambiguous groups still settling).
        """
        groups = ambiguous_groups(unpaired)
        orphans = [path for path in unpaired if stem_of(path.name) not in groups]
        settling = 0
        for stem, paths in groups.items():
            if not all([self._is_stable(path) for path in paths]):
                settling += 1
                continue
            names = [path.name for path in paths]
            message = (
                f"Several files are named '{stem}' ({', '.join(names)}), so it is not clear which image "
                "goes with which sidecar. Give each pair its own name and drop them in again."
            )
            try:
                self._quarantine(stem, paths, "ambiguous_pair", message, names, result)
            except Exception:
                log.exception("intake_pair_failed", stem=_printable(stem))
        expired = self._expired_orphans(orphans)
        for path in expired:
            message = (
                f"{path.name} waited {self._config.intake.orphan_timeout_seconds:.0f} s for its "
                f"{'sidecar' if path.suffix.lower() in IMAGE_EXTENSIONS else 'image'}, which never came. Drop the "
                "pair in again (image first, sidecar last)."
            )
            try:
                self._quarantine(stem_of(path.name), [path], "orphan_timeout", message, path.name, result)
            except Exception:
                log.exception("intake_pair_failed", stem=_printable(path.name))
        return len(orphans) - len(expired), settling

    def _expired_orphans(self, orphans: list[Path]) -> list[Path]:
        timeout = self._config.intake.orphan_timeout_seconds
        if timeout is None:
            return []
        expired = []
        for path in orphans:
            if self._is_stable(path) and self._tracker.unchanged_for(path) >= timeout:
                expired.append(path)
                self._tracker.forget(path)
        return expired

    def _quarantine(
        self, stem: str, files: Pair | list[Path], reason: str, message: str, detail: Any, result: IntakeResult
    ) -> None:
        try:
            failed_dir = self._store.quarantine(files, reason, message, detail)
        except FileNotFoundError:
            return  # gone already: nothing to keep
        log.warning("job_rejected", stem=_printable(stem), reason=reason, failed_dir=_printable(str(failed_dir)))
        result.rejected.append((stem, JobRejected(message, reason=reason, detail=detail), failed_dir))


def _printable(text: str) -> str:
    """Names that are not UTF-8 (surrogate escapes) would crash a UTF-8 log line: show them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_text(*names: str) -> bool:
    return all(_printable(name) == name for name in names)

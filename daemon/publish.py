"""Atomic publication into the outbox, Maildir-style.

Outputs are written in a staging directory inside the outbox (`outbox/.i2vd-staging/<job_id>/`): the same
filesystem, so moving a finished file into place is an atomic rename, and hidden, so tools watching the outbox
ignore it. Publishing then follows Maildir's delivery rules: fsync each file, give it its final name with a
no-clobber rename (`rename_no_replace`: fails instead of replacing a file that is already there, so nothing is
ever overwritten), fsync the outbox directory, and only then deliver the manifest the same way. A reader never
sees a partial file, and a manifest's presence means every output it lists is complete and durable.

Failures (reliability-anchors.md §7 D27-D32): a full disk raises `StorageFull` (the job waits, no attempt used);
an fsync error discards the staged file and raises `OutputLost` (the job writes it again from scratch; fsync is
never retried on the same file); any error moves what was already delivered back to staging, so the outbox never
holds a partial set.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

import structlog

from daemon.errors import OutputLost, StorageFull, TransientJobError
from daemon.fsio import check_single_name, fsync_dir, is_storage_full, rename_no_replace, write_durable_temp

STAGING_DIR_NAME = ".i2vd-staging"
STAGING_LOCK_NAME = ".in-use.lock"
"""In the staging folder: every daemon publishing into this outbox holds a shared lock on it (`share_staging`)."""
MANIFEST_SUFFIX = ".json"
_COUNTER_SUFFIX = re.compile(r"^(.*)-(\d+)$")

ManifestSource = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]

log = structlog.get_logger(__name__)


def sha256_file(path: Path) -> str:
    """The file's SHA-256 as hex, read in 1 MiB chunks so large videos never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def next_base_name(base: str) -> str:
    """The name to try after `base` clashed: `x` -> `x-2`, `x-2` -> `x-3`."""
    match = _COUNTER_SUFFIX.match(base)
    if match and int(match.group(2)) >= 2:
        return f"{match.group(1)}-{int(match.group(2)) + 1}"
    return f"{base}-2"


class Publisher:
    """Delivers a job's outputs and manifest into the outbox, atomically and without ever overwriting."""

    def __init__(
        self,
        outbox: Path,
        now: Callable[[], datetime] = lambda: datetime.now().astimezone(),
        *,
        daily_subfolders: bool = False,
    ) -> None:
        self.outbox = outbox
        self.now = now
        self.daily_subfolders = daily_subfolders
        self.staging_root = outbox / STAGING_DIR_NAME

    def staging_dir(self, job_id: str) -> Path:
        """`outbox/.i2vd-staging/<job_id>/`, created if needed (existing content is kept)."""
        check_single_name(job_id, "job id")
        directory = self.staging_root / job_id
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def share_staging(self) -> tuple[int, int | None]:
        """Use the outbox's staging area for as long as the returned descriptor stays open, and sweep what
        earlier runs left there if no other daemon uses this outbox now; returns (descriptor, entries swept, or
        None when another daemon uses the outbox: its staged files are not ours to remove, so the sweep waits
        for a start that has the outbox alone).

        Every daemon holds a shared `flock` on `STAGING_LOCK_NAME` while it runs; the sweep needs it exclusive."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.staging_root / STAGING_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return fd, None
        swept = self.sweep_staging()
        fcntl.flock(fd, fcntl.LOCK_SH)  # converted in place: from now on others may share it, not sweep
        return fd, swept

    def sweep_staging(self) -> int:
        """Remove every staging directory and temp manifest a previous run left; return how many entries.

        Call once at start, before any job runs (a crash leaves half-written outputs there; they are never
        published, and a recovered job writes its outputs again from scratch), and only while no other daemon
        uses the outbox (`share_staging` decides).
        """
        try:
            entries = [entry for entry in os.scandir(self.staging_root) if entry.name != STAGING_LOCK_NAME]
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        with contextlib.suppress(OSError):
            fsync_dir(self.staging_root)
        return len(entries)

    def discard_staging(self, job_id: str) -> None:
        """Remove the job's staging directory and whatever a failed attempt left in it."""
        check_single_name(job_id, "job id")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.staging_root / job_id)

    @staticmethod
    def _taken(directory: Path, base: str) -> bool:
        """Whether any entry of `directory` already uses `base` (`base` itself or `base.<anything>`)."""
        try:
            with os.scandir(directory) as entries:
                return any(entry.name == base or entry.name.startswith(base + ".") for entry in entries)
        except FileNotFoundError:
            return False

    def _first_free(self, directory: Path, base: str) -> str:
        while self._taken(directory, base):
            base = next_base_name(base)
        return base

    def reserve(self, output_name: str) -> tuple[Path, str]:
        """The directory (the outbox, or `outbox/YYYY-MM-DD/` with `daily_subfolders`) and the base name
        `video_YYYYMMDD_HHMMSS_<output_name>` from one reading of the injected clock, with `-2`, `-3`...
        appended when published files already use that base. Only a check: `publish` checks again and moves on
        if it lost a race. Names sort by time because the timestamp leads."""
        check_single_name(output_name, "output name")
        now = self.now()
        directory = self.outbox / f"{now:%Y-%m-%d}" if self.daily_subfolders else self.outbox
        return directory, self._first_free(directory, f"video_{now:%Y%m%d_%H%M%S}_{output_name}")

    def publish(
        self,
        base: str,
        files: Sequence[tuple[Path, str]],
        manifest: ManifestSource,
        directory: Path | None = None,
    ) -> list[Path]:
        """Move staged `files` ((path, suffix such as ".mp4" or ".vertical.mp4")) into the outbox as
        `<base><suffix>`, then the manifest as `<base>.json`; return the published paths, manifest last.
        `directory` (default: the outbox) is created if needed; it must be inside the outbox (same filesystem).

        If a name was taken meanwhile (another worker, same second, same name), the whole set moves to the
        next base (`-2`, `-3`...); pass `manifest` as a callable taking the final base when it records output
        names.
        On an OS error the files already moved are moved back into staging, so the outbox holds no partial set,
        and `TransientJobError` is raised (`StorageFull` for a full disk or quota); the staged files stay for a
        retry or discard. An fsync error on a staged file discards that file and raises `OutputLost`.
        """
        check_single_name(base, "base name")
        suffixes = [suffix for _, suffix in files]
        if len(set(suffixes)) != len(suffixes) or MANIFEST_SUFFIX in suffixes:
            raise ValueError(f"suffixes must be distinct and not {MANIFEST_SUFFIX!r}: {suffixes}")
        directory = directory if directory is not None else self.outbox
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                fsync_dir(directory.parent)
            digests = [_durable_digest(staged) for staged, _ in files]
            while True:
                base = self._first_free(directory, base)
                published = self._deliver(directory, base, files, digests, manifest)
                if published is not None:
                    break
                base = next_base_name(base)
        except OSError as exc:
            raise _publish_error(base, exc) from exc
        for directory in {staged.parent for staged, _ in files}:
            with contextlib.suppress(OSError):  # not empty, or not ours: leave it
                directory.rmdir()
        return published

    def _deliver(
        self,
        directory: Path,
        base: str,
        files: Sequence[tuple[Path, str]],
        digests: Sequence[str],
        manifest: ManifestSource,
    ) -> list[Path] | None:
        """Rename every file, then the manifest, under `base`; None (and everything moved back) on a clash.

        A callable `manifest` is asked for its content before the first rename: the job's state notes the names
        there, so a crash at any later point leaves a record of what to take back (or to finish)."""
        moved: list[tuple[Path, Path]] = []
        try:
            content = manifest(base) if callable(manifest) else manifest
            for (staged, suffix), digest in zip(files, digests, strict=True):
                target = directory / f"{base}{suffix}"
                if not rename_no_replace(staged, target, digest):
                    self._move_back(moved)
                    return None
                moved.append((staged, target))
            fsync_dir(directory)
            manifest_path = self._deliver_manifest(directory, base, content)
        except BaseException:
            self._move_back(moved)
            raise
        if manifest_path is None:
            self._move_back(moved)
            return None
        return [target for _, target in moved] + [manifest_path]

    def _deliver_manifest(self, directory: Path, base: str, content: Mapping[str, Any]) -> Path | None:
        data = json.dumps(content, indent=2, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"
        self.staging_root.mkdir(parents=True, exist_ok=True)
        temp = write_durable_temp(self.staging_root / f"manifest-{uuid.uuid4().hex}", data)
        try:
            target = directory / f"{base}{MANIFEST_SUFFIX}"
            if not rename_no_replace(temp, target, hashlib.sha256(data).hexdigest()):
                return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        try:
            fsync_dir(directory)
        except OSError as exc:
            # The manifest has its name, so the set is complete for readers, and the outputs' names were made
            # durable before it. Moving the outputs back now would leave a manifest without its files.
            log.warning("manifest_dir_fsync_failed", manifest=target.name, error=str(exc))
        return target

    def _move_back(self, moved: list[tuple[Path, Path]]) -> None:
        """Undo a partial delivery: rename the published names back to their staged names. One that cannot go
        back is removed instead (it is ours, and the retry writes it again), so no part of a set stays visible
        without its manifest."""
        for staged, target in reversed(moved):
            try:
                os.rename(target, staged)
            except OSError as exc:
                log.warning("publish_move_back_failed", output=target.name, error=str(exc))
                with contextlib.suppress(OSError):
                    target.unlink()
        directories = {target.parent for _, target in moved}
        moved.clear()
        for directory in directories:
            with contextlib.suppress(OSError):
                fsync_dir(directory)


def _durable_digest(staged: Path) -> str:
    """fsync a staged output, then hash it (for the NFS rename reconciliation).

    On an fsync error the file is discarded at once: its pages may already have been dropped, so it is written
    again from scratch by the next attempt, never "fsynced again until it works" (fsyncgate).
    """
    fd = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.EIO:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            raise OutputLost(
                f"{staged.name} could not be made durable (fsync: {exc.strerror}); discarded to be written again",
                detail={"file": staged.name, "errno": exc.errno},
            ) from exc
        raise
    finally:
        os.close(fd)
    return sha256_file(staged)


def _publish_error(base: str, exc: OSError) -> TransientJobError:
    detail = {"base": base, "errno": exc.errno}
    if is_storage_full(exc):
        return StorageFull(f"cannot publish {base}: {exc.strerror or exc}", detail=detail)
    return TransientJobError(f"cannot publish {base}: {exc.strerror or exc}", detail=detail)

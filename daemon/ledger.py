"""The completed-input ledger: which input pairs (by content) were already turned into published outputs.

HandBrake's watch folder keeps such a ledger so a file is never converted twice, and docker-handbrake#391 shows why
it matters: when the source cannot be deleted after success, a watcher without one re-processes it forever.
Here every published job appends one JSON line `{key, job_id, stem, image_sha256, sidecar_sha256, outputs,
manifest, at}` to `STATE_DIR/ledger.jsonl` (fsynced) *before* its inputs are moved away, so:

- a re-dropped identical pair (same image bytes, same sidecar bytes) is recognised (`lookup`), and the duplicate
  policy decides (`intake.duplicate_policy`: `process` again under a new name, or `skip` with a pointer);
- a job found claimed at start whose id is already in the ledger was published: it is archived, not re-run;
- inputs that cannot be moved (read-only share) are never processed again.

Bounded: memory holds only `key -> (job_id, manifest)` for the newest `max_entries` keys and the newest
`max_entries` job ids, and the file is compacted (rewritten atomically with only the lines of those job ids) when it
grows past twice that. A torn last line (crash mid append) is skipped on load, and the next append starts on a new
line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.fsio import atomic_write_bytes, fsync_dir

log = structlog.get_logger(__name__)

LEDGER_FILE = "ledger.jsonl"
DEFAULT_MAX_ENTRIES = 50_000


def input_key(image_sha256: str, sidecar_sha256: str) -> str:
    """The ledger key of a pair: both contents matter (the same image with another prompt is another job)."""
    return hashlib.sha256(f"{image_sha256}:{sidecar_sha256}".encode("ascii")).hexdigest()


class LedgerEntry(BaseModel):
    """One published job, as appended to the ledger."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    job_id: str
    stem: str
    image_sha256: str
    sidecar_sha256: str
    outputs: list[str]
    manifest: str | None
    at: datetime


class CompletedLedger:
    """Append-only, fsynced, compacted record of published inputs. Thread-safe."""

    def __init__(self, path: Path, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._job_ids: OrderedDict[str, str] = OrderedDict()  # the newest `max_entries` job ids -> key
        self._lines = 0
        self._load()

    def __len__(self) -> int:
        return len(self._by_key)

    def _load(self) -> None:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for raw in handle:
                self._lines += 1
                try:
                    entry = LedgerEntry.model_validate_json(raw)
                except ValidationError:
                    log.warning("ledger_line_skipped", path=str(self.path), line=self._lines)
                    continue
                self._remember(entry)

    def _remember(self, entry: LedgerEntry) -> None:
        """Note `entry` as the newest for its key. The job ids are kept apart from the keys: a second job of the
        same inputs (`duplicate_policy: process`) must not make the first look unpublished, or a first job whose
        inputs could not be moved away would run again at the next start."""
        self._by_key.pop(entry.key, None)
        self._by_key[entry.key] = (entry.job_id, entry.manifest)
        self._job_ids.pop(entry.job_id, None)
        self._job_ids[entry.job_id] = entry.key
        while len(self._by_key) > self.max_entries:
            self._by_key.popitem(last=False)
        while len(self._job_ids) > self.max_entries:
            self._job_ids.popitem(last=False)

    def lookup(self, key: str) -> LedgerEntry | None:
        """The newest entry for `key`, read back from the file (memory holds only its job id)."""
        with self._lock:
            known = self._by_key.get(key)
        return None if known is None else self._read(known[0])

    def has_job(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._job_ids

    def _read(self, job_id: str) -> LedgerEntry | None:
        found = None
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as handle:
            for raw in handle:
                if job_id.encode("ascii", "replace") in raw:
                    with contextlib.suppress(ValidationError):
                        entry = LedgerEntry.model_validate_json(raw)
                        found = entry if entry.job_id == job_id else found
        return found

    def record(self, entry: LedgerEntry) -> None:
        """Append `entry` durably (write, fsync; the directory too when the file is new); compact when due."""
        line = json.dumps(entry.model_dump(mode="json"), ensure_ascii=True).encode("ascii") + b"\n"
        with self._lock:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # after a torn line (a crash or a short write mid-append): never glued to it
                view = memoryview(line)
                while view:  # a short write (nearly full disk) is continued, never left as half a line
                    written = os.write(fd, view)
                    if written <= 0:
                        raise OSError(errno.ENOSPC, "the ledger append wrote nothing", str(self.path))
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
            self._lines += 1
            self._remember(entry)
            if self._lines > 2 * self.max_entries:
                self._compact()

    def _compact(self) -> None:
        """Rewrite the file with only the entries still remembered (atomic: old or new file after a crash)."""
        kept: list[bytes] = []
        with self.path.open("rb") as handle:
            for raw in handle:
                try:
                    data: dict[str, Any] = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("job_id") in self._job_ids:
                    kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
        atomic_write_bytes(self.path, b"".join(kept))
        self._lines = len(kept)
        log.info("ledger_compacted", entries=len(kept))

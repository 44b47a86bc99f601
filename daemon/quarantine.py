"""`inbox/failed/`: fresh `NAME[-N]` folders, whole-directory moves into them, and their `reason.json`.

A folder name is taken with `mkdir` (atomic, fails if it exists), so two threads never share one; a job directory
then replaces the empty placeholder with one `rename(2)`, so a crash leaves it either in the store or in failed/.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.fsio import atomic_write_bytes, fsync_dir
from daemon.jobstate import AttemptRecord, history_json

REASON_FILE = "reason.json"


NAME_MAX_BYTES = 255
"""A file name's limit on Linux file systems, in bytes of its UTF-8."""


def fit_name(name: str, limit: int) -> str:
    """`name` cut to at most `limit` bytes of UTF-8, never inside a character. A stem can be longer than the file
    name it came from: pairing normalises it to NFC, and some characters grow there (U+1D160: 4 bytes to 12)."""
    raw = os.fsencode(name)  # a name that is not UTF-8 keeps its bytes (surrogate escapes)
    if len(raw) <= limit:
        return name
    cut = raw[:limit]
    for trailing in range(4):  # a UTF-8 character is at most 4 bytes: drop a cut one's first bytes
        try:
            return cut[: len(cut) - trailing].decode("utf-8") or "input"
        except UnicodeDecodeError:
            continue
    return os.fsdecode(cut)


def move_into(path: Path, target: Path) -> bool:
    """Rename `path` into the directory `target` (links not followed); False if it vanished meanwhile."""
    try:
        os.rename(path, target / path.name)
    except FileNotFoundError:
        return False
    return True


class FailedFolder:
    """The quarantine folder; thread-safe."""

    def __init__(self, failed_dir: Path, now: Callable[[], datetime]) -> None:
        self.failed_dir = failed_dir
        self._now = now
        self._lock = threading.Lock()

    def make_dir(self, name: str) -> Path:
        """Create and return a fresh `failed/NAME`, or `NAME-2`, `NAME-3`... when taken (NAME cut to fit)."""
        with self._lock:
            counter = 1
            while True:
                suffix = "" if counter == 1 else f"-{counter}"
                candidate = self.failed_dir / (fit_name(name, NAME_MAX_BYTES - len(suffix)) + suffix)
                try:
                    candidate.mkdir()
                except FileExistsError:
                    counter += 1
                    continue
                fsync_dir(self.failed_dir)
                return candidate

    def rename_in(self, directory: Path, name: str) -> Path:
        """Move a whole directory to a fresh `failed/NAME[-N]` in one rename (rename(2) never merges dirs)."""
        target = self.make_dir(name)
        try:
            os.rename(directory, target)  # replaces the empty placeholder atomically
        except OSError:
            target.rmdir()
            raise
        fsync_dir(self.failed_dir)
        return target

    def write_reason(
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

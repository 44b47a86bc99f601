"""Operator control through files in the state directory: pause/resume, cancel, and retry of a failed pair.

Files, not a socket: the CLI works whether or not the daemon runs, needs no port or credentials beyond write
access to the state directory, and a pause survives a restart (the daemon reads the flag at start). The daemon's
main loop polls these files every supervision round (0.5 s), so a command takes effect within a second.

- `STATE/paused`: present while paused. The worker finishes its current job, then takes no new one.
- `STATE/control/cancel-<random>.json`: `{"name": NAME}`; the daemon applies it to the pending or running job
  whose inbox name (stem) is NAME, then deletes the request.
- `i2vd retry NAME` needs no daemon at all: it moves `inbox/failed/NAME/`'s pair back into the inbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from daemon.fsio import atomic_write_bytes, fsync_dir, link_no_clobber

PAUSE_FILE = "paused"
CONTROL_DIR = "control"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES = (".yaml", ".yml")


class ControlError(Exception):
    """A control command that cannot be carried out; the message says why, for the operator."""


# ----- pause -------------------------------------------------------------------------------------------------------
def pause(state_dir: Path) -> bool:
    """Create the pause flag; False if it was already there."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / PAUSE_FILE
    existed = path.exists()
    atomic_write_bytes(path, json.dumps({"paused_at": datetime.now(UTC).isoformat()}).encode() + b"\n")
    return not existed


def resume(state_dir: Path) -> bool:
    """Remove the pause flag; False if the queue was not paused."""
    try:
        (state_dir / PAUSE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def is_paused(state_dir: Path) -> bool:
    return (state_dir / PAUSE_FILE).exists()


# ----- cancel ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CancelRequest:
    name: str
    path: Path
    age_seconds: float


def request_cancel(state_dir: Path, name: str) -> Path:
    """Leave a cancel request for the daemon (a random file name: NAME may hold any character)."""
    directory = state_dir / CONTROL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"cancel-{secrets.token_hex(6)}.json"
    atomic_write_bytes(path, json.dumps({"name": name}, ensure_ascii=True).encode() + b"\n")
    return path


def pending_cancels(state_dir: Path) -> list[CancelRequest]:
    """Cancel requests waiting in the state directory; unreadable ones are dropped (they can never apply)."""
    directory = state_dir / CONTROL_DIR
    if not directory.is_dir():
        return []
    requests = []
    for path in sorted(directory.glob("cancel-*.json")):
        try:
            name = json.loads(path.read_text(encoding="utf-8"))["name"]
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if isinstance(name, str):
            requests.append(CancelRequest(name, path, age))
    return requests


def claimed_names(state_dir: Path) -> set[str]:
    """Stems of the jobs claimed on disk (pending, running or waiting for a retry), read from each `job.json`."""
    names = set()
    jobs = state_dir / "jobs"
    for job_file in jobs.glob("*/job.json") if jobs.is_dir() else []:
        try:
            names.add(str(json.loads(job_file.read_text(encoding="utf-8"))["stem"]))
        except (OSError, ValueError, KeyError):
            continue
    return names


# ----- retry -------------------------------------------------------------------------------------------------------
def _pair_in(directory: Path) -> tuple[Path, Path]:
    files = [entry for entry in directory.iterdir() if entry.is_file() and not entry.is_symlink()]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    sidecars = [f for f in files if f.suffix.lower() in SIDECAR_SUFFIXES]
    if len(images) != 1 or len(sidecars) != 1:
        raise ControlError(f"{directory} does not hold exactly one image and one sidecar; move the files by hand")
    return images[0], sidecars[0]


def retry_failed(inbox: Path, name: str) -> tuple[Path, Path]:
    """Move `inbox/failed/NAME/`'s image, then its sidecar, back into the inbox under their original names.

    Each move is a no-clobber rename (link + unlink): a file of the same name in the inbox is never replaced,
    and the command stops before moving anything if one exists. The sidecar goes last, so the daemon never
    pairs a half-moved job. The emptied failed directory (and its reason.json) is removed.
    """
    failed = inbox / "failed" / name
    if os.sep in name or name in ("", ".", "..") or not failed.is_dir() or failed.is_symlink():
        raise ControlError(f"no failed job named {name!r} in {inbox / 'failed'}")
    image, sidecar = _pair_in(failed)
    targets = [(image, inbox / image.name), (sidecar, inbox / sidecar.name)]
    clashes = [str(target) for _, target in targets if target.exists() or target.is_symlink()]
    if clashes:
        raise ControlError(f"will not overwrite {', '.join(clashes)}; rename or remove it first")
    moved: list[tuple[Path, Path]] = []
    for source, target in targets:
        if not link_no_clobber(source, target):
            for back_source, back_target in reversed(moved):
                link_no_clobber(back_target, back_source)
            raise ControlError(f"{target} appeared while retrying; nothing was moved")
        moved.append((source, target))
    fsync_dir(inbox)
    (failed / "reason.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other files were left beside the pair: keep them where they are
        failed.rmdir()
    return targets[0][1], targets[1][1]

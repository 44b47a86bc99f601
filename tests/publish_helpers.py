"""Helpers shared by the publication tests (unit and reliability): staged files and what a reader of the outbox
sees."""

from __future__ import annotations

from pathlib import Path

from daemon.publish import STAGING_DIR_NAME, Publisher


def stage_files(publisher: Publisher, contents: dict[str, bytes], job_id: str = "job1") -> list[tuple[Path, str]]:
    """Write staged files, one per final suffix (".mp4", ".vertical.mp4"...)."""
    directory = publisher.staging_dir(job_id)
    files = []
    for suffix, data in contents.items():
        path = directory / f"out{suffix}"
        path.write_bytes(data)
        files.append((path, suffix))
    return files


def outbox_names(outbox: Path) -> list[str]:
    """The outbox as a reader sees it (the staging folder is the daemon's own)."""
    return sorted(entry.name for entry in outbox.iterdir() if entry.name != STAGING_DIR_NAME)


KILL_AT_CALL = """\
calls = [0]
def step(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped
"""
"""For the kill -9 tests' child scripts (which define `kill_at`): `step(f)` wraps a call so that the process
kills itself with SIGKILL just before the `kill_at`-th wrapped call of the script (0: never); `calls[0]` counts
them."""

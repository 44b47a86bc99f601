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

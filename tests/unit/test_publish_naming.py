"""Output naming: sortable by time, collision-safe, optional per-day subfolders (injected clock)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from daemon.publish import STAGING_DIR_NAME, Publisher


def test_names_sort_by_time_and_clash_per_directory(tmp_path: Path) -> None:
    times = iter([datetime(2026, 11, 25, 23, 59, 59), datetime(2026, 11, 26, 0, 0, 1), datetime(2026, 11, 26, 0, 0, 1)])
    publisher = Publisher(tmp_path, now=lambda: next(times), daily_subfolders=True)
    published = []
    for job in ("a", "b", "c"):
        staged = publisher.staging_dir(job) / "main.mp4"
        staged.write_bytes(job.encode())
        directory, base = publisher.reserve("cat")
        published += publisher.publish(base, [(staged, ".mp4")], {"job": job}, directory)
    relative = [str(path.relative_to(tmp_path)) for path in published]
    assert relative == [
        "2026-11-25/video_20261125_235959_cat.mp4",
        "2026-11-25/video_20261125_235959_cat.json",
        "2026-11-26/video_20261126_000001_cat.mp4",
        "2026-11-26/video_20261126_000001_cat.json",
        "2026-11-26/video_20261126_000001_cat-2.mp4",
        "2026-11-26/video_20261126_000001_cat-2.json",
    ]
    assert sorted(relative) == sorted(relative, key=lambda name: name.split("/")[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["2026-11-25", "2026-11-26", STAGING_DIR_NAME])


def test_without_subfolders_the_outbox_itself(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path, now=lambda: datetime(2026, 1, 2, 3, 4, 5))
    assert publisher.reserve("x") == (tmp_path, "video_20260102_030405_x")

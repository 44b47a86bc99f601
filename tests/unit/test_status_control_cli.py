"""`i2vd status` rendering and the control commands' exit codes, without a daemon."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.status import format_status


def _report(**daemon: object) -> dict[str, object]:
    return {"daemon": daemon, "paused": False, "claimed": [], "recent_done": [], "recent_failed": []}


def test_human_status_shows_progress_throughput_memory_and_escapes_names() -> None:
    started = (datetime.now().astimezone() - timedelta(hours=2)).isoformat()
    text = format_status(
        _report(
            alive=True,
            pid=os.getpid(),
            model="stub",
            device="cuda:0",
            started_at=started,
            running={"job_id": "j1", "name": "evil\nname", "step": 12, "steps": 50},
            queue=["a", "b"],
            outcomes={"succeeded": 4, "failed": 1},
            video_seconds_generated=8.0,
            gpu_memory_bytes={"allocated": 2**30, "reserved": 2 * 2**30, "total": 80 * 2**30, "free": 70 * 2**30},
            job_peak_gpu_memory_bytes=7 * 2**30,
        )
    )
    assert "running job: evil\\nname (j1) step 12/50" in text
    assert "queued: 2  a b" in text
    assert "succeeded=4, failed=1" in text
    assert "2.0 videos/h" in text
    assert "free 70.00/80.00 GiB" in text and "last job peak 7.00 GiB" in text


def test_pause_resume_cancel_retry_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    assert main(["pause", "--config", _config(tmp_path)]) == 0
    assert (inbox / ".i2vd" / "paused").exists()
    assert main(["status", "--json", "--config", _config(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["paused"] is True
    assert main(["resume", "--config", _config(tmp_path)]) == 0
    assert not (inbox / ".i2vd" / "paused").exists()
    assert main(["cancel", "ghost", "--config", _config(tmp_path)]) == 1
    assert main(["retry", "ghost", "--config", _config(tmp_path)]) == 1
    failed = inbox / "failed" / "cat"
    failed.mkdir(parents=True)
    (failed / "cat.png").write_bytes(b"x")
    (failed / "cat.yaml").write_text("prompt: x\n")
    assert main(["retry", "cat", "--config", _config(tmp_path)]) == 0
    assert (inbox / "cat.png").exists() and (inbox / "cat.yaml").exists()


def _config(tmp_path: Path) -> str:
    path = tmp_path / "daemon.yaml"
    path.write_text(f"inbox: {tmp_path / 'inbox'}\noutbox: {tmp_path / 'outbox'}\n")
    return str(path)

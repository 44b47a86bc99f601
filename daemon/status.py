"""`i2vd status`: what the daemon is doing, read from its state directory (works while it runs or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from daemon.config import DaemonConfig

RECENT = 10


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recent_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    entries = [entry for entry in directory.iterdir() if entry.is_dir() and not entry.is_symlink()]
    return sorted(entries, key=lambda entry: entry.stat().st_mtime, reverse=True)[:RECENT]


def collect_status(config: DaemonConfig) -> dict[str, Any]:
    state = config.state_path
    daemon = _read_json(state / "status.json") or {}
    claimed = []
    jobs_dir = state / "jobs"
    if jobs_dir.is_dir():
        for job_dir in sorted(jobs_dir.iterdir()):
            job = _read_json(job_dir / "job.json") or {}
            claimed.append({"job_id": job_dir.name, "input": job.get("image_name"), "attempts": job.get("attempts")})
    failed = []
    for failed_dir in _recent_dirs(config.inbox / "failed"):
        reason = _read_json(failed_dir / "reason.json") or {}
        failed.append({"name": failed_dir.name, "reason": reason.get("reason"), "at": reason.get("at")})
    done = [entry.name for entry in _recent_dirs(state / "done")]
    return {
        "daemon": {**daemon, "alive": _pid_alive(daemon.get("pid")) and daemon.get("state") != "stopped"},
        "claimed": claimed,
        "recent_done": done,
        "recent_failed": failed,
    }


def format_status(report: dict[str, Any]) -> str:
    daemon = report["daemon"]
    lines = [
        f"daemon: {'running' if daemon.get('alive') else 'not running'}"
        + (f" (pid {daemon.get('pid')}, model {daemon.get('model')})" if daemon.get("alive") else ""),
        f"running job: {daemon.get('running_job') or '-'}",
        f"claimed jobs (queued or running): {len(report['claimed'])}",
    ]
    lines += [f"  {job['job_id']}  {job['input']}  attempts={job['attempts']}" for job in report["claimed"]]
    lines.append(f"recent done: {len(report['recent_done'])}")
    lines += [f"  {name}" for name in report["recent_done"]]
    lines.append(f"recent failed: {len(report['recent_failed'])}")
    lines += [f"  {item['name']}  {item['reason']}  {item['at']}" for item in report["recent_failed"]]
    return "\n".join(lines)

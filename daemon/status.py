"""`i2vd status`: what the daemon is doing, read from its state directory (works while it runs or not)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.config import DaemonConfig
from daemon.control import is_paused
from daemon.systemd import single_line

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
        "paused": is_paused(state),
        "claimed": claimed,
        "recent_done": done,
        "recent_failed": failed,
    }


def _throughput(daemon: dict[str, Any]) -> str:
    """Videos per hour since the daemon started (a rough figure; Prometheus' rate() is the precise one)."""
    try:
        started = datetime.fromisoformat(str(daemon["started_at"]))
        hours = max((datetime.now(started.tzinfo) - started).total_seconds() / 3600, 1e-9)
        succeeded = int(daemon.get("outcomes", {}).get("succeeded", 0))
    except (KeyError, ValueError, TypeError):
        return "-"
    return f"{succeeded / hours:.1f} videos/h, {float(daemon.get('video_seconds_generated', 0)) / hours:.1f} video-s/h"


def _running_line(daemon: dict[str, Any]) -> str:
    running = daemon.get("running")
    if not running:
        return "running job: -"
    progress = f" step {running['step']}/{running['steps']}" if running.get("steps") else ""
    return f"running job: {running.get('name')} ({running.get('job_id')}){progress}"


def _memory_line(daemon: dict[str, Any]) -> str:
    memory = daemon.get("gpu_memory_bytes") or {}
    if not memory:
        return f"device: {daemon.get('device') or '-'} (no device memory figures)"
    gib = {kind: value / 2**30 for kind, value in memory.items()}
    peak = daemon.get("job_peak_gpu_memory_bytes", 0) / 2**30
    return (
        f"device: {daemon.get('device')} allocated {gib.get('allocated', 0):.2f} GiB, reserved "
        f"{gib.get('reserved', 0):.2f} GiB, free {gib.get('free', 0):.2f}/{gib.get('total', 0):.2f} GiB, "
        f"last job peak {peak:.2f} GiB"
    )


def format_status(report: dict[str, Any]) -> str:
    """The human view; `--json` prints `report` itself. Names are escaped: a file name cannot forge a line."""
    daemon = report["daemon"]
    alive = daemon.get("alive")
    lines = [
        f"daemon: {'running' if alive else 'not running'}"
        + (f" (pid {daemon.get('pid')}, model {daemon.get('model')})" if alive else ""),
        f"queue: {'PAUSED' if report.get('paused') else 'taking jobs'}",
    ]
    if alive:
        outcomes = daemon.get("outcomes", {})
        lines += [
            _running_line(daemon),
            f"queued: {len(daemon.get('queue', []))}  " + " ".join(daemon.get("queue", [])[:RECENT]),
            "outcomes since start: " + (", ".join(f"{k}={v}" for k, v in outcomes.items() if v) or "none"),
            f"throughput: {_throughput(daemon)}",
            _memory_line(daemon),
        ]
    lines.append(f"claimed jobs (queued or running): {len(report['claimed'])}")
    lines += [f"  {job['job_id']}  {job['input']}  attempts={job['attempts']}" for job in report["claimed"]]
    lines.append(f"recent done: {len(report['recent_done'])}")
    lines += [f"  {name}" for name in report["recent_done"]]
    lines.append(f"recent failed: {len(report['recent_failed'])}")
    lines += [f"  {item['name']}  {item['reason']}  {item['at']}" for item in report["recent_failed"]]
    return "\n".join(single_line(line) for line in lines)

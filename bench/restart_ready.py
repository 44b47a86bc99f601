"""Restart to READY of the real `i2vd run` process, with an empty and with a warm compile cache (issue 7).

Each run starts `python -m daemon run --config CONFIG` as systemd would (a `NOTIFY_SOCKET` datagram socket of
this script's), times process start -> `READY=1` (sent only after the model is loaded, compiled and warmed up and
the watcher is armed), then sends SIGTERM and waits for the exit. The first run of `--runs cold,warm,warm` starts
from an empty `model.cache_dir`, so it pays the whole compile; the next ones find the inductor/Triton caches and the
saved mega-cache there. The generation process's log (`model_loaded` with the load seconds, `compile_warm_up`)
is kept to split the time into import, load and compile.

    python bench/restart_ready.py --config gpu.yaml --runs cold,warm,warm --out results.json
    python bench/restart_ready.py --config config/daemon.yaml --runs warm --out /tmp/ready.json   # CPU, tiny model

Writes one JSON object with a record per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from latency_cpu import read_events  # noqa: E402  (the daemon's JSON log lines)


def wait_for_ready(sock: socket.socket, process: subprocess.Popen[bytes], timeout: float) -> float | None:
    """Seconds until READY=1 arrived, or None when the process exited or the timeout passed first."""
    started = time.perf_counter()
    sock.settimeout(0.5)
    while time.perf_counter() - started < timeout:
        try:
            message = sock.recv(65536).decode(errors="replace")
        except TimeoutError:
            if process.poll() is not None:
                return None
            continue
        if "READY=1" in message.splitlines():
            return time.perf_counter() - started
    return None


def one_run(config_path: Path, root: Path, label: str, timeout: float) -> dict[str, Any]:
    notify_path = root / f"notify-{label}.sock"
    log_path = root / f"daemon-{label}.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, log_path.open("wb") as log:
        sock.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        started_wall = datetime.now(UTC).isoformat()
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config_path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        ready = wait_for_ready(sock, process, timeout)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        total = time.perf_counter() - started
    notify_path.unlink(missing_ok=True)
    events = read_events(log_path)
    wanted = ("model_loaded", "compile_warm_up", "generation_process_ready")
    timeline = [(event.get("timestamp"), event.get("event")) for event in events]
    return {
        "run": label,
        "ready_seconds": round(ready, 2) if ready is not None else None,
        "exit_code": code,
        "seconds_to_exit": round(total, 2),
        "events": [event for event in events if event.get("event") in wanted],
        "started_at": started_wall,
        "timeline": timeline,
        "log_tail": log_path.read_text(errors="replace").splitlines()[-5:] if ready is None else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", default="cold,warm,warm", help="cold: empty model.cache_dir first; warm: keep it")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, help="keep each run's daemon log in this folder")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    cache_dir = Path(config.get("model", {}).get("cache_dir", ".cache/i2vd"))
    cache_dir = cache_dir if cache_dir.is_absolute() else REPO / cache_dir
    records = []
    with tempfile.TemporaryDirectory(prefix="i2vd-ready-") as temp:
        root = Path(temp)
        for index, kind in enumerate(args.runs.split(",")):
            if kind == "cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            record = one_run(args.config, root, f"{index}-{kind}", args.timeout)
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / f"daemon-{record['run']}.log", args.logs)
            write_result(args.out, config, records)  # after every run: a killed bench keeps what it measured


def write_result(out: Path, config: dict[str, Any], records: list[dict[str, Any]]) -> None:
    result = {
        "benchmark": "restart_ready",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.get("model"),
        "runs": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

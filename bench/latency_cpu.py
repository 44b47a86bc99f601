"""Inbox-drop -> published latency per job and model load time, on this CPU, with the embedded tiny model.

Runs the real `i2vd run` process on `config/daemon.yaml` (its sizes, its stability window) in a temporary working
directory, drops one pair at a time, and times the drop (sidecar rename) until the job's manifest appears.
Writes `bench/results/latency_cpu-<date>.json` and prints the row for the Foundation table of `BENCHMARKS.md`.

    .venv/bin/python bench/latency_cpu.py [--jobs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def read_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            events.append(item)
    return events


def wait_until(predicate: Any, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("daemon did not get there in time")
        time.sleep(0.01)


def run(jobs: int, stable_seconds: float | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="i2vd-bench-"))
    config = yaml.safe_load((REPO / "config" / "daemon.yaml").read_text())
    config["metrics"]["port"] = 0
    config["logging"]["format"] = "json"
    config["model"]["cache_dir"] = str(work / "cache")
    if stable_seconds is not None:
        config["intake"]["stable_seconds"] = stable_seconds
    (work / "daemon.yaml").write_text(yaml.safe_dump(config))
    log_path = work / "daemon.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", "daemon.yaml"],
            cwd=work,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_until(lambda: any(e.get("event") == "service_ready" for e in read_events(log_path)), 600, process)
            ready_seconds = time.monotonic() - started
            latencies = []
            inbox, outbox = work / "inbox", work / "outbox"
            for index in range(jobs):
                stem = f"job{index:03d}"
                shutil.copyfile(REPO / "examples" / "sunset.png", inbox / f"{stem}.png")
                (inbox / f"{stem}.yaml.part").write_text(f"prompt: waves at sunset {index}\nseed: {index}\n")
                dropped = time.monotonic()
                (inbox / f"{stem}.yaml.part").rename(inbox / f"{stem}.yaml")
                wait_until(lambda s=stem: any(outbox.glob(f"video_*_{s}.json")), 300, process)
                latencies.append(time.monotonic() - dropped)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    events = read_events(log_path)
    load = next(e for e in events if e.get("event") == "model_loaded")
    published = [e for e in events if e.get("event") == "job_published"]
    processing = [e["seconds"] for e in published]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "latency_cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "config": "config/daemon.yaml: tiny I2VGen-XL, 128x128, 8 frames, 4 steps, vertical+fps30+first_frame",
        "jobs": jobs,
        "process_start_to_ready_s": round(ready_seconds, 3),
        "model_load_s": load["seconds"],
        "drop_to_published_s": {
            "median": round(statistics.median(latencies), 3),
            "max": round(max(latencies), 3),
            "all": [round(x, 3) for x in latencies],
        },
        "claim_to_published_s": {
            "median": round(statistics.median(processing), 3),
            "max": round(max(processing), 3),
        },
        "stage_s_median": {
            stage: round(statistics.median(e["timings"][stage] for e in published), 3)
            for stage in published[0]["timings"]
        },
        "stability_window_s": config["intake"]["stable_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--stable-seconds", type=float, help="override intake.stable_seconds of config/daemon.yaml")
    args = parser.parse_args()
    result = run(args.jobs, args.stable_seconds)
    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"latency_cpu-{result['date'][:10]}-window{result['stability_window_s']}s.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    drop, claim = result["drop_to_published_s"], result["claim_to_published_s"]
    line = (
        f"| {result['date'][:10]} | {result['machine']} | `bench/latency_cpu.py --jobs {args.jobs}"
        f"{f' --stable-seconds {args.stable_seconds}' if args.stable_seconds is not None else ''}` | "
        f"drop→published median {drop['median']} s (max {drop['max']} s), claim→published median "
        f"{claim['median']} s, model load {result['model_load_s']:.2f} s, "
        f"start→READY {result['process_start_to_ready_s']} s |\n"
    )
    print(f"row for BENCHMARKS.md (Foundation table):\n{line}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Throughput of the daemon with 1..N workers on a backlog, and what a killed worker costs.

For each worker count the script starts the real service in this process (`daemon.service.Service`: real queue,
store, generation processes, ffmpeg, publication), drops `jobs-per-worker x workers` pairs at once into a fresh
inbox, and measures videos/hour from the drop to the last published manifest (model loading is excluded: it
happens in `start()`). Workers are the `local` executor's slots: one per device (`--devices 0,1,2,3` on a multi-GPU
host), or several sharing one device (`--share-device cuda:0` / `cpu`), or Ray actors (`--executor ray`).

With `--kill-one`, the generation process of worker w0 is killed (SIGKILL) while it runs its first job: the run then
reports the time until that worker is generating again and how many jobs were lost (must be 0: every dropped pair
ends published or in failed/).

    python bench/scaling.py --config config/daemon.yaml --workers 1,2 --share-device cpu --jobs-per-worker 4
    python bench/scaling.py --config gpu.yaml --workers 1,2,4,8 --devices 0,1,2,3,4,5,6,7 --jobs-per-worker 4 --kill-one

Writes one JSON record per worker count to `--out` (default `bench/results/scaling-<date>.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.config import DaemonConfig, load_config  # noqa: E402
from daemon.logs import configure_logging  # noqa: E402
from daemon.service import Service  # noqa: E402
from daemon.systemd import SystemdNotifier  # noqa: E402


def build_config(base: DaemonConfig, root: Path, workers: int, args: argparse.Namespace) -> DaemonConfig:
    data = base.model_dump()
    data["inbox"], data["outbox"] = root / "inbox", root / "outbox"
    data["state_dir"] = None
    data["intake"].update({"stable_seconds": 0.2, "rescan_seconds": 0.5})
    data["metrics"].update({"enabled": False})
    data["worker"].update({"retry_delay_seconds": 1.0})
    if getattr(args, "max_batch_size", None):
        data["worker"].update({"max_batch_size": args.max_batch_size})
    if args.executor == "ray":
        data["executor"] = {"kind": "ray", "ray": {**data["executor"]["ray"], "workers": workers, "detached": False}}
    elif args.devices:
        data["executor"].update(
            {"kind": "local", "devices": args.devices.split(",")[:workers], "workers_per_device": 1}
        )
    else:
        data["executor"].update({"kind": "local", "devices": [args.share_device], "workers_per_device": workers})
    return DaemonConfig(**data)


def drop_backlog(inbox: Path, count: int, args: argparse.Namespace) -> None:
    image = Image.new("RGB", (args.width, args.height), (90, 140, 200))
    variants = "" if getattr(args, "with_variants", False) else "variants: []\n"  # default set: the config's
    sidecar = f"prompt: a lighthouse at dusk\n{variants}num_frames: {args.frames}\nsteps: {args.steps}\n"
    sidecar += f"width: {args.width}\nheight: {args.height}\n"
    for index in range(count):
        image.save(inbox / f"job{index:04d}.png")
        (inbox / f"job{index:04d}.yaml.part").write_text(sidecar + f"seed: {index}\n")
        (inbox / f"job{index:04d}.yaml.part").rename(inbox / f"job{index:04d}.yaml")


def measure(base: DaemonConfig, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="i2vd-scaling-") as temp:
        root = Path(temp)
        config = build_config(base, root, workers, args)
        config.inbox.mkdir(parents=True)
        service = Service(config, notifier=SystemdNotifier(None))
        load_started = time.perf_counter()
        service.start()
        load_seconds = time.perf_counter() - load_started
        total = workers * args.jobs_per_worker
        started = time.perf_counter()
        drop_backlog(config.inbox, total, args)
        kill = _kill_first_worker(service) if args.kill_one else None
        published_at: list[float] = []  # when each manifest was first seen (0.1 s polling)
        while True:
            done = len(list(config.outbox.glob("video_*.json")))
            published_at += [time.perf_counter() - started] * (done - len(published_at))
            failed = (
                len(list((config.inbox / "failed").glob("*/reason.json"))) if (config.inbox / "failed").exists() else 0
            )
            if done + failed >= total:
                break
            if time.perf_counter() - started > args.timeout:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        manifests = [json.loads(p.read_text()) for p in config.outbox.glob("video_*.json")]
        if kill is not None:
            kill["recovered_seconds"] = _recovery_seconds(kill)
        idle = generator_idle(service)
        service.request_stop()
        service.stop(timeout=60)
    return {
        "workers": workers,
        "executor": args.executor,
        "devices": args.devices or f"{workers} x {args.share_device}",
        "jobs": total,
        "published": done,
        "failed": failed,
        "lost": total - done - failed,
        "seconds": round(elapsed, 2),
        "videos_per_hour": round(done / elapsed * 3600, 1) if elapsed > 0 else 0.0,
        "steady_videos_per_hour": steady_rate(published_at, getattr(args, "max_batch_size", None) or 1),
        "published_at_seconds": [round(t, 2) for t in published_at],
        "model_load_seconds": round(load_seconds, 2),
        "generator_idle": idle,
        "peak_vram_bytes": max((m.get("peak_vram_bytes") or 0 for m in manifests), default=0),
        "size": f"{args.width}x{args.height}x{args.frames}f x{args.steps} steps",
        "kill": kill,
        "host": socket.gethostname(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def generator_idle(service: Service) -> dict[str, float]:
    """`i2vd_generator_idle_seconds` over all workers: how many gaps the generators had between videos while a
    job was waiting, and how long they were in all (what the daemon's own work cost the GPU in this backlog)."""
    gaps = seconds = 0.0
    for family in service.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "i2vd_generator_idle_seconds_count":
                gaps += sample.value
            elif sample.name == "i2vd_generator_idle_seconds_sum":
                seconds += sample.value
    mean = seconds / gaps if gaps else 0.0
    return {"gaps": gaps, "seconds": round(seconds, 3), "mean_seconds": round(mean, 4)}


def steady_rate(published_at: list[float], first: int = 1) -> float | None:
    """Videos/hour once the pipeline is full: the videos after the first `first` ones over the time from the
    `first`-th publication to the last one. It leaves out what a backlog pays once (the stability window and the
    first video's cold start in a fresh generation process), which a daemon that runs for days amortises; the last
    job's finishing, which nothing overlaps, stays inside the window. With batching, `first` is the batch size: the
    first batch is published at one moment, so the window must start after all of it."""
    if len(published_at) <= first or published_at[-1] <= published_at[first - 1]:
        return None
    return round((len(published_at) - first) / (published_at[-1] - published_at[first - 1]) * 3600, 1)


def _kill_first_worker(service: Service) -> dict[str, Any]:
    """Wait until worker w0 is generating, then SIGKILL its generation process."""
    view = service.pool.views()[0]
    deadline = time.monotonic() + 600
    while view.worker.current_job is None or not view.worker.progress:
        if time.monotonic() > deadline:
            return {"killed": False}
        time.sleep(0.02)
    pid = view.generator.pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    return {"killed": True, "pid": pid, "at": time.perf_counter(), "view": view}


def _recovery_seconds(kill: dict[str, Any]) -> float | None:
    """From the kill to the moment the replacement process reported its model loaded."""
    view = kill.pop("view", None)
    at = kill.pop("at", None)
    if view is None or at is None:
        return None
    ready = getattr(view.generator, "last_ready_at", None)
    return round(ready - at, 2) if ready is not None and ready > at else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "daemon.yaml"))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--devices", help="comma-separated CUDA ids, one worker each (multi-GPU host)")
    parser.add_argument("--share-device", default="cpu", help="without --devices: all workers on this device")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--jobs-per-worker", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, help="worker.max_batch_size (default: the config's)")
    parser.add_argument("--kill-one", action="store_true")
    parser.add_argument("--with-variants", action="store_true", help="jobs get the config's default variants")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    configure_logging("warning", "json")
    base = load_config(Path(args.config))
    records = []
    for workers in (int(item) for item in args.workers.split(",")):
        record = measure(base, workers, args)
        records.append(record)
        print(json.dumps(record), flush=True)
    one = next((r for r in records if r["workers"] == 1), None)
    if one and one["videos_per_hour"]:
        for record in records:
            record["scaling_efficiency"] = round(
                record["videos_per_hour"] / (one["videos_per_hour"] * record["workers"]), 3
            )
    out = Path(args.out or REPO / "bench" / "results" / f"scaling-{datetime.now(UTC):%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Flood: N pairs dropped into the inbox at once, through the real service; plus the filesystem's claim and publish
rates on their own.

Checklist E45 (issue 4 part 8). The model is an instant test double (a gradient clip, no torch) and, by default,
so is ffmpeg (`--real-ffmpeg` keeps the real encoder and its read-back verification: ~0.6 s of CPU per job here,
too slow for 10 000 on 2 cores). Everything else is the daemon as shipped: intake scan, stability, claim by
rename, validation, the store's fsynced state, the queue, the worker, publication (fsync, rename, dir fsync),
the completed-input ledger and the input archive. So the run measures the daemon's own bookkeeping under load.

Reports: count, wall time from start to drained, jobs/s, peak RSS (ru_maxrss) and RSS sampled every 0.5 s,
outcomes, duplicates (must be 0). Then, separately, `JobStore.claim` and `Publisher.publish` rates per second on
the same filesystem (temp dir under --root). Writes `bench/results/flood-<date>-<count>.json`.

    PYTHONPATH=. .venv/bin/python bench/flood.py [--count 10000] [--root DIR] [--real-ffmpeg] [--decode-in-process]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from daemon.generate.base import GenerationRequest, GenerationResult, ModelInfo
from daemon.media import MediaInfo

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from daemon.config import EncodeConfig

# The daemon's heavier modules (the service, the worker and what they import) are imported where they are used:
# intake decodes each image in a child that runs this script's top again (multiprocessing does that for a script
# main), and the `i2vd` script the daemon runs as has only the CLI there, which the decode server preloads.

REPO = Path(__file__).resolve().parent.parent
SIDECAR = "prompt: flood {index}\nwidth: 64\nheight: 64\nnum_frames: 8\nsteps: 1\nvariants: []\nseed: {index}\n"


class InstantGenerator:
    """Stands in for the model: a deterministic gradient of the requested shape, at once."""

    info = ModelInfo(model_id="instant-double", revision=None, device="cpu", dtype="uint8", load_seconds=0.0)

    def generate(
        self, request: GenerationRequest, on_step: Any = None, should_interrupt: Any = None
    ) -> GenerationResult:
        shape = (request.num_frames, request.height, request.width, 3)
        import numpy as np

        ramp = np.linspace(20, 200, request.width, dtype=np.float32)[None, None, :, None]
        step = (np.arange(request.num_frames, dtype=np.float32) * 5)[:, None, None, None]
        return GenerationResult(frames=np.broadcast_to(ramp + step, shape).astype(np.uint8))

    def memory_stats(self) -> Mapping[str, int]:
        return {}


class InstantEncoder:
    """Stands in for ffmpeg: writes the raw frames' first KiB as the "video" and reports what was asked."""

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config

    def write_video(self, frames: npt.NDArray[np.uint8], fps: int, destination: Path) -> MediaInfo:
        destination.write_bytes(frames.tobytes()[:1024])
        count, height, width = frames.shape[:3]
        return MediaInfo("h264", width, height, count, float(fps), count / fps, "yuv420p")


def drop_pairs(inbox: Path, count: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(buffer, format="PNG")
    for index in range(count):
        (inbox / f"p{index:05d}.png").write_bytes(buffer.getvalue())
    for index in range(count):
        (inbox / f"p{index:05d}.yaml").write_text(SIDECAR.format(index=index))


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_flood(root: Path, count: int, real_ffmpeg: bool, decode_in_child: bool = True) -> dict[str, Any]:
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir(parents=True)
    drop_pairs(inbox, count)
    from daemon import worker as worker_module
    from daemon.config import DaemonConfig
    from daemon.service import Service

    if not real_ffmpeg:
        worker_module.Encoder = InstantEncoder  # type: ignore[misc, assignment]
    config = DaemonConfig(
        inbox=inbox,
        outbox=outbox,
        metrics={"enabled": False},  # type: ignore[arg-type]
        intake={"stable_seconds": 0.0, "rescan_seconds": 1.0, "decode_in_child": decode_in_child},  # type: ignore[arg-type]
        encode={"preset": "ultrafast", "default_variants": ()},  # type: ignore[arg-type]
        logging={"level": "warning"},  # type: ignore[arg-type]
    )
    samples: list[int] = []
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.5):
            samples.append(rss_bytes())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    started = time.perf_counter()
    service = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    service.start()
    exit_code = service.run_until_stopped()
    wall = time.perf_counter() - started
    stop.set()
    manifests = list(outbox.glob("*.json"))
    inputs = Counter(json.loads(m.read_text())["input"]["image"] for m in manifests)
    registry = service.metrics.registry
    outcomes = {o: registry.get_sample_value("i2vd_jobs_total", {"outcome": o}) for o in ("succeeded", "failed")}
    return {
        "count": count,
        "real_ffmpeg": real_ffmpeg,
        "exit_code": exit_code,
        "wall_s": round(wall, 2),
        "jobs_per_s": round(count / wall, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_mib_samples_min_max": [round(min(samples) / 2**20, 1), round(max(samples) / 2**20, 1)] if samples else [],
        "store_counts": service.store.counts(),
        "outcomes": outcomes,
        "received": registry.get_sample_value("i2vd_jobs_received_total"),
        "manifests": len(manifests),
        "distinct_inputs_published": len(inputs),
        "duplicate_outputs": sum(n - 1 for n in inputs.values()),
        "ledger_entries": len(service.store.ledger),
    }


def claim_and_publish_rates(root: Path, count: int) -> dict[str, float]:
    """`JobStore.claim` and `Publisher.publish` (1 video + manifest) per second, fsyncs included."""
    from daemon.publish import Publisher
    from daemon.store import JobStore, Pair

    inbox, outbox = root / "rates-inbox", root / "rates-outbox"
    inbox.mkdir(parents=True)
    store = JobStore(inbox, inbox / ".i2vd")
    for index in range(count):
        (inbox / f"r{index}.png").write_bytes(b"png")
        (inbox / f"r{index}.yaml").write_bytes(b"prompt: x\n")
    started = time.perf_counter()
    jobs = [store.claim(Pair(f"r{i}", inbox / f"r{i}.png", inbox / f"r{i}.yaml")) for i in range(count)]
    claim_rate = count / (time.perf_counter() - started)
    publisher = Publisher(outbox)
    staged = []
    for job in jobs:
        path = publisher.staging_dir(job.job_id) / "main.mp4"
        path.write_bytes(os.urandom(256 * 1024))
        staged.append(path)
    started = time.perf_counter()
    for index, path in enumerate(staged):
        publisher.publish(f"video_rate_{index}", [(path, ".mp4")], {"job_id": jobs[index].job_id})
    publish_rate = count / (time.perf_counter() - started)
    return {"claims_per_s": round(claim_rate, 1), "publishes_per_s": round(publish_rate, 1), "rate_samples": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--root", type=Path, default=None, help="work dir (default: a temp dir, removed after)")
    parser.add_argument("--real-ffmpeg", action="store_true")
    parser.add_argument("--rate-samples", type=int, default=500)
    parser.add_argument(
        "--decode-in-process", action="store_true", help="intake.decode_in_child: false (images decoded in the daemon)"
    )
    args = parser.parse_args()
    from daemon.logs import configure_logging

    configure_logging("warning")
    root = Path(tempfile.mkdtemp(prefix="i2vd-flood-", dir=args.root))
    try:
        result = run_flood(root / "flood", args.count, args.real_ffmpeg, not args.decode_in_process)
        result |= claim_and_publish_rates(root, args.rate_samples)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result |= {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "filesystem": subprocess.run(
            ["stat", "-f", "-c", "%T", str(root.parent)], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    result["decode_in_child"] = not args.decode_in_process
    suffix = "-in-process" if args.decode_in_process else ""
    out = REPO / "bench" / "results" / f"flood-{result['date'][:10]}-{args.count}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Outputs benchmark: CPU seconds per finishing preset, and whether finishing stalls the generator under backlog.

1. Presets: a synthetic 16-frame 512x512 clip at 8 fps is written as the main MP4, then every preset of the library
   (plus `fps30` with `interpolate: true`) is made from it `--repeats` times; CPU seconds are the ffmpeg children's
   user+sys time (`RUSAGE_CHILDREN`), verification read-back included, median of the repeats.
2. Backlog: `--jobs` jobs queued at once through the real `Worker.run()` with the embedded tiny model at
   `--size`x`--size`, 16 frames, `--steps` steps (generation dominates), default variants. Busy ratio = seconds inside
   `generate()` / wall seconds from the first generate start to the last generate end (the span in which a
   backlog existed). The same jobs through `Worker.process()` one by one (finishing inline, the old behaviour) give
   the baseline in the same process.

Writes `bench/results/presets_cpu-<date>.json` and a row in BENCHMARKS.md's "Outputs" table.

    .venv/bin/python bench/presets_cpu.py [--repeats 3] [--jobs 4] [--size 256] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import DEFAULT_VARIANTS, DaemonConfig, EncodeConfig, load_config
from daemon.encode import Encoder
from daemon.generate import load_generator
from daemon.generate.base import Generator
from daemon.intake import Intake
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker

REPO = Path(__file__).resolve().parent.parent


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def synthetic_clip(frames: int = 16, size: int = 512) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Moving ramps plus mild noise: realistic work for the encoders (pure noise would be unrealistically hard)."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 200, size)
    t = np.arange(frames)[:, None, None] * 5
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    clip[..., 0] = (grid[None, None, :] + t) % 256
    clip[..., 1] = (grid[None, :, None] + 2 * t) % 256
    clip[..., 2] = rng.integers(60, 80, (frames, size, size), dtype=np.uint8)
    return clip


def bench_presets(repeats: int) -> list[dict[str, Any]]:
    presets = {
        **DEFAULT_VARIANTS,
        "fps30_interpolate": DEFAULT_VARIANTS["fps30"].model_copy(update={"interpolate": True}),
    }
    encoder = Encoder(EncodeConfig(max_concurrent_ffmpeg=1))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        main = Path(scratch) / "main.mp4"
        before = children_cpu()
        info = encoder.write_video(synthetic_clip(), 8, main)
        rows.append({"preset": "main (write + verify)", "cpu_s": round(children_cpu() - before, 3)})
        for name, spec in presets.items():
            cpu, wall = [], []
            for _ in range(repeats):
                before, started = children_cpu(), time.perf_counter()
                out = encoder.make_variant(name, spec, main, info, Path(scratch) / f"v.{name}.{spec.ext}")
                cpu.append(children_cpu() - before)
                wall.append(time.perf_counter() - started)
            size = (Path(scratch) / f"v.{name}.{spec.ext}").stat().st_size
            rows.append(
                {
                    "preset": name,
                    "cpu_s": round(statistics.median(cpu), 3),
                    "wall_s": round(statistics.median(wall), 3),
                    "output": f"{out.codec} {out.width}x{out.height} {out.frames}f",
                    "bytes": size,
                }
            )
            print(rows[-1], flush=True)
    return rows


class Backlog:
    """N claimed jobs in a fresh inbox/outbox, and a generator wrapper that records its busy intervals."""

    def __init__(self, root: Path, generator: Generator, jobs: int, size: int, steps: int) -> None:
        base = load_config(REPO / "config" / "daemon.yaml", {"inbox": root / "inbox", "outbox": root / "outbox"})
        defaults = {"resolution": None, "width": size, "height": size, "num_frames": 16, "steps": steps}
        self.config: DaemonConfig = base.model_copy(
            update={
                "generation": base.generation.model_copy(
                    update={"defaults": base.generation.defaults.model_copy(update=defaults), "max_pixels": size * size}
                ),
                "intake": base.intake.model_copy(update={"stable_seconds": 0.0}),
            }
        )
        self.config.inbox.mkdir(parents=True)
        self.config.outbox.mkdir(parents=True)
        for index in range(jobs):
            shutil.copy(REPO / "examples" / "sunset.png", self.config.inbox / f"job{index}.png")
            (self.config.inbox / f"job{index}.yaml").write_text(f"prompt: waves\nseed: {index}\n")
        self.store = JobStore(self.config.inbox, self.config.state_path)
        self.jobs: list[ClaimedJob] = sorted(Intake(self.config, self.store).poll().accepted, key=lambda j: j.sequence)
        self.intervals: list[tuple[float, float]] = []
        self.queue: JobQueue[ClaimedJob] = JobQueue()
        self.worker = Worker(
            self.config, generator, self.store, self.queue, DaemonMetrics(), interrupt=threading.Event()
        )
        real = self.worker._generator.generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.intervals.append((started, time.perf_counter()))

        self.worker._generator = _Timed(generator, timed)  # type: ignore[assignment]

    def summary(self, started: float, ended: float, outcomes: list[str]) -> dict[str, Any]:
        busy = sum(end - start for start, end in self.intervals)
        span = self.intervals[-1][1] - self.intervals[0][0]
        return {
            "jobs": len(self.jobs),
            "outcomes": sorted(set(outcomes)),
            "generate_s_total": round(busy, 2),
            "backlog_span_s": round(span, 2),
            "busy_ratio": round(busy / span, 4),
            "wall_s_to_last_publish": round(ended - started, 2),
            "busy_ratio_incl_tail": round(busy / (ended - started), 4),
            "published": len(list(self.config.outbox.glob("video_*.json"))),
        }


class _Timed:
    """The generator with `generate` replaced by a timing wrapper (attribute access otherwise passes through)."""

    def __init__(self, inner: Generator, generate: Any) -> None:
        self._inner, self.generate = inner, generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def bench_backlog(generator: Generator, jobs: int, size: int, steps: int, pooled: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        rig = Backlog(Path(scratch), generator, jobs, size, steps)
        started = time.perf_counter()
        if pooled:
            for job in rig.jobs:
                rig.queue.put(job, priority=0, sequence=job.sequence)
            thread = threading.Thread(target=rig.worker.run)
            thread.start()
            while len(rig.intervals) < jobs and thread.is_alive():  # every job generated: nothing left to take
                time.sleep(0.05)
            rig.queue.close()  # run() then waits for the finishing it started
            thread.join()
            outcomes = ["pool"]
        else:
            outcomes = [rig.worker.process(job) for job in rig.jobs]
        result = rig.summary(started, time.perf_counter(), outcomes)
        result["mode"] = "pool (Worker.run)" if pooled else "inline (Worker.process, baseline)"
        print(result, flush=True)
        return result


def append_row(date: str, machine: str, summary: str) -> None:
    """Insert a row at the end of the table under "## Outputs" in BENCHMARKS.md (other sections stay as they are)."""
    path = REPO / "BENCHMARKS.md"
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Outputs"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_row + 1, f"| {date} | {machine} | `bench/presets_cpu.py` | {summary} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    presets = bench_presets(args.repeats)
    with tempfile.TemporaryDirectory() as cache:
        config = load_config(None).model.model_copy(update={"cache_dir": Path(cache), "device": "cpu"})
        generator = load_generator(config)
        pooled = bench_backlog(generator, args.jobs, args.size, args.steps, pooled=True)
        inline = bench_backlog(generator, args.jobs, args.size, args.steps, pooled=False)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    machine = f"{platform.machine()} {os.cpu_count()} cores (CPU only)"
    result = {
        "benchmark": "presets_cpu",
        "date": date,
        "machine": machine,
        "clip": "16 frames 512x512 @ 8 fps",
        "presets": presets,
        "backlog": {
            "size": args.size,
            "frames": 16,
            "steps": args.steps,
            "variants": list(load_config(None).encode.default_variants),
            "pool": pooled,
            "inline": inline,
        },
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    out = REPO / "bench" / "results" / f"presets_cpu-{date[:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    cpu = ", ".join(f"{row['preset']} {row['cpu_s']}" for row in presets)
    summary = (
        f"CPU s per preset (16f 512²): {cpu}. Backlog {args.jobs} jobs {args.size}²x16f, {args.steps} steps, default "
        f"variants: busy ratio {pooled['busy_ratio']} with the pool vs {inline['busy_ratio']} inline "
        f"(incl. last job's finishing tail: {pooled['busy_ratio_incl_tail']} vs {inline['busy_ratio_incl_tail']})"
    )
    append_row(date[:10], machine, summary)


if __name__ == "__main__":
    main()

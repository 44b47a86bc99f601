"""One attempt of one job as the worker carries it: its stage clock, and the generator request it becomes.

Kept apart from `worker.py` so the worker module holds only the loop and the error policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from daemon.finish import GeneratedJob
from daemon.generate.base import GenerationRequest, GenerationResult
from daemon.jobspec import ResolvedJob
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob


class StageTimer:
    """Collects per-stage seconds for the manifest and the stage histogram."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.timings: dict[str, float] = {}
        self.running: dict[str, float] = {}
        """Stages still running, by their start (`time.perf_counter`): the manifest is written inside `publish`."""
        self._metrics = metrics

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self._metrics.stage_duration.labels(stage=name).observe(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = self.running[name] = time.perf_counter()
        try:
            yield
        finally:
            del self.running[name]
            self.add(name, time.perf_counter() - started)


@dataclass(frozen=True)
class CheckedVideo:
    """A generated video that passed its sanity checks, waiting in memory for its main MP4 (the CPU half writes
    it, so the GPU goes on to the next job at once). `resolved` is what the video really is (after any degrade)."""

    resolved: ResolvedJob
    result: GenerationResult
    sanity: dict[str, dict[str, Any]]


@dataclass
class Attempt:
    """One attempt of one job, carried from the GPU half into the finishing pool (per job: no shared state)."""

    job: ClaimedJob
    started: float
    timer: StageTimer
    peak_vram: int = 0
    checked: CheckedVideo | None = None
    """Set by the GPU half; the CPU half encodes it into `generated` (and drops the frames)."""
    generated: GeneratedJob | None = None
    published: list[Path] = field(default_factory=list)


def generation_request(resolved: ResolvedJob, image: Image.Image | None) -> GenerationRequest:
    """The generator's request for a resolved job (`image` None: only for sizing questions)."""
    return GenerationRequest(
        image=image,  # type: ignore[arg-type]
        prompt=resolved.prompt,
        negative_prompt=resolved.negative_prompt,
        width=resolved.width,
        height=resolved.height,
        num_frames=resolved.num_frames,
        target_fps=resolved.target_fps,
        steps=resolved.steps,
        guidance_scale=resolved.guidance_scale,
        seed=resolved.seed,
        options=dict(resolved.model_options),
        mode=resolved.mode,
    )


def batch_key_of(job: ClaimedJob) -> tuple[int, int, int, int] | None:
    resolved = job.resolved
    if resolved is None:
        return None
    return (resolved.width, resolved.height, resolved.num_frames, resolved.steps)

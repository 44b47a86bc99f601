"""Helpers for the Ray executor tests: a fast fake generator that Ray actors can load, and a worker harness.

`FakeFactory` is what the tests inject instead of the real model loader (one test per module uses the real embedded
tiny model). Its generator is deterministic (frames from the image, the seed and the frame index), sleeps
`step_seconds` per denoising step, honours `should_interrupt`, counts every model load in `loads_file` (one line per
load, with the pid: it survives actor restarts) and can crash its process once (`os._exit(1)`, as a segfault or an
OOM kill would) when `crash_marker` does not exist yet. Ray workers cannot import this file by name (it is not on
their path), so `share_with_ray()` makes cloudpickle send it by value.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.config import DaemonConfig, load_config
from daemon.errors import JobInterrupted
from daemon.generate.base import GenerationRequest, GenerationResult, ModelInfo
from daemon.intake import Intake
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker


def ray_auth_env() -> dict[str, str]:
    """Token authentication off for the tests' short-lived Ray: a local Ray 2.60 would otherwise write a token into
    ~/.ray, and a per-run token cannot be used instead because the driver reads its auth mode when Ray is imported,
    before any fixture runs. Ray's processes and a second driver inherit the setting."""
    return {"RAY_AUTH_MODE": "disabled"}


def share_with_ray() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def render_frames(request: GenerationRequest) -> np.ndarray:
    """The fake generator's output: the image at the requested size, shifted in brightness per frame."""
    image = np.asarray(request.image.convert("RGB").resize((request.width, request.height)), dtype=np.int32)
    frames = [np.clip(image + (index * 9 + request.seed) % 60, 0, 255) for index in range(request.num_frames)]
    return np.stack(frames).astype(np.uint8)


class FakeGenerator:
    def __init__(self, step_seconds: float, crash_marker: Path | None) -> None:
        self.info = ModelInfo("fake", None, "cpu", "float32", 0.0, {"fake": "1"})
        self._step_seconds = step_seconds
        self._crash_marker = crash_marker

    def generate(
        self,
        request: GenerationRequest,
        on_step: Callable[[int, int, float], None] | None = None,
        should_interrupt: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        for step in range(1, request.steps + 1):
            if should_interrupt is not None and should_interrupt():
                raise JobInterrupted()
            time.sleep(self._step_seconds)
            if step == 2 and self._crash_marker is not None and not self._crash_marker.exists():
                self._crash_marker.write_text(str(os.getpid()))
                os._exit(1)
            if on_step is not None:
                on_step(step, request.steps, self._step_seconds)
        return GenerationResult(frames=render_frames(request), timings={"denoise": 0.0})

    def memory_stats(self) -> Mapping[str, int]:
        return {"allocated": 1, "reserved": 2, "total": 4, "free": 2}


class FakeBatchGenerator(FakeGenerator):
    """The fake with the optional `BatchGenerator` capability: up to `batch` requests per call."""

    def __init__(self, step_seconds: float, crash_marker: Path | None, batch: int) -> None:
        super().__init__(step_seconds, crash_marker)
        self._batch = batch

    def max_batch_size(self, request: GenerationRequest) -> int:
        return self._batch

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[int, int, float], None] | None = None,
        should_interrupt: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        assert 1 <= len(requests) <= self._batch
        self.generate(requests[0], on_step, should_interrupt)  # the shared denoising loop
        return [GenerationResult(frames=render_frames(request)) for request in requests]


@dataclass(frozen=True)
class FakeFactory:
    loads_file: Path
    step_seconds: float = 0.0
    crash_marker: Path | None = None
    batch: int = 0
    """> 0: build a `FakeBatchGenerator` taking up to `batch` requests."""

    def __call__(self) -> FakeGenerator:
        with self.loads_file.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        if self.batch:
            return FakeBatchGenerator(self.step_seconds, self.crash_marker, self.batch)
        return FakeGenerator(self.step_seconds, self.crash_marker)

    def loads(self) -> list[int]:
        return [int(line) for line in self.loads_file.read_text().split()] if self.loads_file.exists() else []


def failing_factory() -> FakeGenerator:
    """A model that cannot load (weights missing, CUDA unusable)."""
    raise FileNotFoundError("model directory /srv/models/missing does not exist")


class Harness:
    """A real store, queue and `Worker` over a tmp inbox/outbox, with tiny job defaults and no retry delay."""

    def __init__(self, root: Path, generator: object, *, steps: int = 2) -> None:
        config = load_config(None, {"inbox": root / "inbox", "outbox": root / "outbox"})
        defaults = config.generation.defaults.model_copy(
            update={"resolution": None, "width": 64, "height": 64, "num_frames": 8, "steps": steps}
        )
        self.config: DaemonConfig = config.model_copy(
            update={
                "generation": config.generation.model_copy(update={"defaults": defaults}),
                "intake": config.intake.model_copy(update={"stable_seconds": 0.0}),
                "worker": config.worker.model_copy(update={"retry_delay_seconds": 0.0}),
            }
        )
        self.config.inbox.mkdir(parents=True)
        self.config.outbox.mkdir(parents=True)
        self.store = JobStore(self.config.inbox, self.config.state_path)
        self.queue: JobQueue[ClaimedJob] = JobQueue()
        self.metrics = DaemonMetrics()
        self.worker = Worker(
            self.config,
            generator,
            self.store,
            self.queue,
            self.metrics,
            interrupt=threading.Event(),  # type: ignore[arg-type]
        )

    def claim(self, make_image: Callable[..., Path], stem: str, sidecar: str) -> ClaimedJob:
        make_image(f"{stem}.png", size=(80, 64), directory=self.config.inbox)
        (self.config.inbox / f"{stem}.yaml").write_text(sidecar)
        (job,) = Intake(self.config, self.store).poll().accepted
        return job

    def run_until_settled(self, job: ClaimedJob) -> list[str]:
        """Process the job, then its re-queued retries, until it reaches a final outcome."""
        outcomes = [self.worker.process(job)]
        while outcomes[-1] == "retried":
            retried = self.queue.get(timeout=10)
            assert retried is not None
            outcomes.append(self.worker.process(retried))
        return outcomes

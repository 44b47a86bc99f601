"""Generators for tests of the process and executor layers: they honour the `Generator` protocol (steps, progress,
interrupt, memory stats) but return synthetic frames at once, so supervision can be tested without a model.

Every factory is a module-level function: a spawned generation process imports this module by name (pytest puts
`tests/` on `sys.path`, and multiprocessing's spawn copies `sys.path` into the child).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from daemon.errors import JobInterrupted, TransientJobError
from daemon.generate.base import (
    GenerationRequest,
    GenerationResult,
    InterruptCheck,
    ModelInfo,
    StepCallback,
)


class InstantGenerator:
    """Frames are a gradient shifted per frame (passes the frozen/black/white sanity checks), made instantly."""

    def __init__(self, step_seconds: float = 0.0, behaviour: str = "ok", marker: Path | None = None) -> None:
        self.step_seconds = step_seconds
        self.behaviour = behaviour
        self.marker = marker
        self.calls = 0
        self.info = ModelInfo("fake-instant", None, "cpu", "float32", 0.0, {"pid": str(os.getpid())})

    def memory_stats(self) -> Mapping[str, int]:
        return {"allocated": 1000 + self.calls, "reserved": 2000, "total": 10_000, "free": 8000}

    def _misbehave(self, request: GenerationRequest) -> None:
        if self.behaviour == "crash_on_poison" and "poison" in request.prompt:
            os._exit(3)
        first_time = self.marker is not None and not self.marker.exists()
        if self.marker is not None:
            self.marker.touch()
        if self.behaviour == "always_crash" or (self.behaviour == "crash_once" and first_time):
            os._exit(3)
        if self.behaviour == "segfault_once" and first_time:
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.behaviour == "hang_once" and first_time:
            time.sleep(3600)
        if self.behaviour == "oom_once" and first_time:
            raise TransientJobError("CUDA out of memory (injected)")
        if self.behaviour == "bug":
            raise ValueError("injected bug in the generator")

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        self.calls += 1
        self._misbehave(request)
        for step in range(1, request.steps + 1):
            if should_interrupt is not None and should_interrupt():
                raise JobInterrupted
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(step, request.steps, self.step_seconds)
        if self.behaviour == "degrade":
            # What the OOM ladder does at its "fewer frames" rung: half the frames, and says so.
            fewer = dataclasses.replace(request, num_frames=max(1, request.num_frames // 2))
            steps = ("decode_chunk=1", "vae_tiling", f"num_frames={fewer.num_frames}")
            return GenerationResult(
                frames=synthetic_frames(fewer),
                degradations=steps,
                used={"num_frames": fewer.num_frames},
                out_of_memory_errors=len(steps),  # one caught OOM per rung climbed
            )
        return GenerationResult(frames=synthetic_frames(request), timings={"denoise": 0.0})


class BatchingGenerator(InstantGenerator):
    """Also implements the optional batch capability; records the batch sizes it was given."""

    def __init__(self, limit: int = 4) -> None:
        super().__init__()
        self.limit = limit
        self.batches: list[int] = []

    def max_batch_size(self, request: GenerationRequest) -> int:
        return self.limit

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> list[GenerationResult]:
        self.batches.append(len(requests))
        return [self.generate(request, on_step, should_interrupt) for request in requests]


def synthetic_frames(request: GenerationRequest) -> np.ndarray:
    y, x = np.mgrid[0 : request.height, 0 : request.width]
    frames = np.empty((request.num_frames, request.height, request.width, 3), dtype=np.uint8)
    for index in range(request.num_frames):
        frames[index, ..., 0] = (x * 255 // max(1, request.width - 1) + 8 * index) % 256
        frames[index, ..., 1] = (y * 255 // max(1, request.height - 1)) % 256
        frames[index, ..., 2] = (request.seed + 16 * index) % 256
    return frames


def make_instant(step_seconds: float = 0.0) -> InstantGenerator:
    return InstantGenerator(step_seconds)


def make_misbehaving(behaviour: str, marker: str | None = None, step_seconds: float = 0.0) -> InstantGenerator:
    return InstantGenerator(step_seconds, behaviour, Path(marker) if marker else None)


def make_with_lingering_thread() -> InstantGenerator:
    """A generator whose loading left a non-daemon thread that never ends (as a library's worker pool can): an
    interpreter teardown would wait for it forever."""
    import threading

    threading.Thread(target=threading.Event().wait, name="lingering", daemon=False).start()
    return InstantGenerator(0.0)


def make_batching(limit: int = 4) -> BatchingGenerator:
    return BatchingGenerator(limit)


def fail_to_load() -> InstantGenerator:
    raise OSError("weights not found (injected)")


def load_fake(model: object) -> InstantGenerator:
    """Stands in for `daemon.generate.load_generator(model_config)` in executor tests (monkeypatched into
    `daemon.executor`); `I2VD_TEST_FAKE` = "behaviour[:marker[:step_seconds]]" chooses how it misbehaves."""
    behaviour, _, rest = os.environ.get("I2VD_TEST_FAKE", "ok").partition(":")
    marker, _, step = rest.partition(":")
    generator = InstantGenerator(float(step or 0.0), behaviour, Path(marker) if marker else None)
    generator.info = ModelInfo("fake-instant", None, "cpu", "float32", 0.0, {"pid": str(os.getpid())})
    return generator

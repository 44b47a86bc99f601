"""The Ray actor that holds one warm generator on a cluster node (the remote half of `daemon.raygen`).

This module imports nothing from Ray: `GeneratorActor` is a plain class that `daemon.raygen` turns into an actor
with `ray.remote(...)`, so its logic is the same in and out of Ray. It runs in a Ray worker process on whichever node
has the GPU Ray gave it (Ray sets `CUDA_VISIBLE_DEVICES`, so the generator sees that GPU as `cuda:0`).

The actor is threaded (`max_concurrency >= 2`): `generate` runs in one thread while the driver polls `progress`
and sends `interrupt` from another. Every call carries a `call_id` chosen by the driver, so an interrupt or a
progress poll can never be mistaken for another call's, even when it arrives before the call it names starts.
At most one generation (or batch) runs at a time (`_busy`): a second driver attached to the same actor waits its
turn.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from daemon.generate.base import (
    BatchGenerator,
    GenerationRequest,
    GenerationResult,
    Generator,
    InterruptCheck,
    ModelInfo,
    StepCallback,
)

_T = TypeVar("_T")

GeneratorFactory = Callable[[], Generator]
"""Builds the warm generator inside the actor; must be picklable (a module-level function or a partial of one)."""

Step = tuple[int, int, float]
"""(step index starting at 1, total steps, seconds the step took), as `StepCallback` receives them."""


@dataclass(frozen=True)
class ActorState:
    """Where an actor runs, for logs and tests: a new `pid` means Ray restarted it (and it reloaded the model)."""

    pid: int
    node_id: str
    gpu_ids: tuple[str, ...]
    cuda_visible_devices: str | None


class GeneratorActor:
    """One warm generator, loaded once in `__init__` (Ray re-runs `__init__` when it restarts the actor)."""

    def __init__(self, factory: GeneratorFactory) -> None:
        self._generator = factory()
        self._busy = threading.Lock()
        self._lock = threading.Lock()
        self._steps: dict[str, list[Step]] = {}
        self._interrupted: set[str] = set()

    def state(self) -> ActorState:
        import ray  # the actor only ever runs inside Ray

        context = ray.get_runtime_context()
        return ActorState(
            pid=os.getpid(),
            node_id=context.get_node_id(),
            gpu_ids=tuple(str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )

    def info(self) -> ModelInfo:
        return self._generator.info

    def memory_stats(self) -> dict[str, int]:
        return dict(self._generator.memory_stats())

    def generate(self, request: GenerationRequest, call_id: str) -> GenerationResult:
        """Run one generation; steps are buffered for `progress`, `interrupt(call_id)` stops it between steps."""
        return self._run(
            call_id,
            lambda on_step, should_interrupt: self._generator.generate(
                request, on_step=on_step, should_interrupt=should_interrupt
            ),
        )

    def max_batch_size(self, request: GenerationRequest) -> int:
        """How many requests shaped like `request` one `generate_batch` may take (1: the generator cannot batch)."""
        generator = self._batch_generator()
        return 1 if generator is None else max(1, int(generator.max_batch_size(request)))

    def generate_batch(self, requests: Sequence[GenerationRequest], call_id: str) -> list[GenerationResult]:
        """Several compatible requests in one batch (`BatchGenerator`), with the same progress and interrupts."""
        generator = self._batch_generator()
        if generator is None:
            raise TypeError(f"{type(self._generator).__name__} cannot generate batches")
        return self._run(
            call_id,
            lambda on_step, should_interrupt: generator.generate_batch(
                requests, on_step=on_step, should_interrupt=should_interrupt
            ),
        )

    def _batch_generator(self) -> BatchGenerator | None:
        """The generator as a `BatchGenerator` when it has that optional capability (the protocol is structural)."""
        generator = self._generator
        if hasattr(generator, "generate_batch") and hasattr(generator, "max_batch_size"):
            return cast(BatchGenerator, generator)
        return None

    def _run(self, call_id: str, call: Callable[[StepCallback, InterruptCheck], _T]) -> _T:
        with self._busy:
            self._forget_other_calls(call_id)
            try:
                return call(
                    lambda step, total, seconds: self._record_step(call_id, (step, total, seconds)),
                    lambda: call_id in self._interrupted,
                )
            finally:
                with self._lock:
                    self._interrupted.discard(call_id)

    def progress(self, call_id: str) -> list[Step]:
        """The steps of call `call_id` finished since the last poll (drained: each step is returned once)."""
        with self._lock:
            return self._steps.pop(call_id, [])

    def interrupt(self, call_id: str) -> None:
        with self._lock:
            self._interrupted.add(call_id)

    def _record_step(self, call_id: str, step: Step) -> None:
        with self._lock:
            self._steps.setdefault(call_id, []).append(step)

    def _forget_other_calls(self, call_id: str) -> None:
        """Drop what a driver that went away left behind (undrained steps, interrupts of finished calls)."""
        with self._lock:
            self._steps = {key: value for key, value in self._steps.items() if key == call_id}
            self._interrupted &= {call_id}

"""The `ray` executor: a `Generator` whose pipeline lives in a Ray actor on some GPU node of a cluster.

Each worker thread of the daemon gets one `RayGenerator`, a thin proxy to a named actor `i2vd-worker-N` (in
`executor.ray.namespace`) that holds a warm generator (`daemon.rayactor.GeneratorActor`). The worker loop, the
store, the queue and the error policy do not change: the proxy speaks the same `Generator` protocol.

Who decides what (as the distributed-engine study recommends: Ray Core actors, the shared folder as the only
durable job store, one claimer):
- The shared inbox's store is the only durable job state and the daemon its only claimer. Ray keeps no queue: one
  call per actor at a time, so the backlog stays on disk in priority order and nothing is lost when Ray is.
- Retries are the store's: actors run with `max_task_retries=0`. When an actor dies mid-job (process crash, OOM
  kill, node loss) the proxy raises `WorkerCrashed`, a `TransientJobError`, so the worker's policy re-queues the job
  and counts the attempt. Ray restarts the actor (`max_restarts`) on any node with a free GPU; the next call waits
  for it (and builds a new actor if Ray gave up on the old one).
- Finishing (ffmpeg variants, verification, manifest, the atomic publish into the outbox, archiving the inputs)
  stays on the claimer host, in the worker's finishing pool. That host has the shared folder and owns the journal;
  the publish rename and the done/failed moves must happen where the claim is held, and the frames that travel back
  through Ray's object store (about 12 MB for 512p x 16 frames) cost far less than a generation. GPU nodes only need
  the model, not the share.
- Actors are named and may be `detached`: a restarted daemon re-attaches to the warm actors (`get_if_exists`) and
  re-submits what it had claimed; an actor still busy with the old daemon's call finishes it first (one at a time),
  and the duplicate attempt is harmless because publishing is first-wins.

Progress and interrupts cross the process boundary by polling: while `generate` runs on the (threaded) actor, the
proxy polls `progress(call_id)` every `poll_seconds` to call `on_step`, and forwards `should_interrupt()` as
`interrupt(call_id)`; the actor's generator raises `JobInterrupted` between steps, which comes back as itself.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import structlog

from daemon.config import DaemonConfig, ModelConfig
from daemon.errors import FatalError, JobInterrupted, TransientJobError
from daemon.generate.base import (
    GenerationRequest,
    GenerationResult,
    Generator,
    InterruptCheck,
    ModelInfo,
    StepCallback,
    batch_key,
)
from daemon.rayactor import ActorState, GeneratorActor, GeneratorFactory

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = structlog.get_logger(__name__)

ACTOR_NAME_PREFIX = "i2vd-worker-"
ACTOR_CONCURRENCY = 4
"""Threads per actor: one generation, plus progress polls, interrupts, state and memory queries beside it."""


class WorkerCrashed(TransientJobError):
    """The Ray actor running this job died (process crash or node loss); the job will be retried."""


class ActorStartFailed(FatalError):
    """The generator actor could not load its model."""


def actor_name(index: int) -> str:
    return f"{ACTOR_NAME_PREFIX}{index}"


def load_model(model: ModelConfig) -> Generator:
    """The default actor factory: the configured model, loaded inside the actor (module-level, so it pickles)."""
    from daemon.generate import load_generator

    return load_generator(model)


@functools.cache
def _remote_actor_class() -> Any:
    import ray

    return ray.remote(GeneratorActor)


class RayGenerator:
    """A `Generator` backed by the named actor `name`; creating one creates or re-attaches to the actor and waits
    until its model is loaded (`info` is then known). Thread-compatible, not thread-safe: one per worker thread.

    It is also a `BatchGenerator`: `max_batch_size` is the actor's generator's answer, 1 when that generator cannot
    batch, so the worker batches through Ray exactly when it would locally."""

    def __init__(
        self,
        name: str,
        factory: GeneratorFactory,
        *,
        num_gpus: float = 1.0,
        max_restarts: int = 3,
        detached: bool = True,
        poll_seconds: float = 0.2,
        ready_timeout_seconds: float = 600.0,
        job_timeout_seconds: float | None = None,
    ) -> None:
        self.name = name
        self._factory = factory
        self._options: dict[str, Any] = {
            "name": name,
            "get_if_exists": True,
            "num_gpus": num_gpus,
            "max_restarts": max_restarts,
            "max_task_retries": 0,
            "max_concurrency": ACTOR_CONCURRENCY,
            "lifetime": "detached" if detached else None,
        }
        self._poll = poll_seconds
        self._ready_timeout = ready_timeout_seconds
        self._job_timeout = job_timeout_seconds
        self._batch_sizes: dict[tuple[int, int, int, int], int] = {}
        self._pid: int | None = None
        """The actor process that last answered; `_killed_pid`: one this proxy killed, not to be trusted."""
        self._killed_pid: int | None = None
        self._handle: ActorHandle[Any] = self._attach()
        try:
            self._info: ModelInfo = self._get(self._handle.info.remote(), ready_timeout_seconds)
        except Exception as exc:
            self._reraise(exc, "loading the model")
        log.info("ray_actor_ready", actor=name, model=self._info.model_id, device=self._info.device)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def state(self) -> ActorState:
        """Where the actor runs now (waits for a restarting actor)."""
        return self._wait_ready(None)

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        result: GenerationResult = self._call("generate", request, on_step, should_interrupt)
        return _with_own_frames(result)

    def max_batch_size(self, request: GenerationRequest) -> int:
        """The actor's answer (1 when its generator cannot batch), asked once per request shape."""
        key = batch_key(request)
        if key not in self._batch_sizes:
            self._wait_ready(None)
            try:
                self._batch_sizes[key] = int(
                    self._get(self._handle.max_batch_size.remote(request), self._ready_timeout)
                )
            except Exception as exc:
                self._reraise(exc, "sizing a batch")
        return self._batch_sizes[key]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> list[GenerationResult]:
        results: list[GenerationResult] = self._call("generate_batch", list(requests), on_step, should_interrupt)
        return [_with_own_frames(result) for result in results]

    def memory_stats(self) -> Mapping[str, int]:
        """The actor's device memory; empty when it cannot answer now (restarting, node lost): metrics only."""
        try:
            stats: dict[str, int] = self._get(self._handle.memory_stats.remote(), 10.0)
        except Exception as exc:
            log.warning("ray_memory_stats_unavailable", actor=self.name, error=str(exc))
            return {}
        return stats

    def _attach(self) -> ActorHandle[Any]:
        """The live actor of this name, or a new one (Ray frees the name of an actor that is dead for good)."""
        handle: ActorHandle[Any] = _remote_actor_class().options(**self._options).remote(self._factory)
        return handle

    def _call(
        self, method: str, payload: object, on_step: StepCallback | None, should_interrupt: InterruptCheck | None
    ) -> Any:
        """Call `method(payload, call_id)` on the actor once it is up, following it to its result."""
        self._wait_ready(should_interrupt)
        call_id = uuid.uuid4().hex
        try:
            return self._follow(
                getattr(self._handle, method).remote(payload, call_id), call_id, on_step, should_interrupt
            )
        except Exception as exc:
            self._reraise(exc, "generating")

    def _follow(
        self, ref: Any, call_id: str, on_step: StepCallback | None, should_interrupt: InterruptCheck | None
    ) -> Any:
        """Wait for the call, relaying its steps to `on_step` and an interrupt to the actor; enforce the timeout."""
        import ray

        started, interrupted = time.monotonic(), False
        while True:
            done, _ = ray.wait([ref], timeout=self._poll)
            self._relay_progress(call_id, on_step)
            if done:
                return ray.get(ref)
            if not interrupted and should_interrupt is not None and should_interrupt():
                self._handle.interrupt.remote(call_id)
                interrupted = True
            if self._job_timeout is not None and time.monotonic() - started > self._job_timeout:
                self._killed_pid = self._pid
                ray.kill(self._handle, no_restart=False)  # Ray restarts it; the next call waits for that
                raise WorkerCrashed(f"generation took longer than {self._job_timeout:g} s; the actor was restarted")

    def _relay_progress(self, call_id: str, on_step: StepCallback | None) -> None:
        if on_step is None:
            return
        for step, total, seconds in self._get(self._handle.progress.remote(call_id), 60.0):
            on_step(step, total, seconds)

    def _wait_ready(self, should_interrupt: InterruptCheck | None) -> ActorState:
        """Block until the actor answers: a restarting actor (after a crash or a node loss) takes a model load.

        An actor this proxy killed (job timeout) may still answer for a moment, since `ray.kill` is asynchronous;
        its pid is remembered and its answers do not count."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        deadline = time.monotonic() + self._ready_timeout
        while True:
            ref: Any = self._handle.state.remote()
            try:
                while not ray.wait([ref], timeout=self._poll)[0]:
                    if should_interrupt is not None and should_interrupt():
                        raise JobInterrupted("interrupted while waiting for the Ray actor to restart")
                    self._check_deadline(deadline)
                state: ActorState = ray.get(ref)
                if state.pid != self._killed_pid:
                    self._pid, self._killed_pid = state.pid, None
                    return state
            except ActorUnavailableError:
                pass
            except ActorDiedError as exc:
                if exc.actor_init_failed:
                    raise WorkerCrashed(f"Ray actor {self.name} failed to load its model: {exc}") from exc
                log.warning("ray_actor_dead", actor=self.name, error=str(exc).splitlines()[0])
                self._handle = self._attach()
            time.sleep(self._poll)
            self._check_deadline(deadline)

    def _check_deadline(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise WorkerCrashed(f"Ray actor {self.name} did not come back in {self._ready_timeout:g} s")

    def _reraise(self, exc: Exception, doing: str) -> NoReturn:
        translated = self._translate(exc, doing)
        if translated is exc:
            raise exc
        raise translated from exc

    def _translate(self, exc: Exception, doing: str) -> Exception:
        """Ray's errors in the protocol's terms: the job's own error as itself, a dead actor as `WorkerCrashed`."""
        from ray.exceptions import ActorDiedError, GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

        if isinstance(exc, RayTaskError):
            cause = exc.cause
            return cause if isinstance(cause, Exception) else exc
        if isinstance(exc, ActorDiedError) and exc.actor_init_failed:
            return ActorStartFailed(f"Ray actor {self.name} failed while {doing}: {exc}")
        if isinstance(exc, RayActorError | ObjectLostError | GetTimeoutError):
            log.warning("ray_actor_lost", actor=self.name, doing=doing, error=str(exc).splitlines()[0])
            return WorkerCrashed(f"Ray actor {self.name} was lost while {doing}: {str(exc).splitlines()[0]}")
        return exc

    @staticmethod
    def _get(ref: Any, timeout: float) -> Any:
        import ray

        return ray.get(ref, timeout=timeout)


def _with_own_frames(result: GenerationResult) -> GenerationResult:
    """Copy frames out of Ray's object store: there they are read-only and pin shared memory while referenced."""
    if result.frames.flags.writeable:
        return result
    from dataclasses import replace

    return replace(result, frames=np.array(result.frames, copy=True))


def make_ray_generator_factories(
    config: DaemonConfig, factory: GeneratorFactory | None = None
) -> list[Callable[[], Generator]]:
    """One generator factory per `executor.ray.workers`; factory N creates or re-attaches to actor `i2vd-worker-N`.

    Contract: call `daemon.rayconnect.connect(config.executor.ray)` first. Calling a factory blocks until that
    actor's model is loaded (a new actor may wait for a free GPU; `ActorStartFailed` if the model cannot load) and
    returns a `RayGenerator` for one worker thread. The actors load `config.model` with `daemon.generate`'s
    loader unless `factory` (a picklable zero-argument callable, e.g. for tests) says otherwise. Calls are timed out
    after `worker.job_timeout_seconds` (the actor is then restarted and the job retried).
    """
    ray_config = config.executor.ray
    build: GeneratorFactory = factory if factory is not None else functools.partial(load_model, config.model)

    def factory_for(index: int) -> Callable[[], Generator]:
        def make() -> Generator:
            return RayGenerator(
                actor_name(index),
                build,
                num_gpus=ray_config.num_gpus_per_worker,
                max_restarts=ray_config.max_restarts,
                detached=ray_config.detached,
                job_timeout_seconds=config.worker.job_timeout_seconds,
            )

        return make

    return [factory_for(index) for index in range(ray_config.workers)]


__all__ = ["ActorStartFailed", "RayGenerator", "WorkerCrashed", "actor_name", "make_ray_generator_factories"]

"""Where generation runs: one worker slot per device of this host (`local`), or Ray actors (`ray`).

Every slot becomes one worker thread in the service, all taking from the one priority queue, so the queue's order
holds across devices and a slow or dead device never holds jobs hostage: a job waits in the queue, not behind a
particular GPU. What differs between executors is only how a slot's `Generator` is built:

- `local` + `isolation: process` (default): a `ProcessGenerator` per slot, its child pinned to one GPU with
  `CUDA_VISIBLE_DEVICES` (so inside the child the model is on `cuda`, device 0) and keeping its own warm pipeline;
  a child that dies is restarted and its job retried (`daemon.genproc`).
- `local` + `isolation: thread`: the model loads in the daemon's own process on `cuda:N` (no crash isolation;
  for debugging and for tests of the threads).
- `ray`: `daemon.raygen` builds one generator per Ray actor; Ray places the actors on GPUs and restarts them.

Devices are found without importing torch or touching CUDA in the daemon process (a parent that initialises CUDA
cannot safely fork, and the import costs seconds): `CUDA_VISIBLE_DEVICES` if set, else the `/dev/nvidiaN` nodes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import DaemonConfig
from daemon.errors import ConfigError, DeviceUnavailable
from daemon.generate import load_generator
from daemon.generate.base import Generator
from daemon.genproc import ChildSettings, ProcessGenerator

GeneratorFactory = Callable[[], Generator]


@dataclass(frozen=True)
class WorkerSlot:
    """One worker: a name for logs and metrics, the device it owns, and the environment its process gets."""

    name: str
    device: str
    """`cpu` or `cuda:N` (the physical index on this host), the `device` label of per-device metrics."""
    env: Mapping[str, str] = field(default_factory=dict)


def visible_cuda_devices(dev: Path = Path("/dev")) -> list[str]:
    """CUDA device ids this process may use: `CUDA_VISIBLE_DEVICES` if set, else one per `/dev/nvidiaN` node."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [item.strip() for item in visible.split(",") if item.strip() and item.strip() != "-1"]
    try:
        names = [entry.name for entry in dev.iterdir()]
    except OSError:
        return []
    return sorted((match.group(1) for name in names if (match := re.fullmatch(r"nvidia(\d+)", name))), key=int)


def plan_local_slots(
    config: DaemonConfig, cuda_devices: Callable[[], list[str]] = visible_cuda_devices
) -> list[WorkerSlot]:
    """The worker slots of the `local` executor, from `executor.devices` and `model.device`."""
    settings = config.executor
    wanted = config.model.device
    if settings.devices != "auto":
        devices = ["cpu" if item == "cpu" else _cuda_id(item) for item in settings.devices]
    elif wanted == "cpu":
        devices = ["cpu"]
    elif wanted.startswith("cuda:"):
        devices = [wanted.removeprefix("cuda:")]
    else:
        devices = cuda_devices() or ["cpu"]
        if wanted == "cuda" and devices == ["cpu"]:
            raise DeviceUnavailable("model.device is 'cuda' but no CUDA device is visible (CUDA_VISIBLE_DEVICES, /dev)")
    per_device = settings.workers_per_device
    cpu_workers = per_device * devices.count("cpu")
    threads = str(max(1, (os.cpu_count() or 1) // max(1, cpu_workers)))
    slots: list[WorkerSlot] = []
    for device in devices:
        for _ in range(per_device):
            name = f"w{len(slots)}"
            if device == "cpu":
                env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads}
                slots.append(WorkerSlot(name, "cpu", env))
            else:
                slots.append(WorkerSlot(name, f"cuda:{device}", {"CUDA_VISIBLE_DEVICES": device}))
    return slots


def _cuda_id(item: str) -> str:
    value = item.removeprefix("cuda:")
    if not value.isdigit():
        raise ConfigError(f"executor.devices: {item!r} is not 'cpu', a CUDA index or 'cuda:N'")
    return value


def local_generator_factory(config: DaemonConfig, slot: WorkerSlot) -> GeneratorFactory:
    """How the `local` executor builds the generator of `slot` (called in a thread at start; may take minutes)."""
    if config.executor.isolation == "thread":
        model = config.model.model_copy(update={"device": slot.device})
        return functools.partial(load_generator, model)
    in_child = "cpu" if slot.device == "cpu" else "cuda"  # the child sees only its own GPU, as cuda:0
    model = config.model.model_copy(update={"device": in_child})
    settings = ChildSettings(
        name=slot.name,
        device_label=slot.device,
        env=slot.env,
        log_level=config.logging.level,
        log_format=config.logging.format,
    )
    return functools.partial(
        ProcessGenerator,
        functools.partial(load_generator, model),
        settings,
        job_timeout_seconds=config.worker.job_timeout_seconds,
    )


def plan_generators(config: DaemonConfig) -> list[tuple[WorkerSlot, GeneratorFactory]]:
    """One (slot, factory) per worker for the configured executor."""
    if config.executor.kind == "ray":
        from daemon.rayconnect import connect
        from daemon.raygen import make_ray_generator_factories

        connect(config.executor.ray)
        factories = make_ray_generator_factories(config)
        return [(WorkerSlot(f"ray{index}", f"ray:{index}"), factory) for index, factory in enumerate(factories)]
    return [(slot, local_generator_factory(config, slot)) for slot in plan_local_slots(config)]


def close_generator(generator: Generator, *, force: bool = False) -> None:
    """Stop a generator's process or actor handle if it has one (in-process generators have nothing to stop)."""
    if isinstance(generator, ProcessGenerator):
        if force:
            generator.kill()
        else:
            generator.close()
        return
    closer = getattr(generator, "close", None)
    if callable(closer):
        closer()

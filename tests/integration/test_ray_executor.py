"""The Ray executor on a local Ray with two logical GPUs: placement, progress, interrupts, crashes, re-attach.

This machine has no GPU: Ray is started with `num_gpus=2` logical GPUs, which Ray schedules and pins
(`CUDA_VISIBLE_DEVICES`) exactly as real ones. Most tests inject the fast fake generator of `raysupport.py` into the
actors; `test_the_real_tiny_model_runs_in_an_actor` loads the embedded tiny diffusers model inside one. One local
Ray is shared by the module (starting it takes seconds); each test removes the actors it made.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from raysupport import FakeFactory, Harness, failing_factory, ray_auth_env, render_frames, share_with_ray

from daemon.config import RayConfig, load_config
from daemon.errors import JobInterrupted
from daemon.generate.base import GenerationRequest
from daemon.rayconnect import connect, disconnect
from daemon.raygen import ActorStartFailed, RayGenerator, WorkerCrashed, load_model, make_ray_generator_factories

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration]

NAMESPACE = "i2vd-test"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A private local Ray with 2 CPUs and 2 logical GPUs; yields its GCS address (for a second driver)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ray_auth_env().items():
            patch.setenv(key, value)
        try:
            assert connect(
                RayConfig(namespace=NAMESPACE), num_cpus=2, num_gpus=2, object_store_memory=128 * 1024 * 1024
            )
            assert not connect(RayConfig(namespace=NAMESPACE)), "a second connect leaves the first connection alone"
            share_with_ray()
            yield ray.get_runtime_context().gcs_address
        finally:
            disconnect()


@pytest.fixture
def fresh_actors(local_ray: str) -> Iterator[None]:
    """Every named actor a test made is killed afterwards, so the two GPUs are free for the next test."""
    yield
    for entry in ray.util.list_named_actors(all_namespaces=True):
        with contextlib.suppress(ValueError):  # it died between the listing and the lookup: nothing to kill
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))


@pytest.fixture
def factory(tmp_path: Path) -> FakeFactory:
    return FakeFactory(tmp_path / "loads.txt")


def request(make_image: Callable[..., Path], steps: int = 3, seed: int = 7) -> GenerationRequest:
    from PIL import Image

    with Image.open(make_image("in.png", size=(80, 64))) as image:
        image.load()
        return GenerationRequest(image.copy(), "a cat", "", 64, 48, 5, 16, steps, 9.0, seed)


def test_two_workers_are_placed_on_their_own_gpus(fresh_actors: None, factory: FakeFactory, tmp_path: Path) -> None:
    config = load_config(None, {"inbox": tmp_path / "in", "outbox": tmp_path / "out"})
    config = config.model_copy(
        update={"executor": config.executor.model_copy(update={"kind": "ray", "ray": RayConfig(workers=2)})}
    )
    factories = make_ray_generator_factories(config, factory)
    generators = [make() for make in factories]
    states = [generator.state() for generator in generators]  # type: ignore[attr-defined]
    assert [generator.name for generator in generators] == ["i2vd-worker-0", "i2vd-worker-1"]  # type: ignore[attr-defined]
    assert sorted(state.gpu_ids for state in states) == [("0",), ("1",)]
    assert all(state.cuda_visible_devices == state.gpu_ids[0] for state in states)
    assert len({state.pid for state in states}) == 2
    assert generators[0].info.model_id == "fake" and generators[0].memory_stats()["total"] == 4


def test_steps_and_frames_come_back_from_the_actor(
    fresh_actors: None, factory: FakeFactory, make_image: Callable[..., Path]
) -> None:
    generator = RayGenerator("progress", FakeFactory(factory.loads_file, step_seconds=0.05), poll_seconds=0.02)
    job = request(make_image, steps=6)
    steps: list[tuple[int, int]] = []
    result = generator.generate(job, on_step=lambda step, total, seconds: steps.append((step, total)))
    assert steps == [(step, 6) for step in range(1, 7)]
    assert result.frames.shape == (5, 48, 64, 3) and result.frames.flags.writeable
    assert (result.frames == render_frames(job)).all()


def test_batches_go_through_when_the_actors_generator_can_batch(
    fresh_actors: None, factory: FakeFactory, make_image: Callable[..., Path]
) -> None:
    plain = RayGenerator("plain", factory)
    assert plain.max_batch_size(request(make_image)) == 1
    batching = RayGenerator("batching", FakeFactory(factory.loads_file, batch=3), poll_seconds=0.02)
    jobs = [request(make_image, steps=4, seed=seed) for seed in (1, 2)]
    assert batching.max_batch_size(jobs[0]) == 3
    steps: list[int] = []
    results = batching.generate_batch(jobs, on_step=lambda step, total, seconds: steps.append(step))
    assert steps == [1, 2, 3, 4]
    for result, job in zip(results, jobs, strict=True):
        assert (result.frames == render_frames(job)).all() and result.frames.flags.writeable


def test_an_interrupt_reaches_the_actor_between_steps(
    fresh_actors: None, factory: FakeFactory, make_image: Callable[..., Path]
) -> None:
    slow = FakeFactory(factory.loads_file, step_seconds=0.1)
    generator = RayGenerator("interrupt", slow, poll_seconds=0.02, detached=False)
    steps: list[int] = []
    with pytest.raises(JobInterrupted):
        generator.generate(
            request(make_image, steps=50),
            on_step=lambda step, total, seconds: steps.append(step),
            should_interrupt=lambda: len(steps) >= 2,
        )
    assert 2 <= len(steps) < 10
    # The actor is free again: the next call runs to the end.
    assert generator.generate(request(make_image, steps=2)).frames.shape[0] == 5


@pytest.mark.slow
def test_an_actor_crash_is_retried_through_the_worker_and_the_job_finishes(
    fresh_actors: None, factory: FakeFactory, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    crashing = FakeFactory(factory.loads_file, crash_marker=tmp_path / "crashed")
    generator = RayGenerator("crash", crashing, max_restarts=2)
    first_pid = generator.state().pid
    harness = Harness(tmp_path, generator)
    job = harness.claim(make_image, "crash", "prompt: survive a crash\nvariants: []\n")
    assert harness.run_until_settled(job) == ["retried", "succeeded"]
    [manifest] = [json.loads(path.read_text()) for path in harness.config.outbox.glob("video_*.json")]
    assert manifest["attempts"] == 2
    assert (harness.config.state_path / "done" / job.job_id).is_dir()
    assert (tmp_path / "crashed").read_text() == str(first_pid)
    assert generator.state().pid != first_pid
    assert len(crashing.loads()) == 2, "Ray restarted the actor, which loaded the model again"


def test_an_actor_dead_for_good_is_replaced_by_the_next_call(
    fresh_actors: None, factory: FakeFactory, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    crashing = FakeFactory(factory.loads_file, crash_marker=tmp_path / "crashed")
    generator = RayGenerator("no-restarts", crashing, max_restarts=0, poll_seconds=0.05)
    with pytest.raises(WorkerCrashed, match="no-restarts"):
        generator.generate(request(make_image))
    assert generator.generate(request(make_image)).frames.shape[0] == 5
    assert len(crashing.loads()) == 2


def test_a_model_that_cannot_load_is_reported_at_once(fresh_actors: None) -> None:
    started = time.perf_counter()
    with pytest.raises(ActorStartFailed, match="model directory /srv/models/missing does not exist"):
        RayGenerator("broken", failing_factory, max_restarts=3)
    assert time.perf_counter() - started < 30, "an actor whose __init__ raises is not restarted"


def test_a_call_past_the_job_timeout_restarts_the_actor(
    fresh_actors: None, factory: FakeFactory, make_image: Callable[..., Path]
) -> None:
    slow = FakeFactory(factory.loads_file, step_seconds=0.2)
    generator = RayGenerator("timeout", slow, job_timeout_seconds=0.5, poll_seconds=0.05)
    first_pid = generator.state().pid
    with pytest.raises(WorkerCrashed, match=r"longer than 0\.5 s"):
        generator.generate(request(make_image, steps=50))
    assert generator.state().pid != first_pid


def test_a_second_proxy_reuses_the_warm_actor(fresh_actors: None, factory: FakeFactory) -> None:
    first = RayGenerator("warm", factory)
    second = RayGenerator("warm", factory)
    assert first.state().pid == second.state().pid
    assert len(factory.loads()) == 1


@pytest.mark.slow
def test_a_restarted_daemon_reattaches_to_its_detached_actor(
    fresh_actors: None, local_ray: str, factory: FakeFactory, tmp_path: Path
) -> None:
    """The first driver is another process that exits, as a stopped daemon does; its detached actor lives on."""
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from raysupport import FakeFactory, share_with_ray
from daemon.config import RayConfig
from daemon.raygen import RayGenerator
from daemon.rayconnect import connect
connect(RayConfig(address={local_ray!r}, namespace={NAMESPACE!r}))
share_with_ray()
print(RayGenerator("i2vd-worker-0", FakeFactory(Path({str(factory.loads_file)!r})), detached=True).state().pid)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first_pid = int(done.stdout.split()[-1])
    reattached = RayGenerator("i2vd-worker-0", factory, detached=True)
    assert reattached.state().pid == first_pid
    assert factory.loads() == [first_pid]


@pytest.mark.slow
def test_the_real_tiny_model_runs_in_an_actor(
    fresh_actors: None, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    model = load_config(None).model.model_copy(update={"cache_dir": tmp_path / "cache", "device": "cpu"})
    started = time.perf_counter()
    from functools import partial

    generator = RayGenerator("tiny", partial(load_model, model), num_gpus=0)
    assert generator.info.model_id == "embedded-tiny" and generator.info.device == "cpu"
    harness = Harness(tmp_path, generator)
    job = harness.claim(make_image, "tiny", "prompt: a tiny real model\nseed: 3\nvariants: []\n")
    assert harness.run_until_settled(job) == ["succeeded"]
    [manifest] = [json.loads(path.read_text()) for path in harness.config.outbox.glob("video_*.json")]
    assert manifest["seed"] == 3 and manifest["attempts"] == 1
    assert time.perf_counter() - started < 200


@pytest.mark.slow
def test_the_service_runs_jobs_on_ray_actors_end_to_end(
    local_ray: str, fresh_actors: None, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    """`executor.kind: ray` through the whole service: the real tiny model in a Ray actor, the claim/publish
    protocol on this host, one published job with a manifest, per-worker metrics labelled with the actor slot."""
    from daemon.config import DaemonConfig
    from daemon.service import Service
    from daemon.systemd import SystemdNotifier

    base = load_config(None, {"inbox": tmp_path / "inbox", "outbox": tmp_path / "outbox"})
    data = base.model_dump()
    data["generation"]["defaults"].update({"resolution": None, "width": 64, "height": 64, "num_frames": 8, "steps": 2})
    data["intake"].update({"stable_seconds": 0.0, "rescan_seconds": 0.2})
    data["metrics"].update({"enabled": False})
    data["model"].update({"device": "cpu", "cache_dir": tmp_path / "cache"})
    data["executor"] = {"kind": "ray", "ray": {"namespace": NAMESPACE, "workers": 1, "detached": False}}
    config = DaemonConfig(**data)
    config.inbox.mkdir(parents=True)
    service = Service(config, notifier=SystemdNotifier(None))
    service.start()
    try:
        make_image("cat.png", size=(80, 64), directory=config.inbox)
        (config.inbox / "cat.yaml").write_text("prompt: a cat\nvariants: [first_frame]\n")
        deadline = time.monotonic() + 240
        while not list(config.outbox.glob("video_*.json")):
            assert time.monotonic() < deadline, "no manifest published"
            time.sleep(0.2)
        [manifest_path] = config.outbox.glob("video_*.json")
        manifest = json.loads(manifest_path.read_text())
        assert "embedded-tiny" in json.dumps(manifest["model"])
        assert len(manifest["outputs"]) == 2
        value = service.metrics.registry.get_sample_value(
            "i2vd_worker_jobs_total", {"worker": "ray0", "outcome": "succeeded"}
        )
        assert value == 1
    finally:
        service.request_stop()
        service.stop(timeout=30)

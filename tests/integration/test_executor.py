"""The `local` executor: slots per device, several worker processes on one queue, crashes and poison jobs.

Worker processes here run the instant fake generator of `tests/fake_generators.py` (monkeypatched in place of
`load_generator`, and picked up by the spawned children because the loader is pickled by reference), so the tests
exercise real processes, real queue, store, ffmpeg and publication without paying for a model per process. GPUs are
simulated at the module boundary (`CUDA_VISIBLE_DEVICES`, a fake /dev directory): this machine has none.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fake_generators
import pytest

from daemon import executor
from daemon.config import DaemonConfig, load_config
from daemon.errors import ConfigError, DeviceUnavailable
from daemon.executor import plan_local_slots, visible_cuda_devices
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.service import Service
from daemon.store import ClaimedJob, JobStore
from daemon.systemd import SystemdNotifier
from daemon.worker import Worker

pytestmark = pytest.mark.integration


def config_for(root: Path, **sections: dict[str, Any]) -> DaemonConfig:
    base = load_config(None, {"inbox": root / "inbox", "outbox": root / "outbox"})
    data = base.model_dump()
    data["generation"]["defaults"].update({"resolution": None, "width": 64, "height": 64, "num_frames": 8, "steps": 3})
    data["intake"].update({"stable_seconds": 0.0, "rescan_seconds": 0.2})
    data["worker"].update({"retry_delay_seconds": 0.0})
    data["metrics"].update({"enabled": False})
    data["model"].update({"device": "cpu"})
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return DaemonConfig(**data)


# ----- slot planning ----------------------------------------------------------------------------------------
def test_auto_devices_follow_cuda_visible_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    config = config_for(tmp_path, model={"device": "auto"})
    slots = plan_local_slots(config)
    assert [(s.name, s.device, dict(s.env)) for s in slots] == [
        ("w0", "cuda:2", {"CUDA_VISIBLE_DEVICES": "2"}),
        ("w1", "cuda:3", {"CUDA_VISIBLE_DEVICES": "3"}),
    ]


def test_auto_devices_count_dev_nvidia_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "nvidia10"):
        (dev / name).touch()
    assert visible_cuda_devices(dev) == ["0", "1", "10"]


def test_cpu_slots_split_the_cores_and_explicit_lists_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor.os, "cpu_count", lambda: 8)
    slots = plan_local_slots(config_for(tmp_path, executor={"devices": ["cpu"], "workers_per_device": 2}))
    assert [(s.device, s.env["OMP_NUM_THREADS"]) for s in slots] == [("cpu", "4"), ("cpu", "4")]
    mixed = plan_local_slots(config_for(tmp_path, executor={"devices": ["cuda:1", "0"]}))
    assert [s.device for s in mixed] == ["cuda:1", "cuda:0"]
    with pytest.raises(ConfigError, match="not 'cpu'"):
        plan_local_slots(config_for(tmp_path, executor={"devices": ["gpu0"]}))


def test_cuda_asked_but_none_visible_is_fatal_but_not_a_config_error(tmp_path: Path) -> None:
    """No GPU where the config asks for one may be a driver that loads late at boot: exit 1 (systemd starts the
    daemon again later), not 78 (a configuration error, which the unit never restarts)."""
    with pytest.raises(DeviceUnavailable, match="no CUDA device") as caught:
        plan_local_slots(config_for(tmp_path, model={"device": "cuda"}), cuda_devices=list)
    assert not isinstance(caught.value, ConfigError)


# ----- the service with several worker processes --------------------------------------------------------------
@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    monkeypatch.setattr(executor, "load_generator", fake_generators.load_fake)

    def behave(spec: str) -> None:
        monkeypatch.setenv("I2VD_TEST_FAKE", spec)

    return behave


@pytest.fixture
def running() -> Iterator[Callable[[DaemonConfig], Service]]:
    services: list[Service] = []

    def start(config: DaemonConfig) -> Service:
        service = Service(config, notifier=SystemdNotifier(None))
        service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        service.request_stop()
        service.stop(timeout=10)


def drop(inbox: Path, make_image: Callable[..., Path], stem: str, extra: str = "") -> None:
    make_image(f"{stem}.png", size=(80, 64), directory=inbox)
    (inbox / f"{stem}.yaml.part").write_text(f"prompt: {stem}\nvariants: []\n{extra}")
    (inbox / f"{stem}.yaml.part").rename(inbox / f"{stem}.yaml")


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def published(config: DaemonConfig) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(config.outbox.glob("video_*.json"))]


def sample(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.slow
def test_two_cpu_worker_processes_share_the_queue(
    tmp_path: Path, make_image: Callable[..., Path], fake_model: Callable[[str], None], running: Any
) -> None:
    fake_model("ok::0.05")
    config = config_for(tmp_path, executor={"devices": ["cpu", "cpu"]})
    config.inbox.mkdir(parents=True)
    service = running(config)
    pids = {view.generator.pid for view in service.pool.views()}  # type: ignore[attr-defined]
    assert len(pids) == 2
    for index in range(8):
        drop(config.inbox, make_image, f"job{index}")
    wait_until(lambda: len(published(config)) == 8)

    def per_worker() -> list[float]:
        return [sample(service, "i2vd_worker_jobs_total", worker=w, outcome="succeeded") for w in ("w0", "w1")]

    # The counters move just after the manifest appears (publication first, bookkeeping after): wait for them.
    wait_until(lambda: sum(per_worker()) == 8)
    assert min(per_worker()) >= 1, per_worker()
    assert sorted(m["input"]["image"] for m in published(config)) == sorted(f"job{i}.png" for i in range(8))
    assert sample(service, "i2vd_worker_up", worker="w1", device="cpu") == 1


@pytest.mark.slow
def test_a_crashing_worker_process_costs_one_attempt(
    tmp_path: Path, make_image: Callable[..., Path], fake_model: Callable[[str], None], running: Any
) -> None:
    """C21 (once): the process dies on the first job; it is restarted and the job published with attempts=2."""
    fake_model(f"crash_once:{tmp_path / 'marker'}")
    config = config_for(tmp_path)
    config.inbox.mkdir(parents=True)
    service = running(config)
    drop(config.inbox, make_image, "first")
    wait_until(lambda: len(published(config)) == 1)
    assert published(config)[0]["attempts"] == 2
    assert sample(service, "i2vd_worker_restarts_total", worker="w0", device="cpu") == 1


@pytest.mark.slow
def test_a_poison_job_goes_to_failed_and_the_next_job_is_not_blocked(
    tmp_path: Path, make_image: Callable[..., Path], fake_model: Callable[[str], None], running: Any
) -> None:
    """C21: the process dies on every attempt of one job -> failed/ after max_attempts with its history; a job
    dropped behind it is published (no head-of-line blocking)."""
    fake_model("crash_on_poison")
    config = config_for(tmp_path, worker={"retry_delay_seconds": 0.5, "max_attempts": 3})
    config.inbox.mkdir(parents=True)
    service = running(config)
    drop(config.inbox, make_image, "poison")
    time.sleep(0.3)
    drop(config.inbox, make_image, "after")
    wait_until(lambda: (config.inbox / "failed" / "poison" / "reason.json").exists())
    wait_until(lambda: len(published(config)) == 1)
    assert published(config)[0]["input"]["image"] == "after.png"
    reason = json.loads((config.inbox / "failed" / "poison" / "reason.json").read_text())
    assert reason["reason"] == "retries_exhausted" and reason["attempts"] == 3
    assert "exited with status 3" in json.dumps(reason)
    assert sample(service, "i2vd_worker_restarts_total", worker="w0", device="cpu") == 3
    # The reconciliation identity of the metrics: every received pair is in exactly one state.
    received = sample(service, "i2vd_jobs_received_total")
    terminal = sum(
        sample(service, "i2vd_jobs_total", outcome=o) for o in ("succeeded", "failed", "rejected", "cancelled")
    )
    assert received == 2
    assert received == terminal + sample(service, "i2vd_jobs_in_progress") + sample(service, "i2vd_jobs_pending")


@pytest.mark.slow
def test_a_hung_job_times_out_and_is_retried(
    tmp_path: Path, make_image: Callable[..., Path], fake_model: Callable[[str], None], running: Any
) -> None:
    """C23: a step that never returns -> the per-job timeout kills the process; the retry publishes the job; the
    service stays alive (the watchdog condition `alive()` holds throughout)."""
    fake_model(f"hang_once:{tmp_path / 'marker'}")
    config = config_for(tmp_path, worker={"job_timeout_seconds": 2.0})
    config.inbox.mkdir(parents=True)
    service = running(config)
    drop(config.inbox, make_image, "hangs")
    seen_alive = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen_alive.append(service.alive())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_until(lambda: len(published(config)) == 1)
    stop.set()
    watcher.join()
    assert published(config)[0]["attempts"] == 2
    assert all(seen_alive)


def test_compatible_queued_jobs_are_generated_as_one_batch(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """Batching: three queued jobs of one shape and one of another -> a batch of 3 and a single, each job with
    its own seed and outputs; priority order holds inside the batch."""
    from daemon.intake import Intake

    config = config_for(tmp_path)
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    queue: JobQueue[ClaimedJob] = JobQueue()
    for index, extra in enumerate(["seed: 1\n", "seed: 2\n", "seed: 3\nnum_frames: 10\n", "seed: 4\n"]):
        drop(config.inbox, make_image, f"b{index}", extra)
    for job in sorted(Intake(config, store).poll().accepted, key=lambda j: j.stem):
        queue.put(job, priority=0, sequence=job.sequence)
    generator = fake_generators.BatchingGenerator(limit=4)
    metrics = DaemonMetrics()
    worker = Worker(config, generator, store, queue, metrics, interrupt=threading.Event())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: len(published(config)) == 4, 60)
    queue.close()
    thread.join(30)
    assert generator.batches == [3]  # the fourth job, of another shape, went through generate() alone
    assert generator.calls == 4
    seeds = {m["input"]["image"]: m["used"]["seed"] for m in published(config)}
    assert seeds == {"b0.png": 1, "b1.png": 2, "b2.png": 3, "b3.png": 4}


def test_a_backlog_larger_than_the_finishing_room_loses_no_job(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """Regression (found by bench/gpu_daemon.py: 10 jobs with max_batch_size 4 hung with 3 jobs claimed and out of
    the queue): when the queue hands out more companions than the finishing backlog has room for, every companion
    without room goes back into the queue, not only the first of them. Finishing room here is 2 jobs
    (1 finishing thread + backlog 1), so batches hold at most 2 of the 10 jobs, and all 10 are published."""
    from daemon.intake import Intake

    config = config_for(tmp_path, encode={"max_concurrent_ffmpeg": 1, "finishing_backlog": 1})
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    queue: JobQueue[ClaimedJob] = JobQueue()
    for index in range(10):
        drop(config.inbox, make_image, f"q{index}", f"seed: {index}\n")
    for job in sorted(Intake(config, store).poll().accepted, key=lambda j: j.stem):
        queue.put(job, priority=0, sequence=job.sequence)
    generator = fake_generators.BatchingGenerator(limit=4)
    worker = Worker(config, generator, store, queue, DaemonMetrics(), interrupt=threading.Event())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: len(published(config)) == 10, 60)
    queue.close()
    thread.join(30)
    assert not thread.is_alive()
    assert generator.calls == 10 and all(size <= 2 for size in generator.batches)
    assert sorted(m["used"]["seed"] for m in published(config)) == list(range(10))
    assert list((config.inbox / ".i2vd" / "jobs").iterdir()) == []  # nothing left claimed


def run_backlog(config: DaemonConfig, make_image: Callable[..., Path], count: int) -> DaemonMetrics:
    """`count` jobs queued before one worker starts, generated one at a time; returns the worker's metrics."""
    from daemon.intake import Intake

    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    queue: JobQueue[ClaimedJob] = JobQueue()
    for index in range(count):
        drop(config.inbox, make_image, f"g{index}", f"seed: {index}\n")
    for job in sorted(Intake(config, store).poll().accepted, key=lambda j: j.stem):
        queue.put(job, priority=0, sequence=job.sequence)
    metrics = DaemonMetrics()
    worker = Worker(config, fake_generators.make_instant(), store, queue, metrics, interrupt=threading.Event())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: len(published(config)) == count, 60)
    queue.close()
    thread.join(30)
    assert not thread.is_alive()
    return metrics


def idle(metrics: DaemonMetrics, sample: str) -> float:
    value = metrics.registry.get_sample_value(f"i2vd_generator_idle_seconds_{sample}", {"worker": "w0"})
    assert value is not None
    return value


def test_the_generator_idle_time_under_a_backlog_is_measured(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """`i2vd_generator_idle_seconds`: one gap per generation that had a job waiting when the one before it ended
    (4 jobs: 3 gaps). With one finishing thread and no finishing backlog the worker cannot generate the next video
    before the last one is published, so each gap holds at least the job before's encode and variants."""
    serial = config_for(
        tmp_path, worker={"max_batch_size": 1}, encode={"max_concurrent_ffmpeg": 1, "finishing_backlog": 0}
    )
    metrics = run_backlog(serial, make_image, 4)
    assert idle(metrics, "count") == 3
    manifests = sorted(published(serial), key=lambda m: m["input"]["image"])
    finishing = [m["timings_seconds"]["encode"] + m["timings_seconds"]["variants"] for m in manifests]
    assert all(seconds > 0 for seconds in finishing)
    assert idle(metrics, "sum") >= sum(finishing[:-1])


def test_a_waiting_job_that_goes_elsewhere_ends_the_idle_gap(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """Job B waits when A's generation ends, but is gone (another worker took it) before this worker looks again:
    the wait that follows is for work, not a gap of the daemon's, so C's generation records none."""
    from daemon.intake import Intake

    config = config_for(
        tmp_path, worker={"max_batch_size": 1}, encode={"max_concurrent_ffmpeg": 1, "finishing_backlog": 0}
    )
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    queue: JobQueue[ClaimedJob] = JobQueue()
    for stem in ("a", "b", "c"):
        drop(config.inbox, make_image, stem, f"seed: {ord(stem)}\n")
    jobs = {job.stem: job for job in Intake(config, store).poll().accepted}
    for stem in ("a", "b"):
        queue.put(jobs[stem], priority=0, sequence=jobs[stem].sequence)
    metrics = DaemonMetrics()
    worker = Worker(config, fake_generators.make_instant(), store, queue, metrics, interrupt=threading.Event())
    room = worker._backlog  # the finishing room the loop waits for before it looks at the queue again
    taken: list[ClaimedJob] = []

    class ElsewhereMeanwhile:
        """The worker's second wait for the finishing room comes right after A's generation, B still queued:
        B is taken away there, as another worker would take it."""

        def __init__(self) -> None:
            self.waits = 0

        def acquire(self, *args: Any, **kwargs: Any) -> bool:
            got = room.acquire(*args, **kwargs)
            self.waits += 1
            if self.waits == 2:
                taken.extend(queue.remove(lambda job: True))
            return got

        def release(self) -> None:
            room.release()

    worker._backlog = ElsewhereMeanwhile()  # type: ignore[assignment]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: [job.stem for job in taken] == ["b"], 60)
    time.sleep(0.3)  # this worker waits for work meanwhile
    queue.put(jobs["c"], priority=0, sequence=jobs["c"].sequence)
    wait_until(lambda: len(published(config)) == 2, 60)
    queue.close()
    thread.join(30)
    assert not thread.is_alive()
    assert sorted(m["input"]["image"] for m in published(config)) == ["a.png", "c.png"]
    assert idle(metrics, "count") == 0


def test_no_idle_time_is_counted_when_no_job_was_waiting(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """Jobs that arrive one by one leave the generator idle for want of work, which is not the daemon's cost."""
    from daemon.intake import Intake

    config = config_for(tmp_path)
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    metrics = DaemonMetrics()
    worker = Worker(config, fake_generators.make_instant(), store, JobQueue(), metrics, interrupt=threading.Event())
    for index in range(3):
        drop(config.inbox, make_image, f"s{index}", f"seed: {index}\n")
        [job] = Intake(config, store).poll().accepted
        assert worker.process(job) == "succeeded"
    assert idle(metrics, "count") == 0


def test_a_degraded_video_is_published_with_what_it_really_is(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    """The OOM degrade ladder's result (fewer frames) passes the frame-count sanity check, is encoded as it is, and
    the manifest records the steps taken and the frames used; `degraded_jobs_total` counts it."""
    from daemon.intake import Intake

    config = config_for(tmp_path)
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    store = JobStore(config.inbox, config.state_path)
    drop(config.inbox, make_image, "big")
    [job] = Intake(config, store).poll().accepted
    metrics = DaemonMetrics()
    generator = fake_generators.make_misbehaving("degrade")
    worker = Worker(config, generator, store, JobQueue(), metrics, interrupt=threading.Event())
    assert worker.process(job) == "succeeded"
    [manifest] = published(config)
    assert manifest["degradations"] == ["decode_chunk=1", "vae_tiling", "num_frames=4"]
    assert manifest["used"]["num_frames"] == 4 and manifest["asked"].get("num_frames") is None
    assert "priority" not in manifest["asked"]  # keys the sidecar did not set are absent, defaults included
    assert manifest["outputs"][0]["frames"] == 4
    assert metrics.registry.get_sample_value("i2vd_degraded_jobs_total") == 1
    for outcome in ("succeeded", "degraded"):  # `degraded` marks a job besides the outcome it ends with
        assert metrics.registry.get_sample_value("i2vd_jobs_total", {"outcome": outcome}) == 1
        labels = {"worker": worker.name, "outcome": outcome}
        assert metrics.registry.get_sample_value("i2vd_worker_jobs_total", labels) == 1
    assert metrics.registry.get_sample_value("i2vd_degrade_steps_total", {"rung": "cpu_offload"}) == 0
    assert metrics.registry.get_sample_value("i2vd_oom_total") == 3  # the fake recovered from one OOM per rung
    for rung in ("decode_chunk", "vae_tiling", "num_frames"):
        assert metrics.registry.get_sample_value("i2vd_degrade_steps_total", {"rung": rung}) == 1

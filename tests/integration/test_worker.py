"""The worker's per-job error policy with the real tiny model, real ffmpeg and a real store on disk.

Failures are injected at module boundaries (the generator raising out-of-memory, the encoder's ffmpeg failing,
the publisher's disk filling up), as DESIGN.md §4 asks.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import fsio
from daemon import store as store_module
from daemon.config import DaemonConfig, load_config
from daemon.errors import TransientJobError
from daemon.generate import load_generator
from daemon.generate.base import Generator
from daemon.intake import Intake
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    config = load_config(None)
    model = config.model.model_copy(update={"cache_dir": tmp_path_factory.mktemp("cache"), "device": "cpu"})
    return load_generator(model)


class Harness:
    def __init__(self, root: Path, generator: Generator) -> None:
        config = load_config(None, {"inbox": root / "inbox", "outbox": root / "outbox"})
        generation = config.generation.model_copy(
            update={
                "defaults": config.generation.defaults.model_copy(
                    update={"resolution": None, "width": 64, "height": 64, "num_frames": 8, "steps": 2}
                )
            }
        )
        intake = config.intake.model_copy(update={"stable_seconds": 0.0})
        worker = config.worker.model_copy(update={"retry_delay_seconds": 0.0})
        self.config: DaemonConfig = config.model_copy(
            update={"generation": generation, "intake": intake, "worker": worker}
        )
        self.config.inbox.mkdir(parents=True)
        self.config.outbox.mkdir(parents=True)
        self.store = JobStore(self.config.inbox, self.config.state_path)
        self.queue: JobQueue[ClaimedJob] = JobQueue()
        self.metrics = DaemonMetrics()
        self.interrupt = threading.Event()
        self.worker = Worker(self.config, generator, self.store, self.queue, self.metrics, interrupt=self.interrupt)

    def claim(self, make_image: Callable[..., Path], stem: str, sidecar: str) -> ClaimedJob:
        make_image(f"{stem}.png", size=(80, 64), directory=self.config.inbox)
        (self.config.inbox / f"{stem}.yaml").write_text(sidecar)
        # stable_seconds is 0, so the first poll claims and validates the pair.
        (job,) = Intake(self.config, self.store).poll().accepted
        return job

    def run_until_settled(self, job: ClaimedJob) -> list[str]:
        """Process the job, then any re-queued retries of it, until it reaches a final outcome."""
        outcomes = [self.worker.process(job)]
        while outcomes[-1] == "retried":
            retried = self.queue.get(timeout=10)
            assert retried is not None
            outcomes.append(self.worker.process(retried))
        return outcomes

    def counter(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("i2vd_jobs_total", {"outcome": outcome})
        return value or 0.0


@pytest.fixture
def harness(tmp_path: Path, generator: Generator) -> Iterator[Harness]:
    yield Harness(tmp_path, generator)


def published(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(outbox.glob("video_*.json"))]


def test_a_job_is_published_and_its_inputs_archived(harness: Harness, make_image: Callable[..., Path]) -> None:
    job = harness.claim(make_image, "ok", "prompt: fine\nseed: 5\nvariants: [first_frame]\n")
    assert harness.run_until_settled(job) == ["succeeded"]
    [manifest] = published(harness.config.outbox)
    assert manifest["seed"] == 5 and manifest["attempts"] == 1
    assert {o["role"] for o in manifest["outputs"]} == {"main", "first_frame"}
    assert (harness.config.state_path / "done" / job.job_id).is_dir()
    assert not (harness.config.outbox / ".i2vd-staging" / job.job_id).exists()


def test_with_worker_decode_in_child_the_models_image_comes_from_a_limited_child(
    tmp_path: Path, generator: Generator, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`worker.decode_in_child: true`: the worker's decode for the model runs in `decodebox`'s child too (the
    same one intake uses), and the job succeeds with it; off (the default), it runs in this process."""
    from daemon import checks

    calls: list[str] = []
    real = checks.isolated_model_rgb

    def counted(data: bytes, max_pixels: int, name: str, limits: Any) -> Any:
        calls.append(name)
        return real(data, max_pixels, name, limits)

    monkeypatch.setattr(checks, "isolated_model_rgb", counted)
    default = Harness(tmp_path / "default", generator)
    assert default.run_until_settled(default.claim(make_image, "here", "prompt: fine\nvariants: []\n")) == ["succeeded"]
    assert calls == []
    isolated = Harness(tmp_path / "isolated", generator)
    worker = isolated.config.worker.model_copy(update={"decode_in_child": True})
    isolated.config = isolated.config.model_copy(update={"worker": worker})
    isolated.worker = Worker(
        isolated.config, generator, isolated.store, isolated.queue, isolated.metrics, interrupt=isolated.interrupt
    )
    job = isolated.claim(make_image, "there", "prompt: fine\nvariants: []\n")
    assert isolated.run_until_settled(job) == ["succeeded"]
    assert calls == ["there.png"]


def test_the_manifest_times_every_stage_and_the_duration_runs_from_the_claim(
    harness: Harness, make_image: Callable[..., Path]
) -> None:
    """`timings_seconds` has each documented stage, `publish` included (the manifest is made inside it: its time
    up to the manifest), and `i2vd_job_duration_seconds` is claim to publish: a job that waited in the queue
    before its attempt has that wait in it."""
    job = harness.claim(make_image, "timed", "prompt: fine\nvariants: [first_frame]\n")
    time.sleep(1.0)  # queued for a second before the worker takes it
    started = time.monotonic()
    assert harness.run_until_settled(job) == ["succeeded"]
    attempt_seconds = time.monotonic() - started
    [manifest] = published(harness.config.outbox)
    stages = set(manifest["timings_seconds"])
    assert {"load_image", "generate", "encode", "variants", "publish"} <= stages
    assert manifest["timings_seconds"]["publish"] >= 0
    registry = harness.metrics.registry
    duration = registry.get_sample_value("i2vd_job_duration_seconds_sum")
    assert registry.get_sample_value("i2vd_job_duration_seconds_count") == 1
    assert duration is not None and duration >= attempt_seconds + 0.9


def test_an_image_rewritten_after_it_was_accepted_is_refused_not_run(
    harness: Harness, make_image: Callable[..., Path]
) -> None:
    """The claimed copy is still the dropper's file: rewriting it after validation (here: another, larger
    picture) must not run under the checksum intake recorded. The worker reads it again under intake's limits and
    refuses it as `input_changed`, naming the user's file; nothing is published."""
    job = harness.claim(make_image, "swap", "prompt: fine\nvariants: []\n")
    make_image(job.image_path.name, size=(96, 80), directory=job.image_path.parent)  # same inode's name, new bytes
    assert harness.run_until_settled(job) == ["rejected"]
    (folder,) = (harness.config.inbox / "failed").iterdir()
    reason = json.loads((folder / "reason.json").read_text())
    assert reason["reason"] == "input_changed" and "swap.png changed" in reason["message"]
    assert published(harness.config.outbox) == []


def test_transient_generator_oom_is_retried_then_succeeds(
    harness: Harness, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_generate = harness.worker._generator.generate
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransientJobError("out of GPU memory (simulated)")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(harness.worker._generator, "generate", flaky)
    job = harness.claim(make_image, "oom", "prompt: retry me\nvariants: []\n")
    assert harness.run_until_settled(job) == ["retried", "succeeded"]
    [manifest] = published(harness.config.outbox)
    assert manifest["attempts"] == 2
    assert harness.metrics.registry.get_sample_value("i2vd_oom_total") == 1
    assert harness.counter("retried") == 1 and harness.counter("succeeded") == 1


def test_ffmpeg_failing_every_time_ends_in_failed_with_history(
    harness: Harness, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TransientJobError("ffmpeg exited with status 1", detail={"stderr": "simulated crash"})

    monkeypatch.setattr(harness.worker._encoder, "write_video", broken)
    job = harness.claim(make_image, "poison", "prompt: never encodes\n")
    assert harness.run_until_settled(job) == ["retried", "retried", "failed"]
    reason = json.loads((harness.config.inbox / "failed" / "poison" / "reason.json").read_text())
    assert reason["reason"] == "retries_exhausted"
    assert reason["attempts"] == 3
    assert "ffmpeg exited" in reason["message"]
    assert (harness.config.inbox / "failed" / "poison" / "poison.png").exists()
    assert published(harness.config.outbox) == []
    assert list((harness.config.state_path / "jobs").iterdir()) == []

    # The next job is not blocked behind the poisoned one.
    monkeypatch.undo()
    good = harness.claim(make_image, "next", "prompt: next one\nvariants: []\n")
    assert harness.run_until_settled(good) == ["succeeded"]


def test_disk_full_during_publish_leaves_no_partial_output_and_is_retried(
    harness: Harness, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    calls = {"n": 0}

    def full_disk(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second output of the first attempt
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(fsio, "_renameat2", None)  # publish through link + unlink, where the error is injected
    monkeypatch.setattr(os, "link", full_disk)
    job = harness.claim(make_image, "full", "prompt: disk fills\nvariants: [first_frame]\n")
    outcomes = harness.run_until_settled(job)
    assert outcomes == ["retried", "succeeded"]
    [manifest] = published(harness.config.outbox)
    assert manifest["attempts"] == 1, "a full disk does not use up an attempt (StorageFull.consumes_attempt)"
    assert harness.metrics.registry.get_sample_value("i2vd_storage_full") == 0
    names = {o["name"] for o in manifest["outputs"]} | {f"{manifest['outputs'][0]['name'][:-4]}.json"}
    visible = {p.name for p in harness.config.outbox.iterdir() if not p.name.startswith(".")}
    assert visible == names, "only the complete second attempt is in the outbox"


def test_a_disk_full_for_the_job_state_too_keeps_the_job_waiting_uncounted(
    harness: Harness, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state folder usually shares the outbox's disk: when publishing fails for lack of space, writing the
    attempt's end into job.json fails too. The worker must not die on it (its open attempt would count as a crash
    at the next start, and enough such episodes would make the job poison): the attempt is released in memory, the
    job waits, and once space is back it is published with one counted attempt."""
    real_link, real_write_state = os.link, store_module.write_state
    disk = {"phase": "space"}  # -> "full" at the first publication -> "space again" after one state write failed

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if "outbox" in str(dst) and disk["phase"] != "space again":
            disk["phase"] = "full"
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst, *args, **kwargs)

    def write_state(directory: Path, state: Any) -> None:
        if disk["phase"] == "full":
            disk["phase"] = "space again"
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_state(directory, state)

    monkeypatch.setattr(fsio, "_renameat2", None)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(store_module, "write_state", write_state)
    job = harness.claim(make_image, "full", "prompt: disk fills\nvariants: []\n")
    outcomes = harness.run_until_settled(job)
    assert outcomes == ["retried", "succeeded"]
    [manifest] = published(harness.config.outbox)
    assert manifest["attempts"] == 1
    state = json.loads((harness.config.state_path / "done" / job.job_id / "job.json").read_text())
    assert [(a["outcome"], a["counted"]) for a in state["history"]] == [("storage_full", False), ("succeeded", True)]


def test_unexpected_exception_never_stops_the_loop(
    harness: Harness, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(harness.worker._encoder, "make_variant", bug)
    first = harness.claim(make_image, "buggy", "prompt: hits the bug\nvariants: [first_frame]\n")
    second = harness.claim(make_image, "plain", "prompt: no variants\nvariants: []\n")
    harness.queue.put(first, priority=0, sequence=first.sequence)
    harness.queue.put(second, priority=0, sequence=second.sequence)
    thread = threading.Thread(target=harness.worker.run)
    thread.start()
    try:
        deadline = 120.0
        while deadline > 0 and not (harness.counter("failed") == 1 and harness.counter("succeeded") == 1):
            threading.Event().wait(0.05)
            deadline -= 0.05
    finally:
        harness.queue.close()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert (harness.counter("retried"), harness.counter("failed"), harness.counter("succeeded")) == (2, 1, 1)
    reason = json.loads((harness.config.inbox / "failed" / "buggy" / "reason.json").read_text())
    assert "a bug in a stage" in reason["message"]
    [manifest] = published(harness.config.outbox)
    assert manifest["input"]["image"] == "plain.png"


def test_interrupt_releases_the_job_without_failing_it(harness: Harness, make_image: Callable[..., Path]) -> None:
    job = harness.claim(make_image, "stopme", "prompt: stop\nsteps: 50\nvariants: []\n")
    harness.interrupt.set()
    assert harness.worker.process(job) == "interrupted"
    assert (harness.config.state_path / "jobs" / job.job_id).is_dir()
    assert not list((harness.config.inbox / "failed").glob("*/reason.json"))
    [recovered] = JobStore(harness.config.inbox, harness.config.state_path).recover()
    # A stop is not the job's fault: the attempt is in the history but not counted (it can never make poison).
    assert recovered.job_id == job.job_id and recovered.attempts == 0
    assert [(entry.outcome, entry.counted) for entry in recovered.history] == [("interrupted", False)]

"""The worker's finishing pool and sanity policy, with the real tiny model, real ffmpeg and a real store.

The GPU half of job N+1 must run while job N is being finished; `run()` must not return before the finishing it
started is done (so a stop leaves every job published or still claimed); a sanity `fail` goes straight to failed/.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import DaemonConfig, load_config
from daemon.finish import Finisher
from daemon.generate import load_generator
from daemon.generate.base import GenerationResult, Generator
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


def make_config(root: Path, **sections: dict[str, Any]) -> DaemonConfig:
    base = load_config(None, {"inbox": root / "inbox", "outbox": root / "outbox"})
    defaults = {"resolution": None, "width": 64, "height": 64, "num_frames": 8, "steps": 2}
    update: dict[str, Any] = {
        "generation": base.generation.model_copy(
            update={"defaults": base.generation.defaults.model_copy(update=defaults)}
        ),
        "intake": base.intake.model_copy(update={"stable_seconds": 0.0}),
        "worker": base.worker.model_copy(update={"retry_delay_seconds": 0.0}),
    }
    for name, values in sections.items():
        update[name] = getattr(base, name).model_copy(update=values)
    config = base.model_copy(update=update)
    config.inbox.mkdir(parents=True)
    config.outbox.mkdir(parents=True)
    return config


class Rig:
    def __init__(self, config: DaemonConfig, generator: Generator) -> None:
        self.config = config
        self.store = JobStore(config.inbox, config.state_path)
        self.queue: JobQueue[ClaimedJob] = JobQueue()
        self.metrics = DaemonMetrics()
        self.worker = Worker(config, generator, self.store, self.queue, self.metrics, interrupt=threading.Event())

    def claim(self, make_image: Callable[..., Path], stem: str, sidecar: str) -> ClaimedJob:
        make_image(f"{stem}.png", size=(80, 64), directory=self.config.inbox)
        (self.config.inbox / f"{stem}.yaml").write_text(sidecar)
        (job,) = Intake(self.config, self.store).poll().accepted
        return job

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def frozen_black(job: ClaimedJob) -> Callable[..., GenerationResult]:
    resolved = job.resolved
    assert resolved is not None
    frames = np.zeros((resolved.num_frames, resolved.height, resolved.width, 3), dtype=np.uint8)
    return lambda *args, **kwargs: GenerationResult(frames=frames, nonfinite_values=0)


def test_sanity_fail_goes_straight_to_failed_without_retry(
    tmp_path: Path, generator: Generator, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(make_config(tmp_path), generator)
    job = rig.claim(make_image, "dark", "prompt: x\nvariants: []\n")
    monkeypatch.setattr(rig.worker._generator, "generate", frozen_black(job))
    assert rig.worker.process(job) == "failed"
    reason = json.loads((rig.config.inbox / "failed" / "dark" / "reason.json").read_text())
    assert reason["reason"] == "sanity_failed" and reason["attempts"] == 1
    assert reason["detail"]["black"]["result"] == "fail" and reason["detail"]["frozen"]["result"] == "warn"
    assert rig.sample("i2vd_sanity_checks_total", check="black", result="fail") == 1
    assert rig.sample("i2vd_sanity_checks_total", check="frozen", result="warn") == 1
    assert rig.sample("i2vd_jobs_total", outcome="failed") == 1
    assert not list(rig.config.outbox.glob("video_*"))


def test_sanity_warn_publishes_and_records_it(
    tmp_path: Path, generator: Generator, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(make_config(tmp_path, sanity={"black": "warn"}), generator)
    job = rig.claim(make_image, "dim", "prompt: x\nvariants: [poster]\n")
    monkeypatch.setattr(rig.worker._generator, "generate", frozen_black(job))
    assert rig.worker.process(job) == "succeeded"
    [manifest_path] = rig.config.outbox.glob("video_*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["sanity"]["black"]["result"] == "warn"
    assert manifest["sanity"]["nonfinite"] == {
        "result": "pass",
        "value": 0.0,
        "threshold": None,
        "message": "0 non-finite value(s)",
    }
    assert [o["role"] for o in manifest["outputs"]] == ["main", "poster"]
    assert rig.sample("i2vd_sanity_checks_total", check="black", result="warn") == 1


def test_next_job_generates_while_the_last_one_is_finished(
    tmp_path: Path, generator: Generator, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(make_config(tmp_path), generator)
    jobs = [rig.claim(make_image, f"job{i}", "prompt: x\nvariants: [first_frame]\n") for i in range(2)]
    real_generate, real_variants = rig.worker._generator.generate, Finisher.make_variants
    second_generating, overlapped = threading.Event(), threading.Event()
    calls: list[str] = []

    def generate(*args: Any, **kwargs: Any) -> GenerationResult:
        calls.append("generate")
        if len(calls) == 2:
            second_generating.set()
        return real_generate(*args, **kwargs)

    def make_variants(self: Finisher, generated: Any) -> Any:
        if generated.job.stem == "job0" and second_generating.wait(timeout=60):
            overlapped.set()
        return real_variants(self, generated)

    monkeypatch.setattr(rig.worker._generator, "generate", generate)
    monkeypatch.setattr(Finisher, "make_variants", make_variants)
    for job in jobs:
        rig.queue.put(job, priority=0, sequence=job.sequence)
    thread = threading.Thread(target=rig.worker.run)
    thread.start()
    try:
        deadline = 120.0
        while deadline > 0 and rig.sample("i2vd_jobs_total", outcome="succeeded") < 2:
            threading.Event().wait(0.05)
            deadline -= 0.05
    finally:
        rig.queue.close()
        thread.join(timeout=60)
    assert overlapped.is_set(), "job0's finishing should run while job1 generates"
    assert rig.sample("i2vd_jobs_total", outcome="succeeded") == 2
    assert not rig.worker.busy.is_set()


def test_run_returns_only_after_started_finishing_is_published(
    tmp_path: Path, generator: Generator, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(make_config(tmp_path), generator)
    job = rig.claim(make_image, "slowfinish", "prompt: x\nvariants: [first_frame]\n")
    entered, release = threading.Event(), threading.Event()
    real_variants = Finisher.make_variants

    def make_variants(self: Finisher, generated: Any) -> Any:
        entered.set()
        release.wait(timeout=60)
        return real_variants(self, generated)

    monkeypatch.setattr(Finisher, "make_variants", make_variants)
    rig.queue.put(job, priority=0, sequence=job.sequence)
    thread = threading.Thread(target=rig.worker.run)
    thread.start()
    assert entered.wait(timeout=60)
    rig.queue.close()  # what Service.stop does
    thread.join(timeout=0.5)
    assert thread.is_alive(), "run() must wait for the finishing it started"
    assert rig.worker.busy.is_set()
    release.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(list(rig.config.outbox.glob("video_*.json"))) == 1
    assert (rig.config.state_path / "done" / job.job_id).is_dir()


def test_daily_subfolders(tmp_path: Path, generator: Generator, make_image: Callable[..., Path]) -> None:
    rig = Rig(make_config(tmp_path, publish={"daily_subfolders": True}), generator)
    job = rig.claim(make_image, "daily", "prompt: x\nvariants: [gif]\n")
    assert rig.worker.process(job) == "succeeded"
    [day] = [p for p in rig.config.outbox.iterdir() if not p.name.startswith(".")]
    assert day.name == datetime.now().astimezone().strftime("%Y-%m-%d")
    names = sorted(p.name for p in day.iterdir())
    assert len(names) == 3 and names[0].endswith(".gif") and names[1].endswith(".json")
    assert names[2].startswith("video_") and names[2].endswith("_daily.mp4")

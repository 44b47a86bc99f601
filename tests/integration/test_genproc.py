"""The supervised generation process (`daemon.genproc`): crashes, hangs, load failures and interrupts of a real
child process are contained, reported as the right error, and followed by a working new child.

The child runs the fake generators of `tests/fake_generators.py` (instant frames), so these tests exercise the
process supervision, not a model; `test_tiny_model_in_a_child_process` runs the real embedded model once.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fake_generators
import numpy as np
import pytest
from PIL import Image

from daemon.errors import FatalError, JobInterrupted, TransientJobError
from daemon.genchild import GenerationProcessError
from daemon.generate.base import GenerationRequest
from daemon.genproc import ChildSettings, JobTimedOut, ProcessGenerator, WorkerCrashed

pytestmark = pytest.mark.integration

SETTINGS = ChildSettings(name="w0", device_label="cpu", env={"OMP_NUM_THREADS": "1"}, log_format="json")


def request(steps: int = 3, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(Image.new("RGB", (32, 32)), "a cat", "", 32, 32, 4, 16, steps, 9.0, seed)


def start(behaviour: str = "ok", marker: Path | None = None, **kwargs: float) -> ProcessGenerator:
    loader = functools.partial(fake_generators.make_misbehaving, behaviour, str(marker) if marker else None)
    return ProcessGenerator(loader, SETTINGS, job_timeout_seconds=kwargs.get("timeout", 30.0))


def test_generates_in_a_child_and_relays_steps_and_memory() -> None:
    generator = start()
    try:
        steps: list[tuple[int, int]] = []
        result = generator.generate(request(steps=3), on_step=lambda s, t, _: steps.append((s, t)))
        assert result.frames.shape == (4, 32, 32, 3)
        assert np.array_equal(result.frames, fake_generators.synthetic_frames(request()))
        assert steps == [(1, 3), (2, 3), (3, 3)]
        assert generator.info.model_id == "fake-instant"
        assert generator.info.library_versions["pid"] != str(os.getpid())  # really another process
        assert generator.memory_stats()["total"] == 10_000
    finally:
        generator.close()
    assert generator.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(generator.pid, 0)


@pytest.mark.parametrize("behaviour", ["crash_once", "segfault_once"])
def test_a_dying_child_is_a_transient_error_and_is_replaced(tmp_path: Path, behaviour: str) -> None:
    generator = start(behaviour, tmp_path / "marker")
    first_pid = generator.pid
    try:
        with pytest.raises(WorkerCrashed) as caught:
            generator.generate(request())
        assert isinstance(caught.value, TransientJobError)
        expected = "SIGSEGV" if behaviour == "segfault_once" else "status 3"
        assert expected in caught.value.message
        result = generator.generate(request())  # the replacement child serves the retry
        assert result.frames.shape[0] == 4
        assert generator.pid != first_pid
        assert generator.restarts == 1
    finally:
        generator.close()


def test_a_child_that_dies_while_idle_reports_the_model_down_and_is_revived() -> None:
    """A generation process killed between jobs (the kernel's OOM killer, a crash): the generator says its model
    is not alive (for /healthz and `i2vd_model_loaded`), `revive_if_dead` starts a new child at once instead of at
    the next job, and the next job runs on it."""
    generator = start()
    try:
        assert generator.model_alive()
        first = generator.pid
        assert first is not None
        os.kill(first, 9)
        deadline = time.monotonic() + 10
        while generator.model_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not generator.model_alive()
        assert generator.revive_if_dead()
        assert not generator.revive_if_dead()  # the new child runs: nothing to do
        result = generator.generate(request())
        assert result.frames.shape == (4, 32, 32, 3)
        assert generator.model_alive() and generator.pid != first and generator.restarts == 1
    finally:
        generator.close()
    assert not generator.revive_if_dead()  # a closed generator starts no child


def test_a_hung_job_is_killed_at_the_timeout_and_the_next_job_runs(tmp_path: Path) -> None:
    generator = start("hang_once", tmp_path / "marker", timeout=1.5)
    try:
        started = time.monotonic()
        with pytest.raises(JobTimedOut):
            generator.generate(request())
        assert time.monotonic() - started < 10
        assert generator.generate(request()).frames.shape[0] == 4
    finally:
        generator.close()


def test_a_job_that_keeps_stepping_still_times_out() -> None:
    """The job timeout is a wall-clock limit: steps arriving faster than the poll interval do not postpone it."""
    generator = ProcessGenerator(
        functools.partial(fake_generators.make_instant, 0.005), SETTINGS, job_timeout_seconds=1
    )
    try:
        started = time.monotonic()
        with pytest.raises(JobTimedOut):
            generator.generate(request(steps=2000))  # ~10 s of steps
        assert time.monotonic() - started < 5
    finally:
        generator.close()


def test_errors_keep_their_family_across_the_pipe(tmp_path: Path) -> None:
    oom = start("oom_once", tmp_path / "marker")
    bug = start("bug")
    try:
        with pytest.raises(TransientJobError, match="out of memory"):
            oom.generate(request())
        with pytest.raises(GenerationProcessError, match="ValueError: injected bug") as caught:
            bug.generate(request())
        assert "Traceback" in str(caught.value.detail)
        assert oom.restarts == 0 and bug.restarts == 0  # an exception is not a crash: the model stays loaded
    finally:
        oom.close()
        bug.close()


@pytest.mark.parametrize("step_seconds", [0.05, 0.005])
def test_interrupt_is_forwarded_between_steps(step_seconds: float) -> None:
    """Also when steps arrive faster than the parent's poll interval (0.005 s: a small model or a fast GPU). The
    parent once looked at the interrupt only when a poll timed out, so such a job could not be cancelled or
    stopped: found by the acceptance test's cancel of a 100-step tiny-model job."""
    loader = functools.partial(fake_generators.make_instant, step_seconds)
    generator = ProcessGenerator(loader, SETTINGS, job_timeout_seconds=30)
    try:
        seen: list[int] = []
        flag = threading.Event()

        def on_step(step: int, total: int, seconds: float) -> None:
            seen.append(step)
            if step == 2:
                flag.set()

        with pytest.raises(JobInterrupted):
            generator.generate(request(steps=200), on_step=on_step, should_interrupt=flag.is_set)
        assert 2 <= len(seen) < 200
        assert generator.generate(request(steps=2)).frames.shape[0] == 4  # the event is cleared per call
    finally:
        generator.close()


def test_a_model_that_never_loads_is_fatal() -> None:
    with pytest.raises(FatalError, match="weights not found"):
        ProcessGenerator(fake_generators.fail_to_load, SETTINGS, job_timeout_seconds=30)


def test_batches_go_through_the_child() -> None:
    generator = ProcessGenerator(functools.partial(fake_generators.make_batching, 3), SETTINGS, job_timeout_seconds=30)
    try:
        assert generator.can_batch
        assert generator.max_batch_size(request()) == 3
        results = generator.generate_batch([request(seed=1), request(seed=2)])
        assert [int(r.frames[0, 0, 0, 2]) for r in results] == [1, 2]
    finally:
        generator.close()


@pytest.mark.slow
def test_tiny_model_in_a_child_process(tmp_path: Path) -> None:
    """The real embedded model loads in a spawned child and generates the same frames as in-process (up to one
    level of rounding: the child runs with one thread, which changes the order of float reductions)."""
    from daemon.config import load_config
    from daemon.generate import load_generator

    model = load_config(None).model.model_copy(update={"cache_dir": tmp_path / "cache", "device": "cpu"})
    generator = ProcessGenerator(functools.partial(load_generator, model), SETTINGS, job_timeout_seconds=300)
    try:
        job = GenerationRequest(Image.new("RGB", (64, 64), (200, 30, 30)), "a cat", "", 64, 64, 4, 16, 2, 9.0, 3)
        remote = generator.generate(job)
        assert generator.info.model_id == "embedded-tiny"
    finally:
        generator.close()
    local = load_generator(model).generate(job)
    difference = np.abs(remote.frames.astype(np.int16) - local.frames.astype(np.int16))
    assert difference.max() <= 1, difference.max()


def test_the_child_exits_at_stop_even_with_a_thread_left_running() -> None:
    """`close` sends `stop`; the child ends itself (exit 0) at once instead of waiting in the interpreter's
    teardown for a thread that never ends, which would get it killed when the grace runs out."""
    from daemon.genproc import KILL_GRACE_SECONDS

    generator = ProcessGenerator(fake_generators.make_with_lingering_thread, SETTINGS, job_timeout_seconds=30)
    generator.generate(request())
    process = generator._process
    assert process is not None
    started = time.monotonic()
    generator.close()
    assert time.monotonic() - started < KILL_GRACE_SECONDS / 2
    assert process.exitcode == 0  # not -9: it was not killed


def test_a_closed_generator_starts_no_replacement(tmp_path: Path) -> None:
    """During a stop, the child killed under a running call is not replaced: a replacement would outlive the
    daemon's stop (and multiprocessing's exit handler would wait for it, since children ignore SIGTERM)."""
    loader = functools.partial(fake_generators.make_instant, 0.05)
    generator = ProcessGenerator(loader, SETTINGS, job_timeout_seconds=30)
    first = generator.pid
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generator.generate(request(steps=400))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    generator.kill()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], WorkerCrashed)
    assert generator.pid == first and generator.restarts == 0
    assert first is not None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


DAEMON_SIDE_SCRIPT = """
import functools, json, sys
from pathlib import Path
from PIL import Image
from daemon.config import load_config
from daemon.generate import load_generator
from daemon.generate.base import GenerationRequest
from daemon.genproc import ChildSettings, ProcessGenerator

def main():
    model = load_config(None).model.model_copy(update={"cache_dir": Path(sys.argv[1]), "device": "cpu"})
    settings = ChildSettings(name="w0", device_label="cpu", env={"OMP_NUM_THREADS": "1"}, log_format="json")
    generator = ProcessGenerator(functools.partial(load_generator, model), settings, job_timeout_seconds=300)
    try:
        after_load = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        job = GenerationRequest(Image.new("RGB", (64, 64)), "a cat", "", 64, 64, 4, 16, 2, 9.0, 3)
        generator.generate(job, on_step=lambda *_: None)
        after_job = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print(json.dumps({"after_load": after_load, "after_job": after_job, "info": generator.info.library_versions}))
    finally:
        generator.close()

if __name__ == "__main__":
    main()
"""


def test_the_daemon_side_never_imports_torch(tmp_path: Path) -> None:
    """What the generation process sends back (its ModelInfo, steps, results) unpickles without torch, diffusers
    or transformers in the daemon's process: `torch.__version__` sent as a `TorchVersion` imported torch there,
    which delayed READY by the import (0.84 s here, ~3 s on the GPU machine). Run in a fresh interpreter, since
    this test process has torch loaded already."""
    script = tmp_path / "daemon_side.py"
    script.write_text(DAEMON_SIDE_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["after_load"] == [], report
    assert report["after_job"] == [], report
    assert set(report["info"]) == {"torch", "diffusers", "transformers"}

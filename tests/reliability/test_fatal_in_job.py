"""A `FatalError` during a job (the model no longer loads after a generation process died, ffmpeg cannot be run)
ends the daemon with exit 1 for systemd to restart it later; the jobs are not at fault, so none of them uses an
attempt on it or ends in failed/."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from test_flood import InstantGenerator, drop_pairs

from daemon.config import DaemonConfig
from daemon.errors import FatalError, StartAbandoned
from daemon.generate.base import GenerationRequest, GenerationResult
from daemon.service import Service


class NoLongerLoads(InstantGenerator):
    """The first job's generation finds the model unloadable (what `genproc` raises after three failed loads)."""

    def generate(
        self, request: GenerationRequest, on_step: object = None, should_interrupt: object = None
    ) -> GenerationResult:
        raise FatalError("worker w0: loading the model failed (3 times in a row, injected)")


def config_with_pairs(tmp_path: Path, pairs: int) -> DaemonConfig:
    """`pairs` pairs dropped into a fresh inbox, and a quick `--once` configuration over it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop_pairs(inbox, pairs)
    return DaemonConfig(
        inbox=inbox,
        outbox=tmp_path / "outbox",
        metrics={"enabled": False},  # type: ignore[arg-type]
        intake={"stable_seconds": 0.0, "rescan_seconds": 0.2},  # type: ignore[arg-type]
        encode={"preset": "ultrafast", "default_variants": ()},  # type: ignore[arg-type]
        worker={"retry_delay_seconds": 0.1},  # type: ignore[arg-type]
    )


def exit_code_of(service: Service, timeout: float = 60) -> int:
    """Run the started service until it stops by itself (within `timeout`); its exit code."""
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(service.run_until_stopped()))
    loop.start()
    loop.join(timeout=timeout)
    assert not loop.is_alive(), "the daemon did not stop on the fatal error"
    return result[0]


def test_a_fatal_error_in_a_job_exits_1_and_leaves_every_job_claimed_with_its_attempts(tmp_path: Path) -> None:
    config = config_with_pairs(tmp_path, 3)
    inbox, outbox = config.inbox, config.outbox
    service = Service(config, once=True, generator_factory=lambda c: NoLongerLoads())
    service.start()
    assert exit_code_of(service) == 1
    assert service.store.counts() == {"claimed": 3, "done": 0, "failed": 0, "not_removed": 0}
    assert list(outbox.glob("*.mp4")) == []
    states = [json.loads(path.read_text()) for path in (inbox / ".i2vd" / "jobs").glob("*/job.json")]
    assert all(state["attempts"] == 0 for state in states)
    ended = [attempt for state in states for attempt in state.get("history", [])]
    assert [attempt["outcome"] for attempt in ended] == ["daemon_failed"]
    assert ended[0]["counted"] is False
    restarted = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    restarted.start()
    assert restarted.run_until_stopped() == 0
    assert len(list(outbox.glob("*.mp4"))) == 3


def test_a_stop_while_the_model_loads_gives_the_start_up_at_once(tmp_path: Path) -> None:
    """A first compile takes minutes; a stop asked for meanwhile (systemd's stop, Ctrl-C) must not wait for it
    (systemd would SIGKILL at TimeoutStopSec) nor announce READY: the start raises `StartAbandoned` within a
    second and leaves the state folder unlocked for the next start."""
    loading = threading.Event()

    def slow_model(_config: object) -> InstantGenerator:
        loading.set()
        time.sleep(30)
        return InstantGenerator()

    config = DaemonConfig(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        metrics={"enabled": False},  # type: ignore[arg-type]
    )
    stop = threading.Event()
    service = Service(config, once=True, generator_factory=slow_model, stop_requested=stop)
    raised: list[BaseException] = []

    def start() -> None:
        try:
            service.start()
        except BaseException as exc:
            raised.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    assert loading.wait(10)
    asked = time.monotonic()
    stop.set()
    starter.join(timeout=5)
    assert not starter.is_alive()
    assert time.monotonic() - asked < 2.0
    assert [type(exc) for exc in raised] == [StartAbandoned]
    again = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    again.start()  # the state-dir lock was given back
    again.stop()


def test_a_fatal_error_while_finishing_stops_the_daemon_too(tmp_path: Path) -> None:
    """The same from the finishing half (ffmpeg gone after the start's check): the worker's thread may be waiting
    for the next job by then, so the service's supervision notices the worker's fatal error and exits 1; the
    job stays claimed, its attempt uncounted."""
    config = config_with_pairs(tmp_path, 1)
    inbox = config.inbox
    service = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    service.start()
    gone = tmp_path / "ffmpeg-removed"
    gone.write_text("")  # not executable: what is left where ffmpeg was
    for worker in service.pool.workers:
        worker._encoder.ffmpeg = str(gone)
    assert exit_code_of(service) == 1
    assert service.store.counts()["claimed"] == 1
    (state,) = [json.loads(path.read_text()) for path in (inbox / ".i2vd" / "jobs").glob("*/job.json")]
    assert state["attempts"] == 0 and state["history"][-1]["outcome"] == "daemon_failed"

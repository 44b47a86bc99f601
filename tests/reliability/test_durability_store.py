"""The durable job store under crashes (reliability-anchors.md §7 B18, C19, C20, C21 store side): real `kill -9`
of a real process at each step, then a restart that must recover every job exactly once.

Each crash runs in a child Python process that SIGKILLs itself at the chosen step (a monkeypatched `os.rename`
or a plain call), so nothing gets a chance to clean up, exactly as with `kill -9` from outside.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.config import EncodeConfig, GenerationConfig
from daemon.jobspec import parse_sidecar, resolve_job
from daemon.publish import STAGING_DIR_NAME, Publisher
from daemon.store import JobStore, Pair

REPO = Path(__file__).resolve().parents[2]
SIDECAR = b"prompt: a cat\nseed: 7\n"

CHILD_PRELUDE = """\
import os, signal, sys
from pathlib import Path
from daemon.config import EncodeConfig, GenerationConfig
from daemon.jobspec import parse_sidecar, resolve_job
from daemon.store import JobStore, Pair
inbox = Path(sys.argv[1])
store = JobStore(inbox, inbox / ".i2vd", max_attempts=3)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def pair(stem):
    return Pair(stem, inbox / f"{stem}.png", inbox / f"{stem}.yaml")
def resolved():
    spec = parse_sidecar(b"prompt: a cat\\nseed: 7\\n")
    return resolve_job(spec, GenerationConfig(), EncodeConfig(), stem="cat", image_size=(64, 48))
"""


def run_killed(inbox: Path, body: str) -> None:
    """Run `body` in a child that must end by SIGKILL (a crash, not an exit)."""
    program = CHILD_PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", program, str(inbox)], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def drop(inbox: Path, stem: str = "cat", image: bytes | None = None, sidecar: bytes = SIDECAR) -> Pair:
    (inbox / f"{stem}.png").write_bytes(image if image is not None else b"png bytes of " + stem.encode())
    (inbox / f"{stem}.yaml").write_bytes(sidecar)
    return Pair(stem, inbox / f"{stem}.png", inbox / f"{stem}.yaml")


def inbox_files(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if p.is_file())


def reopen(inbox: Path, **kwargs: Any) -> JobStore:
    return JobStore(inbox, inbox / ".i2vd", **kwargs)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


KILL_POINTS = {  # (die before rename number N, die after rename number N); 0 = never
    "before_first_rename": (1, 0),
    "after_sidecar_moved": (0, 1),
    "after_image_moved": (0, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", [*KILL_POINTS, "after_claim_returned"])
def test_kill_9_during_claim_recovers_the_pair_exactly_once(inbox: Path, point: str) -> None:
    """Checklist B18: `kill -9` between the claim's renames, or after the claim and before the job starts ->
    after a restart the pair is either back in the inbox under its names (claim rolled back) or recovered as
    one claimed job; never both, never lost, and a second restart does not produce it again."""
    drop(inbox)
    if point == "after_claim_returned":
        run_killed(inbox, "store.claim(pair('cat'))\ndie()\n")
    else:
        before, after = KILL_POINTS[point]
        run_killed(
            inbox,
            f"""\
            real, calls = os.rename, [0]
            def rename(a, b):
                calls[0] += 1
                if calls[0] == {before}:
                    die()
                real(a, b)
                if calls[0] == {after}:
                    die()
            os.rename = rename
            store.claim(pair("cat"))
            """,
        )
    jobs = reopen(inbox).recover()
    if point == "after_claim_returned":
        assert [job.stem for job in jobs] == ["cat"] and inbox_files(inbox) == []
        assert jobs[0].image_path.read_bytes() == b"png bytes of cat"
    else:
        assert jobs == [] and inbox_files(inbox) == ["cat.png", "cat.yaml"]
    again = reopen(inbox).recover()
    assert [job.job_id for job in again] == [job.job_id for job in jobs]
    assert reopen(inbox).counts()["failed"] == 0


def test_two_claimers_on_one_inbox_claim_each_pair_once(inbox: Path) -> None:
    """Checklist C19: two stores (as two daemons or threads would) race to claim the same 30 pairs. Each pair is
    claimed exactly once; the loser sees FileNotFoundError (handled quietly by intake) and leaves nothing."""
    pairs = [drop(inbox, f"p{index:02d}") for index in range(30)]
    stores = [reopen(inbox), reopen(inbox)]
    claimed: list[list[str]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def claim_all(index: int) -> None:
        barrier.wait()
        for pair in pairs:
            try:
                claimed[index].append(stores[index].claim(pair).stem)
            except FileNotFoundError:
                continue
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(claimed[0] + claimed[1]) == [pair.stem for pair in pairs]
    assert inbox_files(inbox) == []
    recovered = reopen(inbox).recover()
    assert sorted(job.stem for job in recovered) == [pair.stem for pair in pairs]
    assert reopen(inbox).counts()["failed"] == 0


def test_claim_rename_reported_failed_but_done_counts_as_claimed(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checklist C19 (NFS, simulated at the os.rename boundary: no NFS server here): the server did the rename but
    the reply was lost, so the client sees an error. Source gone + target the same inode -> claimed (Postfix
    sane_rename), not rolled back and not lost."""
    store = reopen(inbox)
    real_rename = os.rename

    def lossy(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        raise OSError(errno.EIO, "reply lost after the server renamed")

    monkeypatch.setattr(os, "rename", lossy)
    job = store.claim(drop(inbox))
    monkeypatch.undo()
    assert job.image_path.read_bytes() == b"png bytes of cat" and inbox_files(inbox) == []
    assert [j.job_id for j in reopen(inbox).recover()] == [job.job_id]


@pytest.mark.slow
def test_kill_9_during_inference_reruns_with_attempts_2_and_swept_temp_outputs(inbox: Path, tmp_path: Path) -> None:
    """Checklist C20 (store side): the attempt is persisted *before* generation starts, so after `kill -9` during
    inference the restart knows one attempt ran and died (`crashed` in the history), the re-run is attempt 2,
    the resolved seed is the same (so the outputs are the same as a clean run's), and the half-written staging
    outputs of the killed attempt are swept."""
    outbox = tmp_path / "outbox"
    drop(inbox)
    run_killed(
        inbox,
        f"""\
        job = store.claim(pair("cat"))
        job = store.mark_validated(job, resolved(), "ab" * 32)
        job = store.record_attempt(job)
        staging = Path({str(outbox)!r}) / ".i2vd-staging" / job.job_id
        staging.mkdir(parents=True)
        (staging / "main.mp4").write_bytes(b"half a video")
        die()  # in the middle of the denoising loop
        """,
    )
    assert Publisher(outbox).sweep_staging() == 1
    assert list((outbox / STAGING_DIR_NAME).iterdir()) == []
    store = reopen(inbox)
    (job,) = store.recover()
    assert job.attempts == 1
    assert [(r.number, r.outcome) for r in job.history] == [(1, "crashed")]
    assert job.resolved is not None and job.resolved.seed == 7
    job = store.record_attempt(job)
    assert job.attempts == 2
    (again,) = reopen(inbox).recover()
    assert again.attempts == 2 and [r.outcome for r in again.history] == ["crashed", "crashed"]


@pytest.mark.slow
def test_a_job_that_kills_the_daemon_every_time_becomes_poison(inbox: Path) -> None:
    """Checklist C21 (store side): the job kills the daemon (segfault, CUDA abort) in each of its 3 attempts.
    The next start does not run it a 4th time: it goes to `failed/cat/` with reason `poison`, its inputs and its
    history (three `crashed` attempts); the other claimed job is recovered and runs (no head-of-line blocking)."""
    drop(inbox, "cat")
    drop(inbox, "dog")
    run_killed(inbox, 'store.claim(pair("cat")); store.claim(pair("dog")); die()\n')
    for _ in range(3):
        run_killed(
            inbox,
            """\
            jobs = {job.stem: job for job in store.recover()}
            store.record_attempt(jobs["cat"])
            die()  # the generator takes the whole process down
            """,
        )
    store = reopen(inbox, max_attempts=3)
    recovered = store.recover()
    assert [job.stem for job in recovered] == ["dog"]
    assert store.recovery_report["poison"] == 1
    failed = inbox / "failed" / "cat"
    assert sorted(p.name for p in failed.iterdir()) == ["cat.png", "cat.yaml", "reason.json"]
    reason = json.loads((failed / "reason.json").read_text())
    assert reason["reason"] == "poison" and reason["attempts"] == 3
    assert [entry["outcome"] for entry in reason["history"]] == ["crashed", "crashed", "crashed"]
    assert all(entry["ended_at"] for entry in reason["history"])


def test_attempts_released_for_a_full_disk_or_a_stop_never_make_poison(inbox: Path) -> None:
    """Checklist C21/D28: attempts ended by `release_attempt` (disk full, service stopping) do not count, so a long
    outage cannot push a good job to poison; only attempts the daemon died in do."""
    store = reopen(inbox, max_attempts=2)
    job = store.claim(drop(inbox))
    for _ in range(5):
        job = store.release_attempt(store.record_attempt(job), "storage_full", "No space left on device")
    assert job.attempts == 0
    job = store.record_attempt(job)  # then the daemon dies once
    (recovered,) = reopen(inbox, max_attempts=2).recover()
    assert recovered.attempts == 1
    assert [r.counted for r in recovered.history] == [False] * 5 + [True]
    assert recovered.history[-1].outcome == "crashed"


def test_resolved_job_for_tests_is_deterministic() -> None:
    """The seed the child processes persist (7) is what a clean run uses: the re-run makes the same video."""
    spec = parse_sidecar(SIDECAR)
    assert resolve_job(spec, GenerationConfig(), EncodeConfig(), stem="cat", image_size=(64, 48)).seed == 7

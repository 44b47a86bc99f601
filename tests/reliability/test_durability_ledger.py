"""The completed-input ledger (reliability-anchors.md §7 C24, C25) and the reconciliation of a publication a crash
cut short: a job is published once, a re-dropped identical pair is recognised, and inputs that cannot be moved
away never make a job run again."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from clocks import SteppingClock
from publish_helpers import KILL_AT_CALL
from pydantic import ValidationError

from daemon.config import DaemonConfig, EncodeConfig, GenerationConfig
from daemon.jobspec import parse_sidecar, resolve_job
from daemon.jobstate import read_state, write_state
from daemon.ledger import CompletedLedger, LedgerEntry, input_key
from daemon.publish import Publisher, sha256_file
from daemon.store import ClaimedJob, JobStore, Pair

SIDECAR = b"prompt: a cat\nseed: 7\n"


Clock = SteppingClock


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    path = tmp_path / "outbox"
    path.mkdir()
    return path


def open_store(inbox: Path) -> JobStore:
    return JobStore(inbox, inbox / ".i2vd", now=Clock())


def drop(inbox: Path, stem: str = "cat", image: bytes = b"the same png", sidecar: bytes = SIDECAR) -> Pair:
    (inbox / f"{stem}.png").write_bytes(image)
    (inbox / f"{stem}.yaml").write_bytes(sidecar)
    return Pair(stem, inbox / f"{stem}.png", inbox / f"{stem}.yaml")


def validated(store: JobStore, pair: Pair) -> ClaimedJob:
    job = store.claim(pair)
    spec = parse_sidecar(pair_sidecar(job))
    resolved = resolve_job(spec, GenerationConfig(), EncodeConfig(), stem=job.stem, image_size=(64, 48))
    return store.mark_validated(job, resolved, sha256_file(job.image_path))


def pair_sidecar(job: ClaimedJob) -> bytes:
    return job.sidecar_path.read_bytes()


def publish(store: JobStore, job: ClaimedJob, outbox: Path) -> list[Path]:
    """What the finisher does: stage, note the publication, publish with a manifest, then complete."""
    publisher = Publisher(outbox, now=lambda: datetime(2026, 11, 25, 9, 0, 0))
    staged = publisher.staging_dir(job.job_id) / "main.mp4"
    staged.write_bytes(b"video of " + job.job_id.encode())
    directory, base = publisher.reserve(job.stem)
    digest = sha256_file(staged)

    def manifest(final: str) -> dict[str, Any]:
        store.mark_publishing(job, directory, final, [f"{final}.mp4"], [digest], True)
        return {"job_id": job.job_id}

    return publisher.publish(base, [(staged, ".mp4")], manifest, directory)


def test_identical_pair_dropped_again_is_recognised_and_skipped_with_a_pointer(inbox: Path, outbox: Path) -> None:
    """Checklist C24 (policy `skip`): the same image and sidecar bytes dropped again, even under another name,
    after a restart -> a new job id, recognised by the ledger; its inputs are archived under `done/<id>/` with
    `duplicate_of.json` pointing at the earlier outputs; nothing is queued or published again."""
    store = open_store(inbox)
    first = validated(store, drop(inbox))
    outputs = publish(store, first, outbox)
    assert store.complete(first, archive=True, outputs=outputs)
    store = open_store(inbox)  # restart: the ledger is on disk
    again = validated(store, drop(inbox, "cat-copy"))
    assert again.job_id != first.job_id
    earlier = store.settle_duplicate(again, "skip")
    assert earlier is not None and earlier.job_id == first.job_id
    assert earlier.outputs == [str(path) for path in outputs]
    pointer = json.loads((inbox / ".i2vd" / "done" / again.job_id / "duplicate_of.json").read_text())
    assert pointer["job_id"] == first.job_id and pointer["manifest"] == str(outputs[-1])
    assert store.counts()["claimed"] == 0
    assert sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".")) == sorted(p.name for p in outputs)


def test_identical_pair_with_policy_process_runs_again_under_a_new_name(inbox: Path, outbox: Path) -> None:
    """Checklist C24 (policy `process`, the default): recognised (logged) but queued again; its outputs get a
    new name (`-2`), the earlier outputs are never overwritten."""
    store = open_store(inbox)
    first = validated(store, drop(inbox))
    first_outputs = publish(store, first, outbox)
    store.complete(first, archive=True, outputs=first_outputs)
    second = validated(store, drop(inbox))
    assert store.find_duplicate(second) is not None
    assert store.settle_duplicate(second, "process") is None
    assert store.counts()["claimed"] == 1
    second_outputs = publish(store, second, outbox)
    assert [p.name for p in second_outputs] == ["video_20261125_090000_cat-2.mp4", "video_20261125_090000_cat-2.json"]
    assert first_outputs[0].read_bytes() == b"video of " + first.job_id.encode()


def test_same_name_different_content_is_not_a_duplicate(inbox: Path, outbox: Path) -> None:
    """Checklist C24: the key is the content of both files; the same name with another image or prompt is new."""
    store = open_store(inbox)
    first = validated(store, drop(inbox))
    store.complete(first, archive=True, outputs=publish(store, first, outbox))
    other_image = validated(store, drop(inbox, image=b"another png"))
    assert store.settle_duplicate(other_image, "skip") is None
    other_prompt = validated(store, drop(inbox, "x", sidecar=b"prompt: a dog\nseed: 7\n"))
    assert store.settle_duplicate(other_prompt, "skip") is None


def test_inputs_that_cannot_be_moved_after_success_never_run_again(
    inbox: Path, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checklist C25: after publication the inputs cannot be moved (read-only share: EROFS on the rename,
    injected since remounting needs root). `complete` does not raise (a retry would publish twice), warns and
    counts it (`not_removed`, not `claimed`); after a restart the job is not re-queued (the ledger knows it)
    and its inputs are archived once the share is writable; docker-handbrake#391's loop cannot happen."""
    store = open_store(inbox)
    job = validated(store, drop(inbox))
    outputs = publish(store, job, outbox)
    real_rename = os.rename

    def read_only(src: Any, dst: Any) -> None:
        if Path(src) == job.directory:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", read_only)
    assert store.complete(job, archive=True, outputs=outputs) is False
    assert store.counts() == {"claimed": 0, "done": 0, "failed": 0, "not_removed": 1}
    restarted = open_store(inbox)
    assert restarted.recover() == []  # still read-only: known as done, not run again
    assert restarted.recovery_report["completed"] == 1 and restarted.counts()["not_removed"] == 1
    monkeypatch.undo()
    restarted = open_store(inbox)
    assert restarted.recover() == []
    assert restarted.counts() == {"claimed": 0, "done": 1, "failed": 0, "not_removed": 0}
    assert len(list(outbox.glob("*.mp4"))) == 1


def test_crash_after_the_manifest_finishes_the_job_instead_of_publishing_twice(inbox: Path, outbox: Path) -> None:
    """Checklist C20/D27: the daemon dies after the manifest was delivered but before the ledger entry and the
    input move. The restart sees the publication mark and our manifest: the job is completed, not re-run, so
    there is one output set, not two."""
    store = open_store(inbox)
    job = validated(store, drop(inbox))
    publish(store, job, outbox)  # ... and the process dies here
    restarted = open_store(inbox)
    assert restarted.recover() == []
    assert restarted.recovery_report["completed"] == 1
    assert restarted.counts() == {"claimed": 0, "done": 1, "failed": 0, "not_removed": 0}
    assert restarted.find_duplicate(validated(restarted, drop(inbox))) is not None


def test_a_failed_ledger_write_at_recovery_never_removes_the_published_outputs(
    inbox: Path, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon died after the manifest; at the next start the ledger cannot be written (the disk the crash
    filled is still full). Our manifest is there, so the outputs are published: they stay, the job is neither
    re-run nor taken back, and the start after that completes it."""
    store = open_store(inbox)
    job = validated(store, drop(inbox))
    published = publish(store, job, outbox)  # ... and the process dies here

    def disk_full(_ledger: CompletedLedger, _entry: LedgerEntry) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CompletedLedger, "record", disk_full)
    full = open_store(inbox)
    assert full.recover() == []
    assert full.recovery_report["completed"] == 0
    assert all(path.is_file() for path in published)
    assert full.counts()["claimed"] == 1
    monkeypatch.undo()
    restarted = open_store(inbox)
    assert restarted.recover() == []
    assert restarted.recovery_report["completed"] == 1
    assert restarted.counts() == {"claimed": 0, "done": 1, "failed": 0, "not_removed": 0}
    assert all(path.is_file() for path in published)


def test_crash_before_the_manifest_takes_the_orphan_outputs_back(inbox: Path, outbox: Path) -> None:
    """Checklist D27: the daemon dies after the outputs got their names but before the manifest. Without a
    manifest the set is not complete from a reader's view: the restart removes our orphan outputs (same bytes
    only; someone else's file is never touched) and re-queues the job, which publishes one full set."""
    store = open_store(inbox)
    job = validated(store, drop(inbox))
    orphan = outbox / "video_x_cat.mp4"
    orphan.write_bytes(b"ours")
    foreign = outbox / "video_x_cat.gif"
    foreign.write_bytes(b"not ours")
    store.mark_publishing(
        job, outbox, "video_x_cat", [orphan.name, foreign.name], [sha256_file(orphan), "0" * 64], True
    )
    (recovered,) = open_store(inbox).recover()
    assert recovered.job_id == job.job_id
    assert not orphan.exists() and foreign.read_bytes() == b"not ours"


def test_a_base_another_job_published_meanwhile_is_never_taken_back(inbox: Path, outbox: Path) -> None:
    """The names are noted before the first rename, so a crash can leave a mark on a base that another job then
    published in full (same second, same stem; identical bytes when the same pair ran twice). Its manifest names
    the other job: recovery removes nothing of that set and re-queues ours."""
    store = open_store(inbox)
    job = validated(store, drop(inbox))
    theirs = outbox / "video_x_cat.mp4"
    theirs.write_bytes(b"identical video")
    (outbox / "video_x_cat.json").write_text(json.dumps({"job_id": "another-job"}))
    store.mark_publishing(job, outbox, "video_x_cat", [theirs.name], [sha256_file(theirs)], True)
    (recovered,) = open_store(inbox).recover()
    assert recovered.job_id == job.job_id
    assert theirs.read_bytes() == b"identical video"
    assert sorted(path.name for path in outbox.iterdir()) == ["video_x_cat.json", "video_x_cat.mp4"]


def test_a_crash_inside_a_claim_rollback_is_finished_not_taken_for_a_conflict(inbox: Path) -> None:
    """A claim cut short is rolled back at the next start by linking each claimed file to its inbox name, then
    unlinking the claimed name. A crash between the two leaves one file with both names: the next rollback sees
    its own file under the inbox name and finishes the move, instead of quarantining it as `claim_conflict` and
    leaving the user's file with two links (which intake would then refuse as `hard_link`)."""
    store = open_store(inbox)
    job = store.claim(drop(inbox))
    state = read_state(job.directory)
    write_state(job.directory, state.model_copy(update={"phase": "claiming"}))  # died before the claim ended
    os.link(job.sidecar_path, inbox / "cat.yaml")  # ... and the first rollback died after its link
    restarted = open_store(inbox)
    assert restarted.recover() == []
    assert restarted.recovery_report["rolled_back"] == 1
    assert sorted(p.name for p in inbox.iterdir()) == [".i2vd", "cat.png", "cat.yaml", "failed"]
    assert list((inbox / "failed").iterdir()) == []
    assert [os.stat(inbox / name).st_nlink for name in ("cat.png", "cat.yaml")] == [1, 1]
    assert (inbox / "cat.yaml").read_bytes() == SIDECAR
    assert restarted.counts() == {"claimed": 0, "done": 0, "failed": 0, "not_removed": 0}


def test_a_claim_rolled_back_onto_a_new_file_of_the_same_name_keeps_both_under_their_names(inbox: Path) -> None:
    """A claim cut short, and meanwhile a new `cat.yaml` dropped: the rollback never overwrites it. Our claimed
    sidecar goes to failed/ as `claim_conflict`, under the name it was dropped with (not the daemon's own)."""
    store = open_store(inbox)
    job = store.claim(drop(inbox))
    write_state(job.directory, read_state(job.directory).model_copy(update={"phase": "claiming"}))
    (inbox / "cat.yaml").write_bytes(b"prompt: the new one\n")
    assert open_store(inbox).recover() == []
    assert (inbox / "cat.yaml").read_bytes() == b"prompt: the new one\n"
    assert (inbox / "cat.png").is_file()
    (folder,) = (inbox / "failed").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["cat.yaml", "reason.json"]
    assert (folder / "cat.yaml").read_bytes() == SIDECAR
    reason = json.loads((folder / "reason.json").read_text())
    assert (reason["reason"], reason["input"]) == ("claim_conflict", "cat.yaml")


def test_ledger_is_bounded_compacted_and_survives_a_torn_line(inbox: Path) -> None:
    """Checklist C24 (ledger hygiene): memory holds only the newest `max_entries` keys; the file is compacted at
    2x; a torn last line (crash mid-append) is skipped on load, not fatal."""
    path = inbox / "ledger.jsonl"
    ledger = CompletedLedger(path, max_entries=5)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for index in range(23):
        key = input_key(f"{index:064x}", "0" * 64)
        entry = LedgerEntry(
            key=key,
            job_id=f"job{index}",
            stem="s",
            image_sha256="i",
            sidecar_sha256="s",
            outputs=[],
            manifest=None,
            at=now,
        )
        ledger.record(entry)
        assert len(path.read_bytes().splitlines()) <= 10
    assert len(ledger) == 5
    with path.open("ab") as handle:
        handle.write(b'{"key": "torn')
    reloaded = CompletedLedger(path, max_entries=5)
    assert reloaded.lookup(input_key(f"{22:064x}", "0" * 64)) is not None
    assert reloaded.lookup(input_key(f"{0:064x}", "0" * 64)) is None
    assert reloaded.has_job("job18") and not reloaded.has_job("job17")


def ledger_entry(index: int, key_index: int | None = None) -> LedgerEntry:
    key = input_key(f"{index if key_index is None else key_index:064x}", "0" * 64)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return LedgerEntry(
        key=key, job_id=f"job{index}", stem="s", image_sha256="i", sidecar_sha256="s", outputs=[], manifest=None, at=at
    )


def test_an_append_after_a_torn_line_or_a_short_write_starts_on_a_line_of_its_own(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash mid-append leaves a line without its newline; the next append must not be glued onto it (it would
    be unreadable, and its job would look unpublished at the next start). A short write is continued to the end of
    the line; a write that makes no progress (the disk is full) raises instead of leaving half a line silently."""
    path = inbox / "ledger.jsonl"
    CompletedLedger(path).record(ledger_entry(1))
    with path.open("ab") as handle:
        handle.write(b'{"key": "torn')
    CompletedLedger(path).record(ledger_entry(2))
    reloaded = CompletedLedger(path)
    assert reloaded.has_job("job1") and reloaded.has_job("job2")
    assert reloaded.lookup(ledger_entry(2).key) == ledger_entry(2)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # 7 bytes per call
    reloaded.record(ledger_entry(3))
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="wrote nothing"):
        reloaded.record(ledger_entry(4))
    monkeypatch.undo()
    reloaded.record(ledger_entry(5))
    again = CompletedLedger(path)
    assert [again.has_job(f"job{index}") for index in range(1, 6)] == [True, True, True, False, True]


def test_a_second_job_of_the_same_inputs_leaves_the_first_known_as_published(inbox: Path) -> None:
    """`duplicate_policy: process` publishes the same inputs again under a new job: the ledger's newest entry for
    the key is the second job, and the first stays known as published (also after compaction), so a first job
    whose inputs could not be moved away is never run again."""
    path = inbox / "ledger.jsonl"
    ledger = CompletedLedger(path, max_entries=3)
    ledger.record(ledger_entry(1, key_index=7))
    ledger.record(ledger_entry(2, key_index=7))
    assert ledger.has_job("job1") and ledger.has_job("job2")
    assert ledger.lookup(ledger_entry(2, key_index=7).key) == ledger_entry(2, key_index=7)
    assert CompletedLedger(path, max_entries=3).has_job("job1")
    for index in range(10, 14):
        ledger.record(ledger_entry(index))
    ledger.record(ledger_entry(21, key_index=13))  # job13's key again: 7 lines, past 2 x max_entries: compacted
    assert len(path.read_bytes().splitlines()) == 3  # the newest 3 job ids, job13's superseded line included
    reloaded = CompletedLedger(path, max_entries=3)
    assert [reloaded.has_job(f"job{index}") for index in (1, 11, 12, 13, 21)] == [False, False, True, True, True]


def test_duplicate_policy_config_key() -> None:
    """Checklist C24: `intake.duplicate_policy` defaults to `process` and accepts only `process` or `skip`."""
    assert DaemonConfig().intake.duplicate_policy == "process"
    assert DaemonConfig(intake={"duplicate_policy": "skip"}).intake.duplicate_policy == "skip"  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DaemonConfig(intake={"duplicate_policy": "ignore"})  # type: ignore[arg-type]


KILL_DURING_FINISH = (
    """\
import os, signal, sys
from pathlib import Path
from daemon import fsio
from daemon.config import EncodeConfig, GenerationConfig
from daemon.jobspec import parse_sidecar, resolve_job
from daemon.publish import Publisher, sha256_file
from daemon.store import JobStore, Pair
root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
inbox, outbox = root / "inbox", root / "outbox"
store = JobStore(inbox, inbox / ".i2vd")
job = store.claim(Pair("cat", inbox / "cat.png", inbox / "cat.yaml"))
spec = parse_sidecar(job.sidecar_path.read_bytes())
resolved = resolve_job(spec, GenerationConfig(), EncodeConfig(), stem=job.stem, image_size=(64, 48))
job = store.mark_validated(job, resolved, sha256_file(job.image_path))
publisher = Publisher(outbox)
staged = publisher.staging_dir(job.job_id) / "main.mp4"
staged.write_bytes(b"M" * 100_000)
directory, base = publisher.reserve(job.stem)
digest = sha256_file(staged)
"""
    + KILL_AT_CALL
    + """\
for name in ("fsync", "write", "replace", "rename", "link", "unlink"):
    setattr(os, name, step(getattr(os, name)))
fsio._rename_noreplace_syscall = step(fsio._rename_noreplace_syscall)
def manifest(final):
    store.mark_publishing(job, directory, final, [final + ".mp4"], [digest], True)
    return {"job_id": job.job_id}
published = publisher.publish(base, [(staged, ".mp4")], manifest, directory)
store.complete(job, archive=True, outputs=published)
print(calls[0])
"""
)


@pytest.mark.slow
def test_kill_9_at_every_step_of_publishing_and_completing_leaves_one_set_or_none(tmp_path: Path) -> None:
    """Checklist C20/D27 with the job's state: a real `kill -9` of the process that publishes a job and completes
    it, before each of its fsync, write, rename, link and unlink calls in turn. After every kill the next start
    either finishes the job (one complete set with our manifest, the job archived) or takes back what it delivered
    and re-queues it (no output of ours left in the outbox); the job is never lost and never published twice."""
    repo = Path(__file__).resolve().parents[2]

    def run(root: Path, kill_at: int) -> subprocess.CompletedProcess[bytes]:
        for folder in ("inbox", "outbox"):
            (root / folder).mkdir(parents=True)
        drop(root / "inbox")
        return subprocess.run(
            [sys.executable, "-c", KILL_DURING_FINISH, str(root), str(kill_at)], cwd=repo, capture_output=True
        )

    clean = run(tmp_path / "clean", 0)
    assert clean.returncode == 0, clean.stderr.decode()
    steps = int(clean.stdout.split()[-1])  # after the store's log lines
    assert steps >= 8
    for kill_at in range(1, steps + 1):
        root = tmp_path / f"kill{kill_at}"
        assert run(root, kill_at).returncode == -9
        restarted = JobStore(root / "inbox", root / "inbox" / ".i2vd")
        requeued = restarted.recover()
        Publisher(root / "outbox").sweep_staging()
        videos = sorted(p.name for p in (root / "outbox").glob("*.mp4"))
        manifests = sorted((root / "outbox").glob("*.json"))
        if requeued:
            assert (videos, manifests) == ([], []), f"kill at {kill_at}: outputs left for a re-queued job"
            assert restarted.counts()["done"] == 0
        else:
            assert restarted.counts()["done"] == 1, f"kill at {kill_at}: the job is neither re-queued nor done"
            (manifest,) = manifests
            assert videos == [manifest.with_suffix(".mp4").name]
            assert (root / "outbox" / videos[0]).read_bytes() == b"M" * 100_000


def test_the_skip_policy_holds_for_a_job_validated_just_before_a_stop(inbox: Path, outbox: Path) -> None:
    """`duplicate_policy: skip` is applied right after validation. A stop between the two left a validated job
    that the ledger knows as published already: the next start skips it (inputs archived with a pointer) instead
    of publishing it a second time."""
    from test_flood import InstantGenerator

    from daemon.service import Service

    store = open_store(inbox)
    first = validated(store, drop(inbox))
    publish(store, first, outbox)
    store.complete(first, archive=True, outputs=sorted(outbox.glob("*")))
    second = validated(store, drop(inbox))  # ... and the daemon stopped before applying the policy
    config = DaemonConfig(
        inbox=inbox,
        outbox=outbox,
        metrics={"enabled": False},  # type: ignore[arg-type]
        intake={"duplicate_policy": "skip", "stable_seconds": 0.0},  # type: ignore[arg-type]
    )
    service = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    service.start()
    try:
        assert len(service.queue) == 0
        assert (service.store.done_dir / second.job_id / "duplicate_of.json").is_file()
        assert service.metrics.registry.get_sample_value("i2vd_jobs_total", {"outcome": "duplicate"}) == 1
    finally:
        service.stop()
    assert len(list(outbox.glob("*.mp4"))) == 1

"""Acceptance: the real `i2vd run` process, the real tiny model, real files, real signals.

Each test starts `python -m daemon run` as a subprocess with its own inbox/outbox, drops files, waits for the
outbox, reads the JSON log lines, scrapes `/metrics`, and signals the process.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from opshelpers import OpsDaemon

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]

STARTUP_SECONDS = 240.0
JOB_SECONDS = 180.0


def drop_pair(inbox: Path, make_image: Callable[..., Path], stem: str, sidecar: str, ext: str = ".png") -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    make_image(f"{stem}{ext}", size=(96, 64), directory=inbox)
    partial = inbox / f"{stem}.yaml.part"
    partial.write_text(sidecar)
    partial.rename(inbox / f"{stem}.yaml")


def manifests(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(outbox.glob("video_*.json"))]


def test_daemon_processes_good_pairs_rejects_bad_one_and_stops_on_sigterm(
    ops_daemon: Callable[..., OpsDaemon], make_image: Callable[..., Path]
) -> None:
    daemon = ops_daemon()
    daemon.wait_for_event("service_ready")
    drop_pair(daemon.inbox, make_image, "cat", "prompt: a cat surfing a wave\nseed: 7\n")
    drop_pair(daemon.inbox, make_image, "dog", "prompt: a dog\nnum_frames: 12\nvariants: [first_frame]\n", ".jpg")
    drop_pair(daemon.inbox, make_image, "bad", "prompt: x\nstrength: 0.8\n")

    daemon.wait_for(lambda: len(manifests(daemon.outbox)) == 2, JOB_SECONDS, "two manifests")
    reason_path = daemon.inbox / "failed" / "bad" / "reason.json"
    daemon.wait_for(reason_path.exists, JOB_SECONDS, "reason.json for the bad pair")

    by_input = {m["input"]["image"]: m for m in manifests(daemon.outbox)}
    assert set(by_input) == {"cat.png", "dog.jpg"}
    cat, dog = by_input["cat.png"], by_input["dog.jpg"]
    assert cat["used"]["seed"] == 7 and cat["seed"] == 7
    assert {o["role"] for o in cat["outputs"]} == {"main", "vertical", "fps30", "first_frame"}
    assert {o["role"] for o in dog["outputs"]} == {"main", "first_frame"}
    for manifest, frames in ((cat, 8), (dog, 12)):
        assert manifest["schema"] == "i2vd.manifest/1"
        assert manifest["model"]["id"] == "embedded-tiny"
        main = next(o for o in manifest["outputs"] if o["role"] == "main")
        assert main["name"].startswith("video_") and main["name"].endswith(".mp4")
        path = daemon.outbox / main["name"]
        assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == frames
        assert main["frames"] == frames and main["codec"] == "h264"
        for output in manifest["outputs"]:
            assert (daemon.outbox / output["name"]).stat().st_size == output["bytes"]
    vertical = next(o for o in cat["outputs"] if o["role"] == "vertical")
    assert (vertical["width"], vertical["height"]) == (1080, 1920)

    reason = json.loads(reason_path.read_text())
    assert reason["reason"] == "sidecar_invalid"
    assert "strength" in reason["message"]
    assert (daemon.inbox / "failed" / "bad" / "bad.png").exists()
    assert not any(daemon.inbox.glob("*.png")) and not any(daemon.inbox.glob("*.yaml"))
    assert not list((daemon.outbox).glob("*.part")) and not list(daemon.outbox.glob(".*tmp*"))

    samples = daemon.scrape()
    assert samples['i2vd_jobs_total{outcome="succeeded"}'] == 2
    assert samples['i2vd_jobs_total{outcome="rejected"}'] == 1
    assert samples["i2vd_frames_generated_total{}"] == 20
    assert samples["i2vd_jobs_received_total{}"] == 3
    assert samples["i2vd_model_load_seconds{}"] > 0
    assert samples["i2vd_watcher_up{}"] == 1
    assert samples['i2vd_stage_duration_seconds_count{stage="generate"}'] == 2

    published = [e for e in daemon.events() if e.get("event") == "job_published"]
    assert len(published) == 2 and all(e.get("job_id") for e in published)

    assert daemon.stop(signal.SIGTERM) == 0
    assert any(e.get("event") == "service_stopped" for e in daemon.events())


def test_once_drains_the_inbox_and_exits_zero(
    ops_daemon: Callable[..., OpsDaemon], make_image: Callable[..., Path], tmp_path: Path
) -> None:
    drop_pair(tmp_path / "inbox", make_image, "early", "prompt: already waiting\nvariants: []\n")
    daemon = ops_daemon("--once")
    assert daemon.process.wait(timeout=STARTUP_SECONDS) == 0
    assert len(manifests(daemon.outbox)) == 1
    assert any(e.get("event") == "inbox_drained" for e in daemon.events())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_sigterm_mid_job_releases_it_and_the_next_start_finishes_it(
    ops_daemon: Callable[..., OpsDaemon], make_image: Callable[..., Path], tmp_path: Path, signum: signal.Signals
) -> None:
    """systemd's SIGTERM, or the SIGHUP of a closed terminal: a graceful stop. The job being generated is
    released (its generation process ignores both: the daemon decides), and the next start finishes it."""
    daemon = ops_daemon()
    daemon.wait_for_event("service_ready")
    # Long enough on the CPU that the signal lands between denoising steps.
    drop_pair(daemon.inbox, make_image, "slow", "prompt: slow\nwidth: 128\nheight: 128\nsteps: 60\nvariants: []\n")
    daemon.wait_for_event("generate_step", JOB_SECONDS)
    assert daemon.stop(signum, group=signum == signal.SIGHUP) == 0  # a hangup reaches the whole group
    assert any(e.get("event") == "job_released" for e in daemon.events())
    restarts = [e for e in daemon.events() if e.get("event") == "generator_process_restarting"]
    assert restarts == [], "the generation process must outlive the signal and stop when the daemon says so"
    assert manifests(daemon.outbox) == []
    claimed = list((daemon.inbox / ".i2vd" / "jobs").iterdir())
    assert len(claimed) == 1, "the interrupted job must stay claimed on disk"

    restarted = ops_daemon("--once", generation={"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 2}})
    assert restarted.process.wait(timeout=STARTUP_SECONDS + JOB_SECONDS) == 0
    assert any(e.get("event") == "job_recovered" for e in restarted.events())
    [manifest] = manifests(restarted.outbox)
    assert manifest["attempts"] == 1, "the attempt a SIGTERM interrupted is released, not counted"
    assert manifest["used"]["steps"] == 60
    assert list((restarted.inbox / ".i2vd" / "jobs").iterdir()) == []

"""Flood (reliability-anchors.md §7 E45, issue 4 part 8): many pairs dropped at once all reach a terminal state,
with one output set per pair and memory that does not grow with the backlog's content.

The model is replaced by an instant test double (`InstantGenerator`: returns a deterministic gradient clip at
once) passed as `Service(generator_factory=...)`; everything else is the real daemon: intake, store, queue,
worker, real ffmpeg encode and read-back verification, publisher. The 10 000-pair run (with ffmpeg replaced too,
to fit the time) is `bench/flood.py`; this CI test uses a smaller count.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from memory_peak import peak_growth_mib, reset_peak_rss_mib
from PIL import Image

from daemon.config import DaemonConfig
from daemon.generate.base import GenerationRequest, GenerationResult, ModelInfo
from daemon.publish import STAGING_DIR_NAME, STAGING_LOCK_NAME
from daemon.service import Service

PAIRS = 40


class InstantGenerator:
    """Test double for the model: a moving gradient of the requested shape, instantly (no torch)."""

    info = ModelInfo(model_id="instant-double", revision=None, device="cpu", dtype="uint8", load_seconds=0.0)

    def generate(
        self, request: GenerationRequest, on_step: object = None, should_interrupt: object = None
    ) -> GenerationResult:
        frames, height, width = request.num_frames, request.height, request.width
        x = np.linspace(20, 200, width)[None, None, :]
        t = (np.arange(frames) * 5 + request.seed % 30)[:, None, None]
        clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
        clip[..., 0] = np.broadcast_to(x + t, (frames, height, width)).astype(np.uint8)
        clip[..., 1] = 90
        clip[..., 2] = np.broadcast_to(np.linspace(30, 180, height)[None, :, None], clip.shape[:3]).astype(np.uint8)
        return GenerationResult(frames=clip)

    def memory_stats(self) -> Mapping[str, int]:
        return {}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def drop_pairs(inbox: Path, count: int) -> None:
    """All pairs at once: images first, then every sidecar (the sidecar-last convention), distinct seeds."""
    image = png_bytes()
    for index in range(count):
        (inbox / f"p{index:05d}.png").write_bytes(image)
    for index in range(count):
        sidecar = f"prompt: flood {index}\nwidth: 64\nheight: 64\nnum_frames: 8\nsteps: 1\nvariants: []\n"
        (inbox / f"p{index:05d}.yaml").write_text(sidecar + f"seed: {index}\n")


def sample(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    return service.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.slow
def test_flood_of_pairs_all_reach_a_terminal_state_once(tmp_path: Path) -> None:
    """Checklist E45: 40 pairs dropped at once (10 000 in bench/flood.py), model replaced by an instant test
    double, real ffmpeg. Every pair ends done (one MP4 + one manifest each, no `-2` duplicates), nothing failed
    or left claimed, the outbox holds no temp files, the counters add up, and peak RSS stays modest."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    drop_pairs(inbox, PAIRS)
    config = DaemonConfig(
        inbox=inbox,
        outbox=outbox,
        metrics={"enabled": False},  # type: ignore[arg-type]
        intake={"stable_seconds": 0.0, "rescan_seconds": 0.2},  # type: ignore[arg-type]
        encode={"preset": "ultrafast", "default_variants": ()},  # type: ignore[arg-type]
        worker={"retry_delay_seconds": 0.1},  # type: ignore[arg-type]
    )
    service = Service(config, once=True, generator_factory=lambda c: InstantGenerator())
    rss_before_mib = reset_peak_rss_mib()
    service.start()
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(service.run_until_stopped()))
    loop.start()
    loop.join(timeout=280)
    assert not loop.is_alive(), "the flood did not drain"
    assert result == [0]
    manifests = sorted(outbox.glob("*.json"))
    videos = sorted(outbox.glob("*.mp4"))
    assert len(manifests) == PAIRS and len(videos) == PAIRS
    inputs = Counter(json.loads(m.read_text())["input"]["image"] for m in manifests)
    assert inputs == Counter({f"p{index:05d}.png": 1 for index in range(PAIRS)})
    assert not any("-2" in path.name for path in videos)
    assert [p.name for p in (outbox / STAGING_DIR_NAME).iterdir()] == [STAGING_LOCK_NAME]  # the in-use lock only
    assert service.store.counts() == {"claimed": 0, "done": PAIRS, "failed": 0, "not_removed": 0}
    assert sorted(p.name for p in inbox.iterdir()) == [".i2vd", "failed"]
    received = sample(service, "i2vd_jobs_received_total")
    succeeded = sample(service, "i2vd_jobs_total", {"outcome": "succeeded"})
    assert received == succeeded == PAIRS
    assert sample(service, "i2vd_jobs_pending") == 0 and sample(service, "i2vd_jobs_in_progress") == 0
    growth_mib = peak_growth_mib(rss_before_mib)
    print(f"RSS before the flood {rss_before_mib:.0f} MiB, peak growth during it {growth_mib:.0f} MiB")
    assert growth_mib < FLOOD_RSS_GROWTH_MIB, f"peak RSS grew {growth_mib:.0f} MiB during the flood"


FLOOD_RSS_GROWTH_MIB = 128
"""Measured alone: 4 MiB for the 40 pairs (the model is an instant double; ffmpeg runs in its own processes)."""

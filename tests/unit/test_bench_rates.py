"""`bench/scaling.py`'s steady-state rate: what the daemon's backlog figures in BENCHMARKS.md are computed with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from scaling import steady_rate


def test_steady_rate_starts_after_the_first_video() -> None:
    # A cold first video at 10 s, then one every 5 s: 720 videos/hour once the pipeline is full.
    assert steady_rate([10.0, 15.0, 20.0, 25.0]) == pytest.approx(720.0)


def test_steady_rate_starts_after_the_whole_first_batch() -> None:
    # Batches of 2 published together every 10 s: still 720/h, not inflated by the first batch's second video.
    assert steady_rate([20.0, 20.1, 30.0, 30.1, 40.0, 40.1], first=2) == pytest.approx(4 / 20.0 * 3600)


def test_steady_rate_needs_videos_after_the_first_batch() -> None:
    assert steady_rate([]) is None
    assert steady_rate([5.0]) is None
    assert steady_rate([5.0, 5.0], first=2) is None

"""Sanity checks on synthetic frames: each check's fail / warn / off path, and the float (NaN) path."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from daemon.config import SanityConfig
from daemon.metrics import SANITY_CHECKS, DaemonMetrics
from daemon.sanity import CHECKS, SanityCheckFailed, check_frames

SHAPE = (8, 16, 16)


def moving_clip(frames: int = 8) -> npt.NDArray[np.uint8]:
    """A mid-grey ramp that shifts by 8 levels per frame: finite, not blank, clearly moving."""
    base = np.linspace(40, 200, 16 * 16 * 3).reshape(16, 16, 3)
    return np.stack([(base + 8 * i) % 256 for i in range(frames)]).astype(np.uint8)


def results(report: object) -> dict[str, str]:
    return {item.check: item.result for item in report.results}  # type: ignore[attr-defined]


def test_a_good_clip_passes_everything() -> None:
    report = check_frames(moving_clip(), SHAPE, SanityConfig())
    assert results(report) == dict.fromkeys(CHECKS, "pass")
    assert report.failed == [] and report.warnings == []
    assert set(report.as_manifest()) == set(CHECKS) == set(SANITY_CHECKS)


@pytest.mark.parametrize(
    ("check", "frames"),
    [
        ("black", lambda clip: np.concatenate([clip[:7], np.zeros_like(clip[:1])])),
        ("white", lambda clip: np.concatenate([np.full_like(clip[:1], 255), clip[1:]])),
        ("frozen", lambda clip: np.repeat(clip[:1], 8, axis=0)),
        ("frame_count", lambda clip: clip[:7]),
    ],
)
def test_each_check_fails_warns_or_is_off_by_policy(check: str, frames: object) -> None:
    clip = frames(moving_clip())  # type: ignore[operator]
    for policy, expected in (("fail", "fail"), ("warn", "warn"), ("off", "off")):
        config = SanityConfig.model_validate({check: policy})
        report = check_frames(clip, SHAPE, config)
        assert results(report)[check] == expected, (check, policy)
        others = {name: result for name, result in results(report).items() if name != check}
        assert "fail" not in others.values() or check == "frame_count"


def test_a_dark_but_real_scene_is_not_black() -> None:
    night = (moving_clip() // 8).astype(np.uint8)  # mean level around 15
    assert results(check_frames(night, SHAPE, SanityConfig()))["black"] == "pass"


def test_nonfinite_float_frames_and_reported_counts() -> None:
    floats = moving_clip().astype(np.float32) / 255.0
    floats[3, 2, 2, 1] = np.nan
    floats[4, 0, 0, 0] = np.inf
    report = check_frames(floats, SHAPE, SanityConfig())
    nonfinite = report.as_manifest()["nonfinite"]
    assert nonfinite["result"] == "fail" and nonfinite["value"] == 2
    assert results(report)["black"] == "pass"
    # uint8 frames cannot hold NaN: the generator's count before conversion is what is checked.
    assert results(check_frames(moving_clip(), SHAPE, SanityConfig(), nonfinite_values=5))["nonfinite"] == "fail"
    assert results(check_frames(moving_clip(), SHAPE, SanityConfig(), nonfinite_values=0))["nonfinite"] == "pass"


def test_thresholds_come_from_config() -> None:
    still = np.repeat(moving_clip()[:1], 8, axis=0)
    still[1::2] += 1  # mean absolute difference exactly 1.0 between neighbours
    assert results(check_frames(still, SHAPE, SanityConfig(frozen="fail")))["frozen"] == "pass"
    strict = SanityConfig(frozen="fail", frozen_max_mad=2.0)
    report = check_frames(still, SHAPE, strict)
    assert results(report)["frozen"] == "fail"
    assert report.as_manifest()["frozen"]["value"] == pytest.approx(1.0)
    assert report.as_manifest()["frozen"]["threshold"] == 2.0


def test_sanity_failure_is_a_final_rejection_with_its_own_reason() -> None:
    error = SanityCheckFailed("black frames", detail={"black": {}})
    assert error.reason == "sanity_failed" and error.detail == {"black": {}}


def test_sanity_counter_has_bounded_labels_initialised_to_zero() -> None:
    metrics = DaemonMetrics()
    for check in SANITY_CHECKS:
        for result in ("pass", "warn", "fail"):
            sample = metrics.registry.get_sample_value("i2vd_sanity_checks_total", {"check": check, "result": result})
            assert sample == 0.0

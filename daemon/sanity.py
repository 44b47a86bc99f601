"""Sanity checks on generated frames, before anything is encoded: a broken clip never reaches the outbox unseen.

Checks (names are the metric's `check` label, a fixed set):
- `nonfinite`: NaN/inf in the model's float output (a diverged sampler or fp16 overflow). uint8 frames cannot
  hold NaN, so the generator reports the count it saw before conversion (`GenerationResult.nonfinite_values`);
  float frames given here are checked directly.
- `frame_count`: the clip has the number of frames (and the size) the job asked for.
- `black` / `white`: any frame whose mean level is at or below `black_max_mean` / at or above `white_min_mean`
  (0-255 scale). A dark real scene still averages well above 4; a collapsed VAE decode or a NaN turned to 0 does not.
- `frozen`: the mean absolute difference between consecutive frames, averaged over the clip, is below
  `frozen_max_mad` (0-255 scale): a still image repeated (conditioning ignored, zero motion) instead of a video.
  0.5 is below the noise of any real generated motion and above a re-encoded still.

Each check's policy is `fail`, `warn` or `off` (config `sanity`); the worker turns a `fail` into a final failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from daemon.config import SanityConfig
from daemon.errors import JobRejected
from daemon.metrics import SANITY_CHECKS

CHECKS = SANITY_CHECKS
Result = Literal["pass", "warn", "fail", "off"]


class SanityCheckFailed(JobRejected):
    """The generated frames failed a sanity check whose policy is `fail`; retrying with the same seed would not help."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message, reason="sanity_failed", detail=detail)


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: `result` after the policy (a failed `warn` check is `warn`), the measured value."""

    check: str
    result: Result
    value: float | None
    threshold: float | None
    message: str


@dataclass(frozen=True)
class SanityReport:
    results: tuple[CheckResult, ...]

    @property
    def failed(self) -> list[CheckResult]:
        return [result for result in self.results if result.result == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [result for result in self.results if result.result == "warn"]

    def as_manifest(self) -> dict[str, dict[str, Any]]:
        """`{check: {result, value, threshold, message}}` for the manifest's `sanity` section."""
        return {r.check: {k: v for k, v in asdict(r).items() if k != "check"} for r in self.results}


def _levels(frames: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Frames on the 0-255 scale as float32 (float frames are taken as [0, 1]); non-finite values become 0."""
    if np.issubdtype(frames.dtype, np.floating):
        scaled: npt.NDArray[np.float32] = frames.astype(np.float32) * np.float32(255.0)
        return np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return frames.astype(np.float32)


def _nonfinite(frames: npt.NDArray[Any], reported: int | None) -> tuple[bool, float, str]:
    count = int(reported or 0)
    if np.issubdtype(frames.dtype, np.floating):
        count += int(frames.size - np.count_nonzero(np.isfinite(frames)))
    return count > 0, float(count), f"{count} non-finite value(s)"


def _frame_count(frames: npt.NDArray[Any], shape: tuple[int, int, int]) -> tuple[bool, float, str]:
    got = tuple(int(n) for n in frames.shape[:3]) if frames.ndim == 4 else tuple(int(n) for n in frames.shape)
    return got != shape, float(frames.shape[0]), f"frames x height x width {got}, expected {shape}"


def _blank(means: npt.NDArray[np.float32], black: bool, threshold: float) -> tuple[bool, float, str]:
    hits = np.flatnonzero(means <= threshold if black else means >= threshold)
    value = float(means.min() if black else means.max())
    colour = "black" if black else "white"
    return hits.size > 0, value, f"{hits.size} {colour} frame(s) {hits[:8].tolist()}; extreme mean level {value:.2f}"


def _frozen(levels: npt.NDArray[np.float32], threshold: float) -> tuple[bool, float, str]:
    if levels.shape[0] < 2:
        return False, 0.0, "single frame"
    mad = float(np.abs(np.diff(levels, axis=0)).mean())
    return mad < threshold, mad, f"mean absolute frame difference {mad:.3f}"


def check_frames(
    frames: npt.NDArray[Any],
    expected_shape: tuple[int, int, int],
    config: SanityConfig,
    nonfinite_values: int | None = None,
) -> SanityReport:
    """Run every check whose policy is not `off` on (F, H, W, 3) frames; `expected_shape` is (F, H, W)."""
    levels = _levels(frames)
    means = levels.reshape(levels.shape[0], -1).mean(axis=1) if levels.ndim >= 2 else np.zeros(1, np.float32)
    measured: dict[str, tuple[float | None, Any]] = {
        "nonfinite": (None, lambda: _nonfinite(frames, nonfinite_values)),
        "frame_count": (None, lambda: _frame_count(frames, expected_shape)),
        "black": (config.black_max_mean, lambda: _blank(means, True, config.black_max_mean)),
        "white": (config.white_min_mean, lambda: _blank(means, False, config.white_min_mean)),
        "frozen": (config.frozen_max_mad, lambda: _frozen(levels, config.frozen_max_mad)),
    }
    results = []
    for check in CHECKS:
        policy = getattr(config, check)
        threshold, measure = measured[check]
        if policy == "off":
            results.append(CheckResult(check, "off", None, threshold, "not checked"))
            continue
        bad, value, message = measure()
        result: Result = ("fail" if policy == "fail" else "warn") if bad else "pass"
        results.append(CheckResult(check, result, value, threshold, message))
    return SanityReport(tuple(results))

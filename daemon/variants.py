"""From a declarative `VariantSpec` to ffmpeg's filter chain and output options, and to what the file must hold.

Only our own numbers go into these strings: every spec field is a bounded number or a closed choice (config.py),
so a preset cannot inject a filter, an option or a path. `expect_variant` states what verification must read
back from the produced file, per kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daemon.config import VariantSpec
from daemon.media import MediaInfo

# VP9 `-cpu-used` for `-deadline good` (0 = slowest/best .. 5 = fastest), from the x264-style preset name.
VP9_CPU_USED = {
    "ultrafast": 5,
    "superfast": 5,
    "veryfast": 5,
    "faster": 5,
    "fast": 4,
    "medium": 3,
    "slow": 2,
    "slower": 1,
}
_CODEC_READ_BACK = {"libx264": "h264", "libvpx-vp9": "vp9", "png": "png", "jpg": "mjpeg", "gif": "gif"}


def gif_fps_tolerance(fps: float) -> float:
    """GIF stores frame delays in whole centiseconds, so only 100/d fps exist (8 fps becomes 12 cs, read back as
    8.33 fps; 15 fps becomes 6 or 7 cs, 16.67 or 14.29 fps): allow the two achievable rates around `fps`."""
    delay = 100 / fps
    rates = {100 / max(1, math.floor(delay)), 100 / max(1, math.ceil(delay))}
    return max(abs(rate - fps) for rate in rates) / fps + 1e-3


@dataclass(frozen=True)
class Expectation:
    """What verification compares with the read-back `MediaInfo`; `None` means "not checked for this kind"."""

    codec: str
    width: int
    height: int
    frames: int
    fps: float | None
    duration_seconds: float | None
    pix_fmt: str | None
    frame_slack: int = 0
    fps_rel_tol: float = 1e-3
    image_format: str | None = None
    """PNG/JPEG: the file is also decoded with Pillow, which must agree on format and size."""


def chosen_frame(spec: VariantSpec, source_frames: int) -> int:
    """The frame index an image variant takes: a number (clamped to the clip), `middle` or `last`."""
    last = max(0, source_frames - 1)
    if spec.frame == "middle":
        return last // 2
    if spec.frame == "last":
        return last
    return min(spec.frame, last)


def sheet_frames(spec: VariantSpec, source_frames: int) -> list[int]:
    """Evenly spaced frame indices for a contact sheet, first and last included, at most columns x rows."""
    count = max(1, min(spec.columns * spec.rows, source_frames))
    if count == 1:
        return [0]
    return sorted({round(i * (source_frames - 1) / (count - 1)) for i in range(count)})


def expected_variant_frames(spec: VariantSpec, source_info: MediaInfo) -> int:
    """Frames a variant made from `source_info` must have: 1 for an image or sheet; for an `fps` re-time the
    duration stays, so round(frames / source fps * new fps) (the `fps` filter may differ by one); else unchanged."""
    if spec.kind in ("image", "sheet"):
        return 1
    if spec.fps is None or source_info.fps <= 0:
        return source_info.frames
    return max(1, round(source_info.frames / source_info.fps * spec.fps))


def _scale_filters(width: int, height: int, fit: str) -> list[str]:
    if fit == "pad":
        return [
            f"scale={width}:{height}:force_original_aspect_ratio=decrease:force_divisible_by=2",
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:color=black",
            "setsar=1",
        ]
    if fit == "crop":
        return [
            f"scale={width}:{height}:force_original_aspect_ratio=increase:force_divisible_by=2",
            f"crop={width}:{height}",
            "setsar=1",
        ]
    return [f"scale={width}:{height}", "setsar=1"]


def _retime_filters(fps: float, interpolate: bool) -> list[str]:
    rate = f"{fps:.10g}"
    if interpolate:
        # minterpolate stops at the last input frame's timestamp; the `fps` after it fills the clip's last frame
        # interval, so the duration (and the frame count) match a plain re-time.
        return [f"minterpolate=fps={rate}:mi_mode=mci", f"fps={rate}"]
    return [f"fps={rate}"]


def variant_filters(spec: VariantSpec, source_info: MediaInfo) -> list[str]:
    """The `-vf` chain for `spec`, from its declarative fields only."""
    sized = _scale_filters(spec.width, spec.height, spec.fit) if spec.width and spec.height else []
    if spec.kind == "image":
        return [f"select=eq(n\\,{chosen_frame(spec, source_info.frames)})", *sized]
    if spec.kind == "sheet":
        picks = "+".join(f"eq(n\\,{index})" for index in sheet_frames(spec, source_info.frames))
        return [f"select={picks}", *sized, f"tile={spec.columns}x{spec.rows}"]
    retime = _retime_filters(spec.fps, spec.interpolate) if spec.fps is not None else []
    if spec.kind == "gif":
        # One palette for the whole clip (stats_mode=diff favours what moves), ordered dithering: small, no banding.
        palette = "split[a][b];[a]palettegen=stats_mode=diff[p];[b][p]paletteuse=dither=bayer:bayer_scale=3"
        return [*retime, *sized, palette]
    return [*sized, *retime]


def output_options(spec: VariantSpec) -> list[str]:
    """Codec, pixel format and container options for `spec` (everything between the filters and the output)."""
    if spec.kind == "video" and spec.video_codec == "libvpx-vp9":
        speed = str(VP9_CPU_USED.get(spec.preset, 1))
        return [
            *("-c:v", "libvpx-vp9", "-crf", str(spec.crf), "-b:v", "0", "-deadline", "good", "-cpu-used", speed),
            *("-row-mt", "1", "-pix_fmt", "yuv420p", "-f", "webm"),
        ]
    if spec.kind == "video":
        return [
            *("-c:v", "libx264", "-crf", str(spec.crf), "-preset", spec.preset, "-pix_fmt", "yuv420p"),
            *("-movflags", "+faststart", "-f", "mp4"),
        ]
    if spec.kind == "gif":
        return ["-loop", "0", "-f", "gif"]
    codec = ["-c:v", "png", "-pix_fmt", "rgb24"] if spec.ext == "png" else ["-c:v", "mjpeg", "-q:v", "2"]
    # `-update 1`: one image written to exactly this name (no `%d` pattern expansion of the file name).
    return ["-frames:v", "1", *codec, "-update", "1", "-f", "image2"]


def expect_variant(spec: VariantSpec, source: MediaInfo) -> Expectation:
    """What the file made from `source` by `spec` must hold when read back."""
    width = spec.width if spec.width is not None else source.width
    height = spec.height if spec.height is not None else source.height
    if spec.kind in ("image", "sheet"):
        if spec.kind == "sheet":
            width, height = width * spec.columns, height * spec.rows
        image_format = "PNG" if spec.ext == "png" else "JPEG"
        return Expectation(_CODEC_READ_BACK[spec.ext], width, height, 1, None, None, None, image_format=image_format)
    fps = spec.fps if spec.fps is not None else source.fps
    frames = expected_variant_frames(spec, source)
    slack = 1 if spec.fps is not None else 0
    if spec.kind == "gif":
        return Expectation("gif", width, height, frames, fps, None, None, slack, fps_rel_tol=gif_fps_tolerance(fps))
    codec = _CODEC_READ_BACK[spec.video_codec]
    return Expectation(codec, width, height, frames, fps, source.duration_seconds, "yuv420p", slack)


def mismatches(info: MediaInfo, expected: Expectation) -> list[str]:
    """Human-readable differences between what was read back and what was asked; empty when it matches."""
    problems: list[str] = []
    for field in ("codec", "width", "height", "pix_fmt"):
        want = getattr(expected, field)
        if want is not None and getattr(info, field) != want:
            problems.append(f"{field} {getattr(info, field)!r} != expected {want!r}")
    if abs(info.frames - expected.frames) > expected.frame_slack:
        problems.append(f"frames {info.frames} != expected {expected.frames}")
    if expected.fps is not None and not math.isclose(
        info.fps, expected.fps, rel_tol=expected.fps_rel_tol, abs_tol=0.01
    ):
        problems.append(f"fps {info.fps:g} != expected {expected.fps:g}")
    if expected.duration_seconds is not None and expected.fps:
        slack_seconds = (expected.frame_slack + 0.5) / expected.fps + 0.01
        if abs(info.duration_seconds - expected.duration_seconds) > slack_seconds:
            problems.append(f"duration {info.duration_seconds:g}s != expected {expected.duration_seconds:g}s")
    return problems

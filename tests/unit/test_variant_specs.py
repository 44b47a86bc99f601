"""The preset library: declarative specs, what is refused, and the ffmpeg arguments built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DEFAULT_VARIANTS, VariantSpec, load_config
from daemon.errors import ConfigError
from daemon.media import MediaInfo
from daemon.variants import chosen_frame, expect_variant, output_options, sheet_frames, variant_filters

SOURCE = MediaInfo("h264", 512, 288, 16, 8.0, 2.0, "yuv420p")
LIBRARY = {"vertical", "square", "landscape", "fps30", "first_frame", "poster", "gif", "webm", "contact_sheet"}


def test_library_has_every_preset_and_default_list_is_unchanged() -> None:
    config = load_config(None)
    assert set(DEFAULT_VARIANTS) == LIBRARY
    assert set(config.encode.variants) == LIBRARY
    assert config.encode.default_variants == ("vertical", "fps30", "first_frame")


def test_user_presets_are_added_to_the_library(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "encode:\n  variants:\n"
        "    reel: {kind: video, ext: mp4, width: 720, height: 1280, fps: 30, interpolate: true}\n"
        "    vertical: {kind: video, ext: mp4, width: 540, height: 960}\n"
        "  default_variants: [reel, gif]\n"
    )
    variants = load_config(path).encode.variants
    assert set(variants) == LIBRARY | {"reel"}
    assert variants["reel"].interpolate and variants["vertical"].width == 540


@pytest.mark.parametrize(
    "spec",
    [
        "{kind: video, ext: mp4, codec: libvpx-vp9}",
        "{kind: video, ext: webm, codec: libx264}",
        "{kind: video, ext: mp4, crf: 60}",
        "{kind: video, ext: gif}",
        "{kind: gif, ext: gif, codec: libx264}",
        "{kind: image, ext: png, fps: 30}",
        "{kind: video, ext: mp4, interpolate: true}",
        "{kind: image, ext: jpg, frame: first}",
        "{kind: image, ext: jpg, frame: -1}",
        "{kind: sheet, ext: png, columns: 17}",
        "{kind: sheet, ext: png, width: 4096, height: 64, columns: 4}",
        "{kind: video, ext: mp4, preset: placebo}",
        "{kind: video, ext: mp4, vf: 'movie=/etc/passwd'}",
        "{kind: video, ext: mkv}",
    ],
)
def test_unknown_or_unsafe_options_are_config_errors(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"encode:\n  variants:\n    mine: {spec}\n")
    with pytest.raises(ConfigError, match=r"encode\.variants\.mine"):
        load_config(path)


def test_frame_choices_and_sheet_frames() -> None:
    assert chosen_frame(DEFAULT_VARIANTS["poster"], 16) == 7
    assert chosen_frame(VariantSpec(kind="image", ext="png", frame="last"), 16) == 15
    assert chosen_frame(VariantSpec(kind="image", ext="png", frame=40), 16) == 15
    assert sheet_frames(DEFAULT_VARIANTS["contact_sheet"], 16) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sheet_frames(DEFAULT_VARIANTS["contact_sheet"], 8) == list(range(8))
    assert sheet_frames(VariantSpec(kind="sheet", ext="png", columns=1, rows=1), 8) == [0]


def test_filters_and_options_per_kind() -> None:
    gif = ",".join(variant_filters(DEFAULT_VARIANTS["gif"], SOURCE))
    assert "palettegen" in gif and "paletteuse" in gif
    sheet = variant_filters(DEFAULT_VARIANTS["contact_sheet"], SOURCE)
    assert sheet[-1] == "tile=4x2" and sheet[0].startswith("select=eq(n\\,0)+")
    smooth = VariantSpec(kind="video", ext="mp4", fps=30, interpolate=True)
    assert variant_filters(smooth, SOURCE) == ["minterpolate=fps=30:mi_mode=mci", "fps=30"]
    webm = output_options(DEFAULT_VARIANTS["webm"])
    assert webm[:2] == ["-c:v", "libvpx-vp9"] and webm[-2:] == ["-f", "webm"] and "-b:v" in webm
    assert output_options(DEFAULT_VARIANTS["poster"])[-2:] == ["-f", "image2"]


def test_expectations_per_kind() -> None:
    sheet = expect_variant(DEFAULT_VARIANTS["contact_sheet"], SOURCE)
    assert (sheet.codec, sheet.width, sheet.height, sheet.frames, sheet.image_format) == ("png", 1024, 512, 1, "PNG")
    gif = expect_variant(DEFAULT_VARIANTS["gif"], SOURCE)
    assert (gif.codec, gif.width, gif.height, gif.frames, gif.duration_seconds) == ("gif", 512, 288, 16, None)
    webm = expect_variant(DEFAULT_VARIANTS["webm"], SOURCE)
    assert (webm.codec, webm.fps, webm.pix_fmt) == ("vp9", 8.0, "yuv420p")
    fps30 = expect_variant(DEFAULT_VARIANTS["fps30"], SOURCE)
    assert (fps30.frames, fps30.frame_slack, fps30.fps) == (60, 1, 30.0)
    poster = expect_variant(DEFAULT_VARIANTS["poster"], SOURCE)
    assert (poster.codec, poster.image_format) == ("mjpeg", "JPEG")


@pytest.mark.parametrize(("fps", "read_back"), [(8.0, 100 / 12), (15.0, 100 / 6), (15.0, 100 / 7), (30.0, 100 / 3)])
def test_gif_fps_tolerance_admits_the_centisecond_rates(fps: float, read_back: float) -> None:
    """Found by the property test: 15 fps GIFs read back as 16.67 fps (6 cs delays), beyond a flat 10 %."""
    from daemon.variants import gif_fps_tolerance

    assert abs(read_back - fps) / fps <= gif_fps_tolerance(fps)
    assert gif_fps_tolerance(fps) < 0.2

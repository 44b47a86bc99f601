"""Sidecar parsing (hostile YAML included) and job resolution (precedence, tiers, limits, variants)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import GenerationConfig, GenerationSettings, load_config
from daemon.errors import JobRejected
from daemon.jobspec import (
    MAX_YAML_DEPTH,
    estimate_vram_bytes,
    output_name_for_stem,
    parse_sidecar,
    resolve_job,
    sanitize_output_name,
    tier_size,
)

CONFIG = load_config(None)


def resolve(text: str, *, image_size: tuple[int, int] | None = None, generation: GenerationConfig | None = None):  # type: ignore[no-untyped-def]
    return resolve_job(
        parse_sidecar(text.encode()),
        generation or CONFIG.generation,
        CONFIG.encode,
        stem="cat",
        image_size=image_size,
    )


def test_seed_document_defaults() -> None:
    job = resolve("prompt: a cat surfing", image_size=(512, 512))
    assert (job.width, job.height, job.num_frames, job.fps, job.steps) == (512, 512, 16, 8, 50)
    assert job.guidance_scale == 9.0
    assert job.target_fps == 16
    assert job.variants == CONFIG.encode.default_variants
    assert job.output_name == "cat"
    assert job.duration_seconds == 2.0
    assert 0 <= job.seed < 2**32


def test_explicit_keys_win_over_preset() -> None:
    job = resolve("prompt: x\npreset: preview\nsteps: 7\n", image_size=(512, 512))
    assert job.steps == 7
    assert job.preset == "preview"
    assert resolve("prompt: x\npreset: preview\n").steps == 25
    assert resolve("prompt: x\npreset: high\n").resolution == "768p"


def test_config_defaults_sit_between_seed_and_preset() -> None:
    generation = GenerationConfig(defaults=GenerationSettings(width=128, height=128, steps=4))
    job = resolve("prompt: x", generation=generation)
    assert (job.width, job.height, job.steps, job.num_frames) == (128, 128, 4, 16)
    job = resolve("prompt: x\nresolution: 512p\n", generation=generation)
    assert (job.width, job.height) == (512, 512)


def test_width_height_replace_the_tier() -> None:
    job = resolve("prompt: x\nwidth: 640\nheight: 384\n")
    assert (job.width, job.height, job.resolution) == (640, 384, None)


@pytest.mark.parametrize(
    ("tier", "image", "expected"),
    [
        ("512p", None, (512, 512)),
        ("512p", (1920, 1080), (912, 512)),
        ("512p", (1080, 1920), (512, 912)),
        ("768p", (4000, 1000), (1368, 768)),  # aspect capped at 16:9
        ("512p", (500, 500), (512, 512)),
    ],
)
def test_tier_follows_image_aspect(tier: str, image: tuple[int, int] | None, expected: tuple[int, int]) -> None:
    width, height = tier_size(tier, image)  # type: ignore[arg-type]
    assert (width, height) == expected
    assert width % 8 == 0 and height % 8 == 0


def test_seed_is_kept_and_random_seed_is_recorded() -> None:
    assert resolve("prompt: x\nseed: 1234\n").seed == 1234
    assert resolve_job(parse_sidecar(b"prompt: x"), CONFIG.generation, CONFIG.encode, stem="s", seed=7).seed == 7


def test_variants_and_output_name() -> None:
    job = resolve("prompt: x\nvariants: [first_frame, first_frame]\noutput_name: 'my clip/../../x'\n")
    assert job.variants == ("first_frame",)
    assert job.output_name == "my_clip_.._.._x"  # no separator survives, so it cannot leave the outbox
    assert resolve("prompt: x\nvariants: []\n").variants == ()


def test_unknown_variant_is_rejected_with_allowed_list() -> None:
    with pytest.raises(JobRejected, match=r"tiktok.*allowed.*first_frame") as caught:
        resolve("prompt: x\nvariants: [tiktok]\n")
    assert caught.value.reason == "sidecar_invalid"


def test_too_many_pixels_is_rejected() -> None:
    with pytest.raises(JobRejected, match="pixels") as caught:
        resolve("prompt: x\nwidth: 2048\nheight: 2048\n")
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(
    ("text", "reason", "fragment"),
    [
        ("steps: 3", "sidecar_invalid", "prompt: Field required"),
        ("prompt: '   '", "sidecar_invalid", "blank"),
        ("prompt: x\nnum_frames: 300", "sidecar_invalid", "num_frames"),
        ("prompt: x\nnum_frames: 4", "sidecar_invalid", "num_frames"),
        ("prompt: x\nnum_frames: '16'", "sidecar_invalid", "num_frames"),
        ("prompt: x\nnum_frames: true", "sidecar_invalid", "num_frames"),
        ("prompt: x\nwidth: 100\nheight: 64", "sidecar_invalid", "multiple of 8"),
        ("prompt: x\nwidth: 128", "sidecar_invalid", "together"),
        ("prompt: x\nresolution: 512p\nwidth: 512\nheight: 512", "sidecar_invalid", "not both"),
        ("prompt: x\nresolution: 720p", "sidecar_invalid", "resolution"),
        ("prompt: x\npreset: ultra", "sidecar_invalid", "preset"),
        ("prompt: x\nguidance_scale: 100", "sidecar_invalid", "guidance_scale"),
        ("prompt: x\nseed: -1", "sidecar_invalid", "seed"),
        ("prompt: x\nsteps: 1.5", "sidecar_invalid", "steps"),
        ("prompt: x\nstrength: 0.5", "sidecar_invalid", "strength: Extra inputs are not permitted"),
        ("prompt: x\nprompt: y", "sidecar_yaml", "duplicate key"),
        ("prompt: x\n1: y", "sidecar_yaml", "not a string"),
        ("a: &a [x]\nprompt: *a", "sidecar_yaml", "anchors"),
        ("prompt: !!python/object/apply:os.system ['true']", "sidecar_yaml", "constructor"),
        ("- prompt: x", "sidecar_yaml", "mapping"),
        ("", "sidecar_yaml", "mapping"),
        ("prompt: [unclosed", "sidecar_yaml", "not valid YAML"),
        ("prompt: x\nseed: 2024-13-45", "sidecar_yaml", "cannot represent"),  # an impossible date
        ("prompt: 2024-02-30", "sidecar_yaml", "cannot represent"),
        ("prompt: x\nseed: " + "9" * 5000, "sidecar_yaml", "cannot represent"),  # past int's 4300-digit limit
        ("prompt: x\nguidance_scale: 1" + ":59" * 400 + ".5", "sidecar_yaml", "cannot represent"),  # sexagesimal
        ("prompt: " + "x" * 2001, "sidecar_invalid", "prompt"),
    ],
)
def test_bad_sidecars_are_rejected_with_the_key(text: str, reason: str, fragment: str) -> None:
    with pytest.raises(JobRejected) as caught:
        parse_sidecar(text.encode())
    assert caught.value.reason == reason
    assert fragment in caught.value.message


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]
    with pytest.raises(JobRejected, match="anchors"):
        parse_sidecar("\n".join(lines).encode())


def test_non_utf8_sidecar() -> None:
    with pytest.raises(JobRejected) as caught:
        parse_sidecar(b"prompt: \xff\xfe")
    assert caught.value.reason == "sidecar_encoding"


def test_example_sidecars_are_valid(repo_root: Path) -> None:
    for path in (repo_root / "examples").glob("*.yaml"):
        parse_sidecar(path.read_bytes())


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("My Clip!", "My_Clip"), ("../../etc/passwd", "etc_passwd"), (".hidden", "hidden"), ("日本", None)],
)
def test_sanitize_output_name(raw: str, clean: str | None) -> None:
    if clean is None:
        with pytest.raises(ValueError, match="usable"):
            sanitize_output_name(raw)
    else:
        assert sanitize_output_name(raw) == clean


def test_vram_estimate_matches_the_measured_stock_point() -> None:
    gib = estimate_vram_bytes(512, 512, 16) / 2**30
    assert 7.2 < gib < 7.4
    assert estimate_vram_bytes(768, 768, 16) > estimate_vram_bytes(512, 512, 16)


# ----- hostile-input rules (checklist E38, E41) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["ab" * 32, "AB" * 32, "sha256:" + "ab" * 32, "  " + "ab" * 32 + "  "],
)
def test_sidecar_sha256_is_normalised(value: str) -> None:
    """The sidecar-last protocol's `sha256:` accepts `sha256sum` output in any case, with an optional prefix."""
    assert parse_sidecar(f"prompt: x\nsha256: '{value}'\n".encode()).sha256 == "ab" * 32


def test_nesting_deeper_than_the_limit_is_refused_before_composition() -> None:
    """Checklist E38: nesting is refused from the parser's events, before PyYAML's recursive composer runs."""
    ok = "prompt: x\nvariants: " + "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    with pytest.raises(JobRejected, match="variants"):  # shape is wrong, but depth is allowed
        parse_sidecar(ok.encode())
    deep = "prompt: x\nvariants: " + "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    with pytest.raises(JobRejected, match="levels deep") as caught:
        parse_sidecar(deep.encode())
    assert caught.value.reason == "sidecar_yaml"


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "true", "False"])
def test_yaml_booleans_where_text_is_expected_get_a_hint(word: str) -> None:
    """Checklist E38 (the Norway problem): `prompt: no` is a bool in YAML 1.1; the message says to quote it."""
    with pytest.raises(JobRejected, match="put the text in quotes") as caught:
        parse_sidecar(f"prompt: {word}\n".encode())
    assert caught.value.reason == "sidecar_invalid"
    assert parse_sidecar(f"prompt: '{word}'\n".encode()).prompt == word


@pytest.mark.parametrize("raw", ["con", "CON", "nul.txt", "Com1", "lpt9"])
def test_windows_device_names_are_refused(raw: str) -> None:
    """Checklist E41: device names Windows refuses (an outbox may be an SMB share) are not output names."""
    with pytest.raises(ValueError, match="reserved"):
        sanitize_output_name(raw)


@pytest.mark.parametrize(
    ("stem", "name"),
    [("café", "cafe"), ("cafe\u0301", "cafe"), ("日本", "image"), ("con", "image"), ("-rf", "rf"), ("a\nb", "a_b")],
)
def test_output_name_for_stem_never_fails(stem: str, name: str) -> None:
    """Checklist E42: a stem with accents (NFC or NFD) keeps its letters; one with nothing usable becomes `image`
    instead of crashing validation."""
    assert output_name_for_stem(stem) == name
    job = resolve_job(parse_sidecar(b"prompt: x"), CONFIG.generation, CONFIG.encode, stem=stem)
    assert job.output_name == name

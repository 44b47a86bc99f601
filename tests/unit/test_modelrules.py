"""Per-backend parameter rules (daemon/modelrules.py) as `resolve_job`, the config loader and `i2vd validate` apply
them: frame forms, size multiples, limits, defaults, and keys a model does not use."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.cli import EXIT_DATAERR, EXIT_OK, main
from daemon.config import BackendName, DaemonConfig, GenerationConfig, ModelConfig, load_config
from daemon.errors import ConfigError, JobRejected
from daemon.jobspec import ResolvedJob, parse_sidecar, resolve_job
from daemon.modelrules import RULES, FrameRule, fit_size

ENCODE = load_config(None).encode


def resolve(backend: BackendName, text: str, image_size: tuple[int, int] | None = None) -> ResolvedJob:
    return resolve_job(
        parse_sidecar(text.encode()), GenerationConfig(backend=backend), ENCODE, stem="x", image_size=image_size
    )


def rejection(backend: BackendName, text: str) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        resolve(backend, text)
    assert caught.value.reason == "sidecar_invalid"
    return caught.value


@pytest.mark.parametrize(
    ("backend", "size", "frames", "steps", "guidance"),
    [
        ("i2vgen-xl", (512, 512), 16, 50, 9.0),
        ("svd", (1024, 576), 25, 25, 3.0),
        ("ltx-video", (704, 480), 161, 50, 3.0),
        ("wan-i2v", (832, 480), 81, 50, 5.0),
    ],
)
def test_each_backend_starts_from_its_published_defaults(
    backend: BackendName, size: tuple[int, int], frames: int, steps: int, guidance: float
) -> None:
    job = resolve(backend, "prompt: waves", image_size=(512, 512))
    assert ((job.width, job.height), job.num_frames, job.steps, job.guidance_scale) == (size, frames, steps, guidance)


def test_svd_jobs_carry_their_model_options_and_sidecar_values_win() -> None:
    assert resolve("svd", "prompt: x").model_options == {"motion_bucket_id": 127, "noise_aug_strength": 0.02}
    job = resolve("svd", "prompt: x\nmotion_bucket_id: 40\nnoise_aug_strength: 0.1\ndecode_chunk_size: 2\n")
    assert job.model_options == {"motion_bucket_id": 40, "noise_aug_strength": 0.1, "decode_chunk_size": 2}
    assert resolve("i2vgen-xl", "prompt: x").model_options == {}


def test_the_worker_hands_model_options_to_the_generator() -> None:
    """What the sidecar set for svd reaches the generator's request (and so the video), not only the manifest."""
    from daemon.attempt import generation_request

    job = resolve("svd", "prompt: x\nmotion_bucket_id: 40\nnoise_aug_strength: 0.1\n")
    request = generation_request(job, None)
    assert dict(request.options) == {"motion_bucket_id": 40, "noise_aug_strength": 0.1}


@pytest.mark.parametrize(
    ("backend", "text", "fragments"),
    [
        ("i2vgen-xl", "num_frames: 64", ["num_frames:", "8 to 32 frames", "try 32"]),
        ("ltx-video", "num_frames: 24", ["num_frames:", "of the form 8k+1", "try 17"]),
        ("wan-i2v", "num_frames: 80", ["num_frames:", "of the form 4k+1", "try 77"]),
        ("ltx-video", "width: 720\nheight: 480", ["width:", "divisible by 32", "try 704"]),
        ("wan-i2v", "width: 840\nheight: 480", ["width:", "divisible by 16", "try 832"]),
        ("svd", "width: 1280\nheight: 1024", ["allows at most 921600"]),
    ],
)
def test_shapes_a_model_cannot_make_are_rejected_with_the_rule(
    backend: BackendName, text: str, fragments: list[str]
) -> None:
    message = rejection(backend, f"prompt: x\n{text}\n").message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("backend", "key", "fragment"),
    [
        ("i2vgen-xl", "motion_bucket_id: 100", "only svd use it"),
        ("ltx-video", "noise_aug_strength: 0.1", "only svd use it"),
        ("svd", "negative_prompt: blur", "no text conditioning"),
        ("wan-i2v", "target_fps: 16", "no frame-rate conditioning"),
        ("wan-i2v", "decode_chunk_size: 4", "only svd use it"),
    ],
)
def test_keys_a_model_does_not_use_are_an_error(backend: BackendName, key: str, fragment: str) -> None:
    error = rejection(backend, f"prompt: x\n{key}\n")
    assert error.message.startswith(key.split(":")[0] + ": not used by")
    assert fragment in error.message and "remove the key" in error.message


def test_every_problem_is_reported_at_once() -> None:
    error = rejection("ltx-video", "prompt: x\nnum_frames: 10\nwidth: 104\nheight: 64\nmotion_bucket_id: 3\n")
    assert [line.split(":")[0] for line in error.detail] == ["motion_bucket_id", "width", "num_frames"]


def test_a_tier_size_is_rounded_to_the_model_multiple() -> None:
    job = resolve("ltx-video", "prompt: x\nresolution: 512p\n", image_size=(1600, 900))
    assert (job.width, job.height) == (896, 512)  # 912x512 from the tier, rounded to multiples of 32
    assert fit_size("wan-i2v", 912, 530) == (912, 528)


@pytest.mark.parametrize("backend", list(RULES))
def test_every_preset_and_default_obeys_its_own_rules(backend: BackendName) -> None:
    rules = RULES[backend]
    for preset in ("preview", "standard", "high"):
        job = resolve(backend, f"prompt: x\npreset: {preset}\n", image_size=(1280, 720))
        assert rules.frames.allows(job.num_frames)
        assert job.width % rules.size_multiple == 0 and job.height % rules.size_multiple == 0


def test_a_portrait_image_turns_the_backend_sizes_but_not_a_typed_one() -> None:
    portrait = resolve("svd", "prompt: x", image_size=(600, 800))
    assert (portrait.width, portrait.height) == (576, 1024)
    preview = resolve("wan-i2v", "prompt: x\npreset: preview", image_size=(720, 1280))
    assert (preview.width, preview.height) == (480, 832)
    typed = resolve("ltx-video", "prompt: x\nwidth: 704\nheight: 480", image_size=(600, 800))
    assert (typed.width, typed.height) == (704, 480)
    assert resolve("svd", "prompt: x", image_size=(800, 600)).width == 1024


def test_frame_rule_arithmetic() -> None:
    rule = FrameRule(9, 257, step=8, offset=1)
    assert [n for n in range(0, 30) if rule.allows(n)] == [9, 17, 25]
    assert (rule.nearest(3), rule.nearest(20), rule.nearest(999)) == (9, 17, 257)


def test_config_backend_reaches_job_resolution(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  backend: wan-i2v\n  source: /models/wan\n")
    config = load_config(path)
    assert config.generation.backend == "wan-i2v"
    assert resolve_job(parse_sidecar(b"prompt: x"), config.generation, config.encode, stem="x").num_frames == 81
    assert DaemonConfig(model=ModelConfig(backend="svd")).generation.backend == "svd"


def test_config_settings_a_backend_does_not_use_fail_at_load(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  backend: i2vgen-xl\ngeneration:\n  defaults:\n    motion_bucket_id: 90\n")
    with pytest.raises(ConfigError, match=r"generation\.defaults\.motion_bucket_id: not used by I2VGen-XL"):
        load_config(path)
    path.write_text("model:\n  backend: svd\ngeneration:\n  backend: ltx-video\n")
    with pytest.raises(ConfigError, match=r"differs from model\.backend"):
        load_config(path)


def test_defaults_or_presets_the_model_cannot_do_fail_at_load_not_per_job(tmp_path: Path) -> None:
    """`generation.defaults.num_frames: 40` passes every key check, but I2VGen-XL makes 8 to 32 frames: every
    sidecar that does not set `num_frames` would be refused, blamed on the sidecar. It is a configuration error
    at load (check-config exits 78), naming where; a preset that breaks a rule over the defaults too."""
    path = tmp_path / "config.yaml"
    path.write_text("generation:\n  defaults:\n    num_frames: 40\n")
    with pytest.raises(ConfigError, match=r"generation\.defaults: a job that sets only its prompt .*num_frames"):
        load_config(path)
    path.write_text("generation:\n  presets:\n    high:\n      num_frames: 48\n")
    with pytest.raises(ConfigError, match=r"generation\.presets\.high \(over the defaults\).*num_frames"):
        load_config(path)
    assert main(["check-config", str(path)]) == 78


def test_validate_applies_the_configured_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  backend: svd\n  source: /models/svd-xt\n")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("prompt: a boat\nmotion_bucket_id: 180\n")
    bad.write_text("prompt: a boat\nnegative_prompt: blur\n")
    assert main(["validate", "--config", str(config), str(good)]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_options"]["motion_bucket_id"] == 180 and plan["num_frames"] == 25
    assert main(["validate", "--config", str(config), str(bad)]) == EXIT_DATAERR
    report = json.loads(capsys.readouterr().out)
    assert report["detail"][0].startswith("negative_prompt: not used by Stable Video Diffusion")


def test_submit_refuses_what_the_configured_model_cannot_do(
    tmp_path: Path, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  backend: wan-i2v\n  source: /models/wan\n")
    inbox, sidecar = tmp_path / "inbox", tmp_path / "s.yaml"
    sidecar.write_text("prompt: waves\nnum_frames: 80\n")
    argv = ["submit", str(make_image()), "--config", str(config), "--sidecar", str(sidecar), "--inbox", str(inbox)]
    assert main(argv) == EXIT_DATAERR
    assert "of the form 4k+1" in capsys.readouterr().err
    assert not inbox.exists() or not any(inbox.iterdir())
    sidecar.write_text("prompt: waves\nnum_frames: 81\n")
    assert main(argv) == EXIT_OK


def test_preview_runs_in_fast_mode_and_a_sidecar_can_choose() -> None:
    """The `preview` preset asks for i2vgen-xl's fast mode (feature reuse); a sidecar may choose either mode; a
    model without the mode refuses the key."""
    from daemon.attempt import generation_request

    assert generation_request(resolve("i2vgen-xl", "prompt: x\npreset: preview\n"), None).mode == "fast"
    assert generation_request(resolve("i2vgen-xl", "prompt: x\npreset: preview\nmode: exact\n"), None).mode == "exact"
    assert generation_request(resolve("i2vgen-xl", "prompt: x\n"), None).mode is None
    assert "mode" in str(rejection("svd", "prompt: x\nmode: fast\n"))

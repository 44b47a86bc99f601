"""Config loading: defaults, YAML, environment and CLI precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DEFAULT_VARIANTS, load_config
from daemon.errors import ConfigError


def test_defaults_bind_metrics_to_loopback_and_keep_seed_defaults() -> None:
    config = load_config(None)
    assert config.metrics.host == "127.0.0.1"
    assert config.metrics.port == 9400
    assert config.generation.defaults.resolution == "512p"
    assert config.generation.defaults.steps == 50
    assert config.generation.defaults.guidance_scale == 9.0
    assert config.state_path == Path("inbox/.i2vd")
    assert set(config.encode.default_variants) <= set(DEFAULT_VARIANTS)


@pytest.mark.parametrize("name", ["daemon.yaml", "production.example.yaml"])
def test_shipped_configs_are_valid(repo_root: Path, name: str) -> None:
    config = load_config(repo_root / "config" / name)
    assert config.metrics.host == "127.0.0.1"


def test_embedded_default_is_tiny_model_on_cpu(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "daemon.yaml")
    assert config.model.source == "embedded-tiny"
    assert config.model.device == "cpu"
    assert config.inbox == Path("inbox")
    assert config.outbox == Path("outbox")


def test_production_example_is_cuda_fp16(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "production.example.yaml")
    assert (config.model.device, config.model.dtype) == ("cuda", "float16")


def test_bad_value_names_key_and_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dtype: float8\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "model.dtype" in caught.value.message
    assert "'float16'" in caught.value.message and "'bfloat16'" in caught.value.message


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("metrics:\n  prot: 9400\n")
    with pytest.raises(ConfigError, match=r"metrics\.prot"):
        load_config(path)


def test_bad_device_string(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  device: gpu0\n")
    with pytest.raises(ConfigError, match=r"model\.device.*'cuda:N'"):
        load_config(path)


def test_default_variants_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("encode:\n  default_variants: [vertical, tiktok]\n")
    with pytest.raises(ConfigError, match="tiktok"):
        load_config(path)


def test_user_defined_variant(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "encode:\n  variants:\n    square: {kind: video, ext: mp4, width: 1080, height: 1080, fit: crop}\n"
        "  default_variants: [square]\n"
    )
    config = load_config(path)
    assert config.encode.variants["square"].fit == "crop"


@pytest.mark.parametrize(
    "text",
    [
        "encode:\n  variants:\n    x: {kind: video, ext: mp4, filter: 'movie=/etc/passwd'}\n",
        "encode:\n  variants:\n    x: {kind: image, ext: mp4}\n",
        "encode:\n  variants:\n    '../x': {kind: image, ext: png}\n",
        "encode:\n  variants:\n    x: {kind: video, ext: mp4, width: 1080}\n",
    ],
)
def test_unsafe_or_inconsistent_variants_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_environment_overrides_file_and_flags_override_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inbox: from-file\nmetrics:\n  port: 9500\n")
    monkeypatch.setenv("I2VD_METRICS__PORT", "9601")
    monkeypatch.setenv("I2VD_INBOX", "from-env")
    config = load_config(path)
    assert config.metrics.port == 9601
    assert config.inbox == Path("from-env")
    config = load_config(path, {"inbox": "from-flag", "outbox": None})
    assert config.inbox == Path("from-flag")
    assert config.metrics.port == 9601


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(ValueError, match="frozen"):
        config.metrics.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("option", ["channels_last", "split_linear_bias"])
@pytest.mark.parametrize(
    ("value", "compile_mode", "scope", "want"),
    [
        (None, "default", "auto", True),  # per-layer compile: measured faster with each
        (None, "default", "step", False),  # not with the whole-step graph
        (None, "reduce-overhead", "auto", False),  # auto -> the whole step
        (None, "off", "auto", False),  # eager (and the CPU): slower with each
        (False, "default", "auto", False),
        (True, "off", "auto", True),
    ],
)
def test_the_compiled_only_layouts_follow_the_compile_unless_set(
    option: str, value: bool | None, compile_mode: str, scope: str, want: bool
) -> None:
    """`model.channels_last` and `model.split_linear_bias`: unset, on exactly with the per-layer compile."""
    from daemon.config import ModelConfig

    config = ModelConfig(**{option: value}, compile=compile_mode, compile_scope=scope)
    assert getattr(config, f"resolved_{option}")(config.compile) is want

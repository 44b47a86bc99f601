"""The daemon's configuration: frozen pydantic models loaded from YAML, then `I2VD_*` environment, then CLI flags.

Every section forbids unknown keys, so a typo fails at start with the key's path and the allowed values instead of
being silently ignored. Relative paths are relative to the working directory the daemon is started from.
Environment overrides use `__` between levels, e.g. `I2VD_METRICS__PORT=9401` or `I2VD_MODEL__DEVICE=cuda`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.errors import ConfigError

PresetName = Literal["preview", "standard", "high"]
TierName = Literal["512p", "768p", "1024p"]
TIER_SHORT_SIDE: dict[str, int] = {"512p": 512, "768p": 768, "1024p": 1024}
VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationSettings(_Frozen):
    """A partial set of generation settings: a preset, the config defaults, or what a sidecar asked for.

    `None` means "not set here"; resolution fills the gaps in the order sidecar > preset > config defaults >
    the seed document's defaults (512p, 16 frames, 8 fps, 50 steps, guidance 9.0, target_fps 16).
    """

    resolution: TierName | None = None
    width: Annotated[int, Field(ge=64, le=2048, multiple_of=8)] | None = None
    height: Annotated[int, Field(ge=64, le=2048, multiple_of=8)] | None = None
    num_frames: Annotated[int, Field(ge=8, le=32)] | None = None
    fps: Annotated[int, Field(ge=1, le=60)] | None = None
    target_fps: Annotated[int, Field(ge=1, le=60)] | None = None
    steps: Annotated[int, Field(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0)] | None = None

    @model_validator(mode="after")
    def _width_and_height_together(self) -> GenerationSettings:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.width is not None and self.resolution is not None:
            raise ValueError("give either resolution or width+height, not both")
        return self


SEED_DEFAULTS = GenerationSettings(resolution="512p", num_frames=16, fps=8, target_fps=16, steps=50, guidance_scale=9.0)
SEED_PRESETS: dict[PresetName, GenerationSettings] = {
    "preview": GenerationSettings(resolution="512p", num_frames=16, steps=25),
    "standard": GenerationSettings(resolution="512p", num_frames=16, steps=50),
    "high": GenerationSettings(resolution="768p", num_frames=16, steps=50),
}


class GenerationConfig(_Frozen):
    """Job defaults and presets. The embedded CPU config shrinks them; a GPU config keeps the seed's values."""

    defaults: GenerationSettings = SEED_DEFAULTS
    presets: dict[PresetName, GenerationSettings] = Field(default_factory=lambda: dict(SEED_PRESETS))
    max_pixels: Annotated[int, Field(ge=64 * 64)] = 1824 * 1024  # 1024p at 16:9
    negative_prompt: str = ""


class ModelConfig(_Frozen):
    """Which weights to load, where to run them, and how."""

    source: str = Field(
        default="embedded-tiny",
        description="'embedded-tiny' (built from the config shipped in the package) or a local diffusers directory",
    )
    revision: str | None = Field(default=None, description="label recorded in manifests (e.g. a hub commit)")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    cache_dir: Path = Path(".cache/i2vd")
    decode_chunk_size: Annotated[int, Field(ge=1, le=64)] = 8

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'")
        return value


class IntakeConfig(_Frozen):
    """How the inbox is watched and when a pair counts as complete."""

    stable_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 2.0
    rescan_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 5.0
    observer: Literal["auto", "inotify", "polling"] = "auto"
    max_sidecar_bytes: Annotated[int, Field(ge=256, le=1024 * 1024)] = 64 * 1024
    max_image_bytes: Annotated[int, Field(ge=1024)] = 50 * 1024 * 1024
    max_image_pixels: Annotated[int, Field(ge=64 * 64)] = 50_000_000


class VariantSpec(_Frozen):
    """A declarative ffmpeg finishing preset. Code builds the argv from these fields; no free-form ffmpeg options."""

    kind: Literal["video", "image"]
    ext: Literal["mp4", "png", "jpg"]
    width: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    height: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    fit: Literal["pad", "crop", "stretch"] = "pad"
    fps: Annotated[float, Field(gt=0.0, le=120.0)] | None = None
    codec: Literal["libx264"] = "libx264"
    crf: Annotated[int, Field(ge=0, le=51)] = 23
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"] = "fast"
    frame: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _consistent(self) -> VariantSpec:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.kind == "video" and self.ext != "mp4":
            raise ValueError("a video variant must have ext 'mp4'")
        if self.kind == "image" and self.ext == "mp4":
            raise ValueError("an image variant must have ext 'png' or 'jpg'")
        return self


DEFAULT_VARIANTS: dict[str, VariantSpec] = {
    "vertical": VariantSpec(kind="video", ext="mp4", width=1080, height=1920, fit="pad", crf=23, preset="fast"),
    "fps30": VariantSpec(kind="video", ext="mp4", fps=30.0, crf=23, preset="fast"),
    "first_frame": VariantSpec(kind="image", ext="png", frame=0),
}


class EncodeConfig(_Frozen):
    """The main MP4 and the ffmpeg finishing variants."""

    ffmpeg: Path | None = Field(default=None, description="ffmpeg binary; default: the one bundled by imageio-ffmpeg")
    crf: Annotated[int, Field(ge=0, le=51)] = 18
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"] = "medium"
    timeout_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 300.0
    variants: dict[str, VariantSpec] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    default_variants: tuple[str, ...] = ("vertical", "fps30", "first_frame")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantSpec]) -> dict[str, VariantSpec]:
        for name in value:
            if not VARIANT_NAME.fullmatch(name):
                raise ValueError(f"variant name {name!r} must match {VARIANT_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _defaults_exist(self) -> EncodeConfig:
        unknown = [name for name in self.default_variants if name not in self.variants]
        if unknown:
            raise ValueError(f"default_variants {unknown} are not defined; allowed: {sorted(self.variants)}")
        return self


class PublishConfig(_Frozen):
    """What happens to inputs once their outputs are durable."""

    processed_inputs: Literal["archive", "delete"] = "archive"


class WorkerConfig(_Frozen):
    """Per-job error policy: transient failures (OOM, ffmpeg crash, full disk) are retried, then quarantined."""

    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    retry_delay_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 5.0
    stop_timeout_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 60.0


class MetricsConfig(_Frozen):
    """The Prometheus exporter. Loopback by default: metrics are not for the whole network."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9400


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class DaemonConfig(BaseSettings):
    """The whole configuration. Sources, highest first: CLI flags, `I2VD_*` environment, the YAML file, defaults."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="I2VD_", env_nested_delimiter="__")

    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    state_dir: Path | None = Field(default=None, description="default: INBOX/.i2vd (must be on the inbox's filesystem)")
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    intake: IntakeConfig = IntakeConfig()
    encode: EncodeConfig = EncodeConfig()
    publish: PublishConfig = PublishConfig()
    worker: WorkerConfig = WorkerConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.inbox / ".i2vd"


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `key.path: message`, which names the key and (for choices) the allowed values."""
    lines = [f"invalid configuration in {source}:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {key}: {problem['msg']}")
    return "\n".join(lines)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: Path | None = None, path_overrides: dict[str, str | Path | None] | None = None) -> DaemonConfig:
    """Load and validate the configuration; raise `ConfigError` with a readable message when it is wrong."""
    data = _read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "defaults/environment"
    try:
        config = DaemonConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc
    flags = {key: Path(value) for key, value in (path_overrides or {}).items() if value is not None}
    unknown = set(flags) - {"inbox", "outbox", "state_dir"}
    if unknown:
        raise ConfigError(f"unknown path override(s): {sorted(unknown)}")
    # Applied after the settings sources, so CLI flags win over the environment. Only paths, which need no
    # validation beyond the Path conversion above.
    return config.model_copy(update=flags) if flags else config

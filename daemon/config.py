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
BackendName = Literal["i2vgen-xl", "svd", "ltx-video", "wan-i2v"]
"""The image-to-video model families the daemon can serve (daemon/modelrules.py holds each one's rules)."""
MAX_FRAMES = 257
"""The widest frame count any backend accepts (LTX-Video); each backend's own range is in daemon/modelrules.py."""
VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def resolve_compile_scope(mode: str, scope: str) -> str:
    """'auto' made concrete: CUDA graphs need the step as one graph; everything else compiles per layer."""
    if scope != "auto":
        return scope
    return "step" if mode in CUDA_GRAPH_MODES else "blocks"


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
    num_frames: Annotated[int, Field(ge=8, le=MAX_FRAMES)] | None = None
    fps: Annotated[int, Field(ge=1, le=60)] | None = None
    target_fps: Annotated[int, Field(ge=1, le=60)] | None = None
    steps: Annotated[int, Field(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0)] | None = None
    # Model-specific settings: only the backends that use them accept them (daemon/modelrules.py).
    motion_bucket_id: Annotated[int, Field(ge=0, le=255)] | None = None
    noise_aug_strength: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    decode_chunk_size: Annotated[int, Field(ge=1, le=64)] | None = None
    mode: Literal["exact", "fast"] | None = None
    """i2vgen-xl only: `fast` reuses deep UNet features between steps (the `preview` preset's default); None: the
    model config's `mode`."""

    @model_validator(mode="after")
    def _width_and_height_together(self) -> GenerationSettings:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.width is not None and self.resolution is not None:
            raise ValueError("give either resolution or width+height, not both")
        return self


SEED_DEFAULTS = GenerationSettings(resolution="512p", num_frames=16, fps=8, target_fps=16, steps=50, guidance_scale=9.0)
SEED_PRESETS: dict[PresetName, GenerationSettings] = {
    "preview": GenerationSettings(resolution="512p", num_frames=16, steps=25, mode="fast"),
    "standard": GenerationSettings(resolution="512p", num_frames=16, steps=50),
    "high": GenerationSettings(resolution="768p", num_frames=16, steps=50),
}


class GenerationConfig(_Frozen):
    """Job defaults and presets. The embedded CPU config shrinks them; a GPU config keeps the seed's values."""

    defaults: GenerationSettings = SEED_DEFAULTS
    presets: dict[PresetName, GenerationSettings] = Field(default_factory=lambda: dict(SEED_PRESETS))
    max_pixels: Annotated[int, Field(ge=64 * 64)] = 1824 * 1024  # 1024p at 16:9
    negative_prompt: str = ""
    backend: BackendName = Field(
        default="i2vgen-xl",
        description="the model whose rules jobs are checked against; follows model.backend (set it there)",
    )


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
    backend: BackendName = Field(
        default="i2vgen-xl", description="model family of `source`: i2vgen-xl, svd, ltx-video, wan-i2v (README: Models)"
    )
    vae_tiling: bool = Field(
        default=False, description="ltx-video, wan-i2v: decode in spatial tiles from the start (less VRAM, slower)"
    )
    mode: Literal["exact", "fast"] = Field(
        default="exact", description="'exact': the stock maths; 'fast': DeepCache feature reuse (BENCHMARKS.md, GPU)"
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        default="off", description="torch.compile mode for the UNet step on CUDA (cache kept in cache_dir/compile)"
    )
    compile_scope: Literal["auto", "blocks", "step"] = Field(
        default="auto",
        description="'blocks': each UNet layer (and the VAE decoder's, with compile_vae) is its own graph (half "
        "the warm-up, same speed); 'step': the whole UNet step is one graph (what CUDA graphs need); 'auto': "
        "'step' for the CUDA-graph modes, else 'blocks'",
    )
    compile_vae: bool = Field(
        default=False,
        description="with compile_scope 'blocks', compile the VAE decoder's layers too: decode 0.28 -> 0.17 s at "
        '512x512x16 on an H200, ~6 s more restart-to-READY (BENCHMARKS.md "Compile scope")',
    )
    precompile_layers: bool = Field(
        default=True,
        description="with compile_scope 'blocks', save each layer's compiled graph whole (torch's ahead-of-time "
        "compile) in cache_dir/compile, so a restart loads it instead of tracing every layer again with dynamo",
    )
    compile_cache_max_age_days: float = Field(
        default=30,
        ge=0,
        description="with compile, the warm-up deletes the saved compile artefacts in cache_dir/compile (layer "
        "graphs, mega-caches) that no start has used for this many days: those of an older torch, GPU, model, "
        "compile mode, diffusers or attention code (~130 MB per key); 0 keeps everything. Inductor's and "
        "Triton's own caches are left alone",
    )
    channels_last: bool | None = Field(
        default=None,
        description="i2vgen-xl on CUDA: the UNet's convolution weights in channels-last layout (cuDNN's own, no "
        "layout copies around each convolution). Unset: on with the per-layer compile (512x512x16 exact 6.93 -> "
        "6.63 s on an H200), off otherwise (an eager step was slower with it); BENCHMARKS.md, "
        '"Attention kernels and channels-last"',
    )
    split_linear_bias: bool | None = Field(
        default=None,
        description="i2vgen-xl on CUDA: the UNet's linear layers add their bias after the GEMM, where the compiler "
        "fuses it into the next kernel, instead of in cuBLAS's epilogue (its 320-wide biased GEMM ran at 278 "
        "TFLOP/s, 486 without the bias). Unset: on with the per-layer compile (on an H200 a 512x512x16 step timed "
        "alone 117.5 -> 114.2 ms, inside a 50-step video 111.2 -> 108.0 ms), off otherwise and after a compile "
        'falls back to eager (an extra kernel in eager mode); BENCHMARKS.md, "A linear\'s bias after its GEMM"',
    )
    warm_up_batch_sizes: tuple[Annotated[int, Field(ge=1, le=64)], ...] = Field(
        default=(1,),
        min_length=1,
        description="with compile, the batch sizes the warm-up renders before READY; a batch size first met later "
        "compiles its layer graphs then (a one-time pause: about 10 s with a warm compile cache, over a minute "
        "cold). Each extra size adds that to restart-to-READY; list up to worker.max_batch_size to pay it at start",
    )

    @model_validator(mode="after")
    def _scope_fits_mode(self) -> ModelConfig:
        if self.compile_scope == "blocks" and self.compile in CUDA_GRAPH_MODES:
            raise ValueError(
                f"model.compile: {self.compile!r} (CUDA graphs) needs model.compile_scope 'step' or 'auto'; with "
                "'blocks' use 'default' or 'max-autotune-no-cudagraphs' (CUDA graphs over the 83 layer graphs of a "
                'step were slower and unstable, BENCHMARKS.md "Compile scope")'
            )
        return self

    @field_validator("warm_up_batch_sizes")
    @classmethod
    def _sorted_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(value)))

    @property
    def resolved_compile_scope(self) -> str:
        return resolve_compile_scope(self.compile, self.compile_scope)

    def resolved_channels_last(self, compile_mode: str) -> bool:
        """`channels_last`, or where unset whether the UNet is compiled per layer (`compile_mode` as it applies
        on this device: 'off' on the CPU)."""
        if self.channels_last is not None:
            return self.channels_last
        return self._compiled_per_layer(compile_mode)

    def resolved_split_linear_bias(self, compile_mode: str) -> bool:
        """`split_linear_bias`, or where unset whether the UNet is compiled per layer (as `resolved_channels_last`)."""
        if self.split_linear_bias is not None:
            return self.split_linear_bias
        return self._compiled_per_layer(compile_mode)

    def _compiled_per_layer(self, compile_mode: str) -> bool:
        return compile_mode != "off" and self.resolved_compile_scope == "blocks"

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
    decode_in_child: bool = True
    """Decode each image in a child process with an address-space and a CPU limit (`daemon/decodebox.py`): a
    decoder crash or a runaway decode refuses that pair (`decode_crashed`, `decode_too_costly`) and the daemon goes
    on. false: decode in the daemon's process (a crash then costs a restart, and the pair is refused after it)."""
    decode_cpu_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 20.0
    """CPU seconds one image's decode may take in the child (whole seconds, rounded up); the wall-clock limit is
    twice that plus 5 s."""
    incomplete_grace_seconds: Annotated[float, Field(ge=0.0, le=86400.0)] = 30.0
    """A stable pair that looks unfinished (truncated image, sidecar sha256 not matching yet, half a YAML file) waits
    this much longer, files unchanged, before it is rejected; any change restarts the wait."""
    max_queued: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Claim no more pairs while this many jobs wait in the queue: under a flood the rest waits in the inbox (safe
    on disk) instead of in memory, and is claimed as the queue drains."""
    orphan_timeout_seconds: Annotated[float, Field(gt=0.0)] | None = 3600.0
    """An image or sidecar unchanged this long without its partner goes to failed/ (`orphan_timeout`); null: never."""
    duplicate_policy: Literal["process", "skip"] = "process"
    """A pair byte-identical to one already published (completed-input ledger, daemon/ledger.py): `process` it
    again under a new output name, or `skip` it (inputs archived in the state dir's done/ with a pointer file)."""


X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"]
VariantKind = Literal["video", "image", "gif", "sheet"]
_KIND_EXTS: dict[str, tuple[str, ...]] = {
    "video": ("mp4", "webm"),
    "image": ("png", "jpg"),
    "gif": ("gif",),
    "sheet": ("png", "jpg"),
}
_EXT_CODEC = {"mp4": "libx264", "webm": "libvpx-vp9"}


class VariantSpec(_Frozen):
    """A declarative ffmpeg finishing preset. Code builds the argv from these fields; no free-form ffmpeg options.

    Kinds: `video` (mp4 = H.264, webm = VP9), `image` (one frame as png/jpg), `gif` (palette-optimised animated
    GIF), `sheet` (a `columns` x `rows` grid of evenly spaced frames, each scaled to `width` x `height`).
    Every field is a bounded number or a closed choice, so a config can never smuggle an ffmpeg option or filter.
    """

    kind: VariantKind
    ext: Literal["mp4", "webm", "png", "jpg", "gif"]
    width: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    height: Annotated[int, Field(ge=16, le=4096, multiple_of=2)] | None = None
    fit: Literal["pad", "crop", "stretch"] = "pad"
    fps: Annotated[float, Field(gt=0.0, le=120.0)] | None = None
    interpolate: bool = Field(
        default=False, description="motion-interpolate to `fps` (minterpolate) instead of dup/drop"
    )
    codec: Literal["libx264", "libvpx-vp9"] | None = Field(default=None, description="default: from ext")
    crf: Annotated[int, Field(ge=0, le=63)] = 23
    preset: X264Preset = "fast"
    frame: Annotated[int, Field(ge=0, le=100_000)] | Literal["middle", "last"] = 0
    columns: Annotated[int, Field(ge=1, le=16)] = 4
    rows: Annotated[int, Field(ge=1, le=16)] = 4

    @property
    def video_codec(self) -> str:
        """The encoder of a `video` variant: the explicit `codec`, else the one its container implies."""
        return self.codec or _EXT_CODEC.get(self.ext, "libx264")

    @model_validator(mode="after")
    def _consistent(self) -> VariantSpec:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.ext not in _KIND_EXTS[self.kind]:
            raise ValueError(f"a {self.kind} variant must have ext in {list(_KIND_EXTS[self.kind])}")
        if self.codec is not None and (self.kind != "video" or self.codec != _EXT_CODEC[self.ext]):
            raise ValueError(f"codec {self.codec!r} does not fit a {self.kind} .{self.ext} variant")
        if self.kind == "video" and self.video_codec == "libx264" and self.crf > 51:
            raise ValueError("crf for libx264 must be <= 51")
        if self.fps is not None and self.kind not in ("video", "gif"):
            raise ValueError("fps applies to video and gif variants only")
        if self.interpolate and (self.kind != "video" or self.fps is None):
            raise ValueError("interpolate needs a video variant with fps")
        if (
            self.kind == "sheet"
            and self.width is not None
            and max(self.columns * self.width, self.rows * (self.height or 0)) > 8192
        ):
            raise ValueError("a contact sheet must stay within 8192 pixels per side")
        return self


DEFAULT_VARIANTS: dict[str, VariantSpec] = {
    "vertical": VariantSpec(kind="video", ext="mp4", width=1080, height=1920, fit="pad", crf=23, preset="fast"),
    "square": VariantSpec(kind="video", ext="mp4", width=1080, height=1080, fit="pad", crf=23, preset="fast"),
    "landscape": VariantSpec(kind="video", ext="mp4", width=1920, height=1080, fit="pad", crf=23, preset="fast"),
    "fps30": VariantSpec(kind="video", ext="mp4", fps=30.0, crf=23, preset="fast"),
    "first_frame": VariantSpec(kind="image", ext="png", frame=0),
    "poster": VariantSpec(kind="image", ext="jpg", frame="middle"),
    "gif": VariantSpec(kind="gif", ext="gif"),
    "webm": VariantSpec(kind="video", ext="webm", crf=32, preset="fast"),
    "contact_sheet": VariantSpec(kind="sheet", ext="png", width=256, height=256, columns=4, rows=2),
}
"""The preset library. Config `encode.variants` adds presets to it (or redefines one by name)."""


class EncodeConfig(_Frozen):
    """The main MP4 and the ffmpeg finishing variants."""

    ffmpeg: Path | None = Field(default=None, description="ffmpeg binary; default: the one bundled by imageio-ffmpeg")
    crf: Annotated[int, Field(ge=0, le=51)] = 18
    preset: X264Preset = "medium"
    timeout_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 300.0
    variants: dict[str, VariantSpec] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    default_variants: tuple[str, ...] = ("vertical", "fps30", "first_frame")
    max_concurrent_ffmpeg: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2, description="ffmpeg processes at once per worker (main MP4 write, variants and read-backs)"
    )
    nice: Annotated[int, Field(ge=0, le=19)] = Field(
        default=10,
        description="niceness of every ffmpeg process: finishing is background work and must not take the CPU "
        "from the generation process that feeds the GPU (0: same priority as the daemon)",
    )
    finishing_backlog: Annotated[int, Field(ge=0, le=64)] = Field(
        default=2, description="generated jobs that may wait for finishing before the generator pauses"
    )

    @field_validator("variants", mode="before")
    @classmethod
    def _merge_library(cls, value: object) -> object:
        """Config presets are added to the library (same name: replaced), so adding one never hides the rest."""
        return {**DEFAULT_VARIANTS, **value} if isinstance(value, dict) else value

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
    """Where outputs go and what happens to inputs once their outputs are durable."""

    processed_inputs: Literal["archive", "delete"] = "archive"
    daily_subfolders: bool = Field(default=False, description="publish into outbox/YYYY-MM-DD/ (local date)")


SanityPolicy = Literal["fail", "warn", "off"]


class SanityConfig(_Frozen):
    """Checks on the generated frames before anything is encoded (daemon/sanity.py; README explains thresholds).

    Levels are 0-255 RGB means. `fail` sends the job straight to failed/ (reason `sanity_failed`): the same seed
    would give the same frames, so a retry only burns GPU time. `warn` publishes and records the result.
    """

    nonfinite: SanityPolicy = "fail"
    frame_count: SanityPolicy = "fail"
    black: SanityPolicy = "fail"
    white: SanityPolicy = "fail"
    frozen: SanityPolicy = "warn"
    black_max_mean: Annotated[float, Field(ge=0.0, le=255.0)] = 4.0
    white_min_mean: Annotated[float, Field(ge=0.0, le=255.0)] = 251.0
    frozen_max_mad: Annotated[float, Field(ge=0.0, le=255.0)] = 0.5


class WorkerConfig(_Frozen):
    """Per-job error policy: transient failures (OOM, ffmpeg crash, full disk) are retried, then quarantined."""

    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    decode_in_child: bool = False
    """Decode the image for the model in a limited child too, as intake's check does (`daemon/decodebox.py`).
    Off by default: the worker decodes bytes that intake's child already decoded, checked by sha256, and this
    decode is on the GPU's critical path, where the pixels' trip back through the pipe costs 17 ms for a 512x512
    PNG and 184 ms for a 12-megapixel JPEG (2 cores, BENCHMARKS.md)."""
    retry_delay_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 5.0
    stop_timeout_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = 60.0
    job_timeout_seconds: Annotated[float, Field(gt=0.0, le=86400.0)] = 3600.0
    """Wall-clock limit for one job's generation; past it the worker process is killed and the job retried."""
    stop_grace_seconds: Annotated[float, Field(ge=0.0, le=3600.0)] = 0.0
    """On the first stop signal, let running jobs finish generating for up to this long before interrupting them
    between denoising steps (0: interrupt at once; the job is resumed from the start by the next start)."""
    max_batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    """Upper bound on jobs generated together (same size, frames and steps) when the generator can batch; the
    generator's own VRAM budget may allow fewer. 1 turns batching off."""
    batch_wait_seconds: Annotated[float, Field(ge=0.0, le=600.0)] = 0.0
    """How long the worker waits for compatible jobs to fill a batch (0: batch only what is already queued)."""


class RayConfig(_Frozen):
    """The `ray` executor: generator actors on a Ray cluster; the shared inbox stays the only durable job store."""

    address: str | None = Field(default=None, description="ray://host:10001 or 'auto'; None starts a local Ray")
    namespace: str = "i2vd"
    workers: Annotated[int, Field(ge=1, le=4096)] = 1
    num_gpus_per_worker: Annotated[float, Field(ge=0.0, le=8.0)] = 1.0
    max_restarts: Annotated[int, Field(ge=-1, le=1000)] = 3
    detached: bool = True
    """Named detached actors keep their pipelines warm across a restart of the watcher."""


class ExecutorConfig(_Frozen):
    """Where generation runs: `local` (one supervised worker process per device of this host) or `ray`."""

    kind: Literal["local", "ray"] = "local"
    devices: Literal["auto"] | list[str] = "auto"
    """local: 'auto' = every visible CUDA device (one CPU worker without CUDA), or a list like ['0', '1'] or ['cpu']."""
    workers_per_device: Annotated[int, Field(ge=1, le=16)] = 1
    isolation: Literal["process", "thread"] = "process"
    """process: generation runs in a child process, so a segfault or CUDA error cannot take the daemon down."""
    ray: RayConfig = RayConfig()


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
    require_mounts: list[Path] = Field(
        default_factory=list, description="mount points that must be mounted before start (like RequiresMountsFor=)"
    )
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    intake: IntakeConfig = IntakeConfig()
    encode: EncodeConfig = EncodeConfig()
    publish: PublishConfig = PublishConfig()
    sanity: SanityConfig = SanityConfig()
    worker: WorkerConfig = WorkerConfig()
    executor: ExecutorConfig = ExecutorConfig()
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

    @model_validator(mode="before")
    @classmethod
    def _generation_follows_model_backend(cls, data: Any) -> Any:
        """Jobs are resolved with `generation` only, so it carries the model's backend (set once, in `model`)."""
        return _share_backend(data)

    def _check_defaults_and_presets_resolve(self) -> None:
        """A job that sets nothing but its prompt (and one per preset) must resolve under the model's rules:
        defaults the model cannot do (`num_frames: 40` for I2VGen-XL) are a configuration error at start, not a
        rejection of every sidecar that relied on them. Presets are checked where the configuration sets them (a
        shipped preset beyond a lowered `max_pixels` is only unavailable, as a sidecar asking for it learns)."""
        from daemon.errors import JobRejected
        from daemon.jobspec import JobSpec, resolve_job

        presets = self.generation.presets if "presets" in self.generation.model_fields_set else {}
        for preset in (None, *presets):
            spec = JobSpec(prompt="configuration check", preset=preset)
            try:
                resolve_job(spec, self.generation, self.encode, stem="config", seed=0)
            except JobRejected as exc:
                where = "generation.defaults" if preset is None else f"generation.presets.{preset} (over the defaults)"
                raise ValueError(f"{where}: a job that sets only its prompt would be refused: {exc.message}") from exc

    @model_validator(mode="after")
    def _settings_fit_the_backend(self) -> DaemonConfig:
        # Imported here: modelrules builds on this module's types.
        from daemon.modelrules import check_generation_config

        check_generation_config(self.generation)
        self._check_defaults_and_presets_resolve()
        largest = max(self.model.warm_up_batch_sizes)
        if largest > self.worker.max_batch_size:
            raise ValueError(
                f"model.warm_up_batch_sizes: {largest} is larger than worker.max_batch_size "
                f"{self.worker.max_batch_size}, so no batch of that size is ever formed"
            )
        return self

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.inbox / ".i2vd"


def _share_backend(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    model, generation = data.get("model"), data.get("generation")
    backend = model.get("backend") if isinstance(model, dict) else getattr(model, "backend", None)
    if backend is None:
        return data
    if isinstance(generation, GenerationConfig):
        if "backend" in generation.model_fields_set and generation.backend != backend:
            raise ValueError(f"generation.backend {generation.backend!r} differs from model.backend {backend!r}")
        return {**data, "generation": generation.model_copy(update={"backend": backend})}
    generation = dict(generation) if isinstance(generation, dict) else {}
    if generation.setdefault("backend", backend) != backend:
        raise ValueError(f"generation.backend {generation['backend']!r} differs from model.backend {backend!r}")
    return {**data, "generation": generation}


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

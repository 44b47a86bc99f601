"""The sidecar contract: parse hostile YAML safely into a strict `JobSpec`, then resolve it into a `ResolvedJob`.

A sidecar is written by people and scripts we do not control, so parsing refuses anything surprising: aliases and
anchors (billion-laughs), duplicate keys (PyYAML silently keeps the last), non-string keys, unknown keys, and
values of the wrong type (`strict`: `true` is not a number, `"16"` is not an int). Every refusal names the key.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon import modelrules
from daemon.config import (
    MAX_FRAMES,
    TIER_SHORT_SIDE,
    EncodeConfig,
    GenerationConfig,
    GenerationSettings,
    PresetName,
    TierName,
)
from daemon.errors import JobRejected

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Device names Windows refuses as file names; an outbox shared over SMB must never be asked for one.
_RESERVED_NAMES = frozenset({"con", "prn", "aux", "nul"} | {f"{d}{n}" for d in ("com", "lpt") for n in range(1, 10)})
FALLBACK_OUTPUT_NAME = "image"
MAX_YAML_DEPTH = 8
"""A sidecar is a flat mapping (one list, `variants`): deeper nesting is an attack on the recursive composer."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# I2VGen-XL's VAE downsamples by 8, so pixel sizes must be multiples of 8.
SIZE_MULTIPLE = 8
MAX_ASPECT = 16 / 9


def sanitize_output_name(raw: str) -> str:
    """Reduce a user-supplied stem to `[A-Za-z0-9._-]`, no leading dot, at most 64 chars; refuse an empty result.

    Accents are dropped first (NFKD), so `café` in NFC or NFD both give `cafe`. No separator, `..`-only name, NUL
    or control character survives, so the name can never leave the outbox; Windows device names are refused.
    """
    ascii_text = "".join(ch for ch in unicodedata.normalize("NFKD", raw) if not unicodedata.combining(ch))
    cleaned = _UNSAFE_NAME_CHARS.sub("_", ascii_text).strip("._-")[:64].rstrip("._-")
    if not cleaned:
        raise ValueError("output_name has no usable characters (allowed: letters, digits, '.', '_', '-')")
    if cleaned.split(".")[0].lower() in _RESERVED_NAMES:
        raise ValueError(f"output_name {cleaned!r} is a reserved device name on Windows")
    return cleaned


def output_name_for_stem(stem: str) -> str:
    """The output name of a job whose sidecar gave none: its sanitized stem, or `image` when nothing is left."""
    try:
        return sanitize_output_name(stem)
    except ValueError:
        return FALLBACK_OUTPUT_NAME


class JobSpec(BaseModel):
    """What a sidecar asked for. All keys except `prompt` are optional; unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    preset: PresetName | None = None
    resolution: TierName | None = None
    width: Annotated[int, Field(ge=64, le=2048, multiple_of=SIZE_MULTIPLE)] | None = None
    height: Annotated[int, Field(ge=64, le=2048, multiple_of=SIZE_MULTIPLE)] | None = None
    # The configured backend's own frame rule is checked in resolve_job (daemon/modelrules.py).
    num_frames: Annotated[int, Field(ge=8, le=MAX_FRAMES)] | None = None
    fps: Annotated[int, Field(ge=1, le=60)] | None = None
    target_fps: Annotated[int, Field(ge=1, le=60)] | None = None
    steps: Annotated[int, Field(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0)] | None = None
    motion_bucket_id: Annotated[int, Field(ge=0, le=255)] | None = None
    noise_aug_strength: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    decode_chunk_size: Annotated[int, Field(ge=1, le=64)] | None = None
    mode: Literal["exact", "fast"] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    # YAML gives lists; strict mode would refuse a list for a tuple, so this field alone is lax (items stay str).
    variants: Annotated[tuple[Annotated[str, Field(max_length=32)], ...], Field(strict=False, max_length=16)] | None = (
        None
    )
    priority: Annotated[int, Field(ge=-100, le=100)] = 0
    output_name: str | None = None
    # Sidecar-last protocol: the image's sha256, so a pair starts only once the image is complete (see intake).
    sha256: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value.strip()

    @field_validator("output_name")
    @classmethod
    def _sanitize_name(cls, value: str | None) -> str | None:
        return None if value is None else sanitize_output_name(value)

    @field_validator("sha256")
    @classmethod
    def _is_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.strip().lower().removeprefix("sha256:")
        if not _SHA256.fullmatch(digest):
            raise ValueError("sha256 must be 64 hexadecimal digits (the output of `sha256sum IMAGE`)")
        return digest

    @model_validator(mode="after")
    def _size_is_one_choice(self) -> JobSpec:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.width is not None and self.resolution is not None:
            raise ValueError("give either resolution or width+height, not both")
        return self

    def settings(self) -> GenerationSettings:
        """The generation settings this sidecar set explicitly (the top layer of resolution)."""
        return GenerationSettings(
            resolution=self.resolution,
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            fps=self.fps,
            target_fps=self.target_fps,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            motion_bucket_id=self.motion_bucket_id,
            noise_aug_strength=self.noise_aug_strength,
            decode_chunk_size=self.decode_chunk_size,
            mode=self.mode,
        )


class ResolvedJob(BaseModel):
    """A job with every setting decided: what the worker runs and what the manifest records as 'used'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative_prompt: str
    preset: PresetName | None
    resolution: TierName | None
    width: int
    height: int
    num_frames: int
    fps: int
    target_fps: int
    steps: int
    guidance_scale: float
    seed: int
    variants: tuple[str, ...]
    priority: int
    output_name: str
    estimated_vram_bytes: int
    model_options: dict[str, int | float] = Field(default_factory=dict)
    """Settings only the configured backend uses (e.g. svd's motion_bucket_id); `GenerationRequest.options`."""
    mode: Literal["exact", "fast"] | None = None
    """i2vgen-xl sampling mode from the sidecar or preset (None: the model config's); `GenerationRequest.mode`."""

    @property
    def duration_seconds(self) -> float:
        return self.num_frames / self.fps


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate keys and non-string keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a string", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _refuse_aliases_and_depth(text: str) -> None:
    """Walk the parser's events (iterative, unlike the composer) and refuse aliases, anchors and deep nesting."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise JobRejected("sidecar uses YAML anchors/aliases, which are not allowed", reason="sidecar_yaml")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                message = f"sidecar nests lists or mappings more than {MAX_YAML_DEPTH} levels deep"
                raise JobRejected(message, reason="sidecar_yaml")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_sidecar_mapping(data: bytes) -> dict[str, Any]:
    """Decode and safely parse sidecar bytes into a plain mapping, or raise `JobRejected` saying why."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobRejected(f"sidecar is not UTF-8 text: {exc}", reason="sidecar_encoding") from exc
    try:
        _refuse_aliases_and_depth(text)
        document = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as exc:
        raise JobRejected(f"sidecar is not valid YAML: {exc}", reason="sidecar_yaml") from exc
    except (ValueError, OverflowError) as exc:
        # PyYAML's constructors raise these for values it recognises but cannot build: an impossible date
        # (2024-13-45), an integer past Python's 4300-digit limit, a sexagesimal float too large for a float.
        raise JobRejected(f"sidecar has a value YAML cannot represent: {exc}", reason="sidecar_yaml") from exc
    if not isinstance(document, dict):
        raise JobRejected("sidecar must be a YAML mapping with at least a 'prompt' key", reason="sidecar_yaml")
    return document


def parse_sidecar(data: bytes) -> JobSpec:
    """Parse sidecar bytes into a `JobSpec`; every problem becomes one `key: message` line of the rejection."""
    mapping = load_sidecar_mapping(data)
    try:
        return JobSpec.model_validate(mapping)
    except ValidationError as exc:
        problems = [_describe(err["loc"], err["msg"], err.get("input")) for err in exc.errors()]
        raise JobRejected("; ".join(problems), reason="sidecar_invalid", detail=problems) from exc


def _describe(location: tuple[int | str, ...], message: str, value: object) -> str:
    """`key: message`, with a hint when YAML 1.1 turned a word into a bool (`no`, `on`, `yes`: the Norway problem)."""
    line = f"{'.'.join(str(p) for p in location) or 'sidecar'}: {message}"
    if isinstance(value, bool) and "string" in message:
        line += " (YAML reads yes/no/on/off/true/false as a boolean: put the text in quotes)"
    return line


def _merge(layers: list[GenerationSettings]) -> dict[str, Any]:
    """Fold settings layers (lowest precedence first). Size (tier or width+height) is one unit."""
    merged: dict[str, Any] = {}
    for layer in layers:
        values = layer.model_dump(exclude_none=True)
        if "resolution" in values or "width" in values:
            for key in ("resolution", "width", "height"):
                merged.pop(key, None)
        merged.update(values)
    return merged


def tier_size(tier: TierName, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """A tier fixes the short side; the long side follows the image's aspect ratio (capped at 16:9)."""
    short = TIER_SHORT_SIDE[tier]
    if image_size is None:
        return short, short
    width, height = image_size
    aspect = min(max(width, height) / max(1, min(width, height)), MAX_ASPECT)
    long = round(short * aspect / SIZE_MULTIPLE) * SIZE_MULTIPLE
    return (long, short) if width >= height else (short, long)


def estimate_vram_bytes(
    width: int, height: int, num_frames: int, backend: str = "i2vgen-xl", decode_chunk: int = 8
) -> int:
    """Peak VRAM of the configured model at its published size: the measured model of that backend
    (`daemon.generate.estimates`; I2VGen-XL in fp16 with batched CFG, the others in their published dtype)."""
    from daemon.generate.estimates import job_peak_bytes

    return job_peak_bytes(backend, width, height, num_frames, decode_chunk)


def resolve_job(
    spec: JobSpec,
    generation: GenerationConfig,
    encode: EncodeConfig,
    *,
    stem: str,
    image_size: tuple[int, int] | None = None,
    seed: int | None = None,
    decode_chunk: int = 8,
) -> ResolvedJob:
    """Apply precedence sidecar > preset > config defaults > seed defaults, and check the result against limits.
    `decode_chunk` is `model.decode_chunk_size`, the generator's chunk when the job does not set its own (it moves
    the estimated peak of backends that decode in chunks)."""
    layers = modelrules.settings_layers(generation, spec.preset, image_size)
    layers.append(spec.settings())
    merged = _merge(layers)
    if "width" in merged:
        width, height = merged["width"], merged["height"]
    else:
        width, height = modelrules.fit_size(generation.backend, *tier_size(merged["resolution"], image_size))
    if width * height > generation.max_pixels:
        raise JobRejected(
            f"{width}x{height} is {width * height} pixels; this daemon allows at most {generation.max_pixels}",
            reason="too_large",
        )
    variants = spec.variants if spec.variants is not None else encode.default_variants
    unknown = [name for name in variants if name not in encode.variants]
    if unknown:
        raise JobRejected(f"variants: unknown {unknown}; allowed: {sorted(encode.variants)}", reason="sidecar_invalid")
    model_options = modelrules.check_job(
        generation.backend, spec.model_fields_set, merged | {"width": width, "height": height}
    )
    return ResolvedJob(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else generation.negative_prompt,
        preset=spec.preset,
        resolution=merged.get("resolution"),
        width=width,
        height=height,
        num_frames=merged["num_frames"],
        fps=merged["fps"],
        target_fps=merged["target_fps"],
        steps=merged["steps"],
        guidance_scale=merged["guidance_scale"],
        seed=spec.seed if spec.seed is not None else (seed if seed is not None else secrets.randbelow(2**32)),
        variants=tuple(dict.fromkeys(variants)),
        priority=spec.priority,
        output_name=spec.output_name or output_name_for_stem(stem),
        estimated_vram_bytes=estimate_vram_bytes(
            width,
            height,
            merged["num_frames"],
            generation.backend,
            int(model_options.get("decode_chunk_size", decode_chunk)),
        ),
        model_options=model_options,
        mode=merged.get("mode"),
    )

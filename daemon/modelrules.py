"""What each image-to-video backend can do, as data: frame counts, size multiples, limits, defaults, accepted keys.

Torch-free, so `i2vd validate`, sidecar resolution and config checks apply a model's rules without loading it.
The numbers come from the diffusers pipelines' own checks (`check_inputs`) and the published models' defaults;
each rule is stated in the rejection message, so a user learns what to ask for instead.

Sidecar keys a backend does not use are an error, not ignored. Decisions worth knowing:
- `prompt` stays required for every backend (it is the hot folder's contract). Stable Video Diffusion has no text
  conditioning: for `svd` the prompt is only a description recorded in the manifest, and `negative_prompt` (which
  would claim an effect) is refused.
- `guidance_scale` is the classifier-free guidance everywhere; for `svd` it is the guidance of the last frame
  (`max_guidance_scale`; the first frame's is 1.0, as in the pipeline's default ramp).
- `target_fps` is a conditioning input where the model has one (I2VGen-XL `target_fps`, SVD `fps`, LTX-Video
  `frame_rate`); Wan has none, so `wan-i2v` refuses the key. `fps` (the encode rate) is accepted everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.config import (
    SEED_DEFAULTS,
    SEED_PRESETS,
    BackendName,
    GenerationConfig,
    GenerationSettings,
    PresetName,
)
from daemon.errors import JobRejected

COMMON_KEYS = frozenset(
    {"prompt", "preset", "resolution", "width", "height", "num_frames", "fps", "steps", "seed", "variants"}
    | {"priority", "output_name", "guidance_scale"}
)
"""Sidecar keys every backend accepts."""
OPTION_KEYS = ("motion_bucket_id", "noise_aug_strength", "decode_chunk_size")
"""Model-specific settings; they reach the generator as `GenerationRequest.options`."""
OPTIONAL_KEYS = frozenset({"negative_prompt", "target_fps", "mode", *OPTION_KEYS})
"""Keys some backends use and others refuse."""


@dataclass(frozen=True)
class FrameRule:
    """num_frames = step * k + offset, within [minimum, maximum]."""

    minimum: int
    maximum: int
    step: int = 1
    offset: int = 0

    def allows(self, frames: int) -> bool:
        return self.minimum <= frames <= self.maximum and frames % self.step == self.offset % self.step

    def describe(self) -> str:
        form = "" if self.step == 1 else f" of the form {self.step}k+{self.offset}"
        return f"{self.minimum} to {self.maximum} frames{form}"

    def nearest(self, frames: int) -> int:
        """The closest allowed count (for the hint in a rejection)."""
        clamped = min(max(frames, self.minimum), self.maximum)
        below = clamped - (clamped - self.offset) % self.step
        return below if below >= self.minimum else below + self.step


@dataclass(frozen=True)
class ModelRules:
    """One backend's parameter rules; `why` ends each rejection so the user sees the rule's reason."""

    backend: BackendName
    title: str
    size_multiple: int
    max_pixels: int
    frames: FrameRule
    defaults: GenerationSettings
    presets: Mapping[PresetName, GenerationSettings]
    keys: frozenset[str]
    why: Mapping[str, str] = field(default_factory=dict)

    @property
    def option_keys(self) -> tuple[str, ...]:
        return tuple(key for key in OPTION_KEYS if key in self.keys)


def _presets(preview: dict[str, Any], standard: dict[str, Any], high: dict[str, Any]) -> dict[PresetName, Any]:
    return {
        "preview": GenerationSettings(**preview),
        "standard": GenerationSettings(**standard),
        "high": GenerationSettings(**high),
    }


_NO_TEXT = "Stable Video Diffusion has no text conditioning; the prompt is only recorded in the manifest"
RULES: Mapping[BackendName, ModelRules] = {
    "i2vgen-xl": ModelRules(
        backend="i2vgen-xl",
        title="I2VGen-XL",
        size_multiple=8,
        max_pixels=1824 * 1024,
        frames=FrameRule(8, 32),
        defaults=SEED_DEFAULTS,
        presets=SEED_PRESETS,
        keys=COMMON_KEYS | {"negative_prompt", "target_fps", "mode"},
        why={"size": "its VAE downsamples by 8", "frames": "its temporal layers were trained on 16-frame clips"},
    ),
    "svd": ModelRules(
        backend="svd",
        title="Stable Video Diffusion (SVD-xt)",
        size_multiple=8,
        max_pixels=1280 * 720,
        frames=FrameRule(8, 48),
        defaults=GenerationSettings(
            width=1024,
            height=576,
            num_frames=25,
            fps=7,
            target_fps=7,
            steps=25,
            guidance_scale=3.0,
            motion_bucket_id=127,
            noise_aug_strength=0.02,
        ),
        presets=_presets(
            {"width": 768, "height": 432, "num_frames": 14, "steps": 15},
            {"width": 1024, "height": 576, "num_frames": 25, "steps": 25},
            {"width": 1024, "height": 576, "num_frames": 25, "steps": 40},
        ),
        keys=COMMON_KEYS | {"target_fps", *OPTION_KEYS},
        why={
            "size": "its VAE downsamples by 8",
            "frames": "SVD-xt was trained on 25-frame clips",
            "negative_prompt": _NO_TEXT,
        },
    ),
    "ltx-video": ModelRules(
        backend="ltx-video",
        title="LTX-Video",
        size_multiple=32,
        max_pixels=1280 * 720,
        frames=FrameRule(9, 257, step=8, offset=1),
        defaults=GenerationSettings(
            width=704, height=480, num_frames=161, fps=24, target_fps=24, steps=50, guidance_scale=3.0
        ),
        presets=_presets(
            {"width": 704, "height": 480, "num_frames": 97, "steps": 25},
            {"width": 704, "height": 480, "num_frames": 161, "steps": 50},
            {"width": 1216, "height": 704, "num_frames": 121, "steps": 50},
        ),
        keys=COMMON_KEYS | {"negative_prompt", "target_fps"},
        why={
            "size": "its VAE compresses 32x32 pixels into one latent",
            "frames": "its VAE compresses 8 frames into one latent after the first",
        },
    ),
    "wan-i2v": ModelRules(
        backend="wan-i2v",
        title="Wan 2.x image-to-video",
        size_multiple=16,
        max_pixels=1280 * 720,
        frames=FrameRule(9, 81, step=4, offset=1),
        defaults=GenerationSettings(
            width=832, height=480, num_frames=81, fps=16, target_fps=16, steps=50, guidance_scale=5.0
        ),
        presets=_presets(
            {"width": 832, "height": 480, "num_frames": 33, "steps": 25},
            {"width": 832, "height": 480, "num_frames": 81, "steps": 50},
            {"width": 1280, "height": 720, "num_frames": 81, "steps": 50},
        ),
        keys=COMMON_KEYS | {"negative_prompt"},
        why={
            "size": "its VAE downsamples by 8 and the transformer patches 2x2 latents",
            "frames": "its VAE compresses 4 frames into one latent after the first",
            "target_fps": "Wan has no frame-rate conditioning; use `fps` for the encoded rate",
        },
    ),
}


def rules_for(backend: BackendName) -> ModelRules:
    return RULES[backend]


def settings_layers(
    generation: GenerationConfig, preset: PresetName | None, image_size: tuple[int, int] | None = None
) -> list[GenerationSettings]:
    """Lowest precedence first: backend defaults, config defaults (if set), the preset (config's if set, else the
    backend's). The seed's defaults and presets are I2VGen-XL's; other backends start from their own.

    The backends' own sizes are landscape (as published); for a portrait image they are turned to portrait, so the
    video keeps the image's orientation. Sizes from the config or the sidecar are used as written."""
    rules = rules_for(generation.backend)
    portrait = image_size is not None and image_size[1] > image_size[0]
    layers = [_oriented(rules.defaults, portrait)]
    if "defaults" in generation.model_fields_set:
        layers.append(generation.defaults)
    if preset is not None:
        if "presets" in generation.model_fields_set:
            layers.append(generation.presets.get(preset, GenerationSettings()))
        else:
            layers.append(_oriented(rules.presets.get(preset, GenerationSettings()), portrait))
    return layers


def _oriented(settings: GenerationSettings, portrait: bool) -> GenerationSettings:
    if not portrait or settings.width is None or settings.height is None or settings.width <= settings.height:
        return settings
    return settings.model_copy(update={"width": settings.height, "height": settings.width})


def fit_size(backend: BackendName, width: int, height: int) -> tuple[int, int]:
    """Round a size derived from a tier (not one a user typed) to the model's multiple."""
    multiple = rules_for(backend).size_multiple
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def unused_key_problems(backend: BackendName, keys: Iterable[str]) -> list[str]:
    """`key: message` for each key this backend does not use."""
    rules = rules_for(backend)
    problems = []
    for key in sorted(set(keys) & OPTIONAL_KEYS - rules.keys):
        users = sorted(name for name, other in RULES.items() if key in other.keys)
        reason = rules.why.get(key, f"only {', '.join(users)} use it")
        problems.append(f"{key}: not used by {rules.title} (model.backend {backend}): {reason}; remove the key")
    return problems


def shape_problems(backend: BackendName, width: int, height: int, num_frames: int) -> list[str]:
    """`key: message` for each size or frame rule the job breaks, with the rule and a nearby allowed value."""
    rules, problems = rules_for(backend), []
    multiple = rules.size_multiple
    for key, value in (("width", width), ("height", height)):
        if value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            problems.append(
                f"{key}: {rules.title} needs sizes divisible by {multiple} ({rules.why['size']}); "
                f"{value} is not (try {nearest})"
            )
    if width * height > rules.max_pixels:
        problems.append(
            f"width: {width}x{height} is {width * height} pixels; {rules.title} allows at most {rules.max_pixels}"
        )
    if not rules.frames.allows(num_frames):
        problems.append(
            f"num_frames: {rules.title} makes {rules.frames.describe()} ({rules.why['frames']}); "
            f"{num_frames} is not allowed (try {rules.frames.nearest(num_frames)})"
        )
    return problems


def check_job(backend: BackendName, asked: Iterable[str], merged: Mapping[str, Any]) -> dict[str, int | float]:
    """Check a resolved job against the backend's rules; return its model options (the keys the backend uses).

    `asked` are the keys the sidecar set; `merged` the settings after every layer and the final width/height.
    Raises `JobRejected` (reason `sidecar_invalid`) with one `key: rule` line per problem.
    """
    problems = unused_key_problems(backend, asked)
    problems += shape_problems(backend, merged["width"], merged["height"], merged["num_frames"])
    if problems:
        raise JobRejected("; ".join(problems), reason="sidecar_invalid", detail=problems)
    return {key: merged[key] for key in rules_for(backend).option_keys if merged.get(key) is not None}


def check_generation_config(generation: GenerationConfig) -> None:
    """Config defaults and presets must not set keys the backend does not use: fail at start, not per job.

    Raises ValueError (the config validator turns it into the usual `invalid configuration` message)."""
    layers: dict[str, GenerationSettings] = {}
    if "defaults" in generation.model_fields_set:
        layers["generation.defaults"] = generation.defaults
    if "presets" in generation.model_fields_set:
        layers |= {f"generation.presets.{name}": value for name, value in generation.presets.items()}
    problems = []
    for where, settings in layers.items():
        keys = settings.model_dump(exclude_none=True)
        problems += [f"{where}.{line}" for line in unused_key_problems(generation.backend, keys)]
    if problems:
        raise ValueError("; ".join(problems))

"""I2VGen-XL behind the `Generator` protocol: loading (real weights or the embedded tiny model) and running one job.

Together with `i2vgenxl_loop` (the sampling maths) and `tiny` (the embedded model) this is the only code that
imports torch, diffusers and transformers; the rest of the daemon reaches it lazily through
`daemon.generate.load_generator`, so the worker, the CLI and most tests never pay for those imports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from daemon.config import ModelConfig
from daemon.errors import ConfigError, FatalError, TransientJobError
from daemon.generate import i2vgenxl_loop as loop
from daemon.generate.base import (
    GenerationRequest,
    GenerationResult,
    InterruptCheck,
    ModelInfo,
    StepCallback,
)
from daemon.generate.tiny import materialize_tiny_model, tiny_revision

EMBEDDED_TINY = "embedded-tiny"
DEFAULT_CLIP_SKIP: int | None = 1
"""Prompt embeddings from the penultimate text-encoder layer (+ final layer norm): the stock pipeline's default
(`clip_skip=1`) and what I2VGen-XL was trained with (VGen's OpenCLIP embedder uses layer "penultimate")."""

REQUIRED_FILES: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "scheduler": (("scheduler_config.json",),),
    "text_encoder": (("config.json",),),
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "image_encoder": (("config.json",),),
    "feature_extractor": (("preprocessor_config.json",),),
}
"""Per component, alternative sets of files of which one must be complete (transformers 5 saves a CLIP tokenizer
as tokenizer.json; the published repo ships vocab.json + merges.txt)."""


@dataclass(frozen=True)
class RenderedVideo:
    """A video before quantisation: what the stock pipeline returns with `output_type="np"` (one video)."""

    frames: npt.NDArray[np.float32]
    """(num_frames, height, width, 3) float32 in [0, 1]."""
    timings: Mapping[str, float]
    peak_vram_bytes: int


def library_versions() -> dict[str, str]:
    """Versions recorded in ModelInfo, since outputs depend on them."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def resolve_device_dtype(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """`auto` means CUDA + float16 when CUDA is available, else CPU + float32; explicit values are honoured
    unless they cannot work (CUDA absent, float16 on the CPU), which is a configuration error."""
    cuda = torch.cuda.is_available()
    name = config.device if config.device != "auto" else ("cuda" if cuda else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise ConfigError(f"model.device: {name!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    dtype_name = config.dtype if config.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    if dtype_name == "float16" and device.type == "cpu":
        raise ConfigError("model.dtype: float16 is not supported on the CPU; use 'auto', 'float32' or 'bfloat16'")
    dtype: torch.dtype = getattr(torch, dtype_name)
    return device, dtype


def check_model_dir(directory: Path) -> None:
    """Fail early, naming what is missing and where, instead of a library traceback halfway through loading."""
    expected = "a diffusers I2VGen-XL directory (model_index.json, " + ", ".join(REQUIRED_FILES) + ")"
    if not directory.is_dir():
        raise FatalError(f"model directory {directory} does not exist (model.source); expected {expected}")
    missing = [] if (directory / "model_index.json").is_file() else ["model_index.json"]
    for name, alternatives in REQUIRED_FILES.items():
        if not any(all((directory / name / file).is_file() for file in files) for files in alternatives):
            missing.append(" or ".join("+".join(f"{name}/{file}" for file in files) for files in alternatives))
    if missing:
        raise FatalError(
            f"model directory {directory} is incomplete: missing {', '.join(missing)}; expected {expected}"
        )


def _load(cls: Any, directory: Path, name: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(directory/name)` offline; any failure is fatal and says which component and where."""
    path = directory / name
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise FatalError(f"cannot load {name} ({cls.__name__}) from {path}: {exc}") from exc


def _transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 calls the argument `dtype` (and warns about `torch_dtype`); older ones `torch_dtype`."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_components(directory: Path, device: torch.device, dtype: torch.dtype) -> loop.Components:
    """Load every component with `from_pretrained` (the same path for real weights and the tiny model)."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    check_model_dir(directory)
    models = {
        "unet": _load(I2VGenXLUNet, directory, "unet", torch_dtype=dtype),
        "vae": _load(AutoencoderKL, directory, "vae", torch_dtype=dtype),
        "text_encoder": _load(CLIPTextModel, directory, "text_encoder", **_transformers_dtype(dtype)),
        "image_encoder": _load(CLIPVisionModelWithProjection, directory, "image_encoder", **_transformers_dtype(dtype)),
    }
    for model in models.values():
        model.to(device).eval()
    return loop.Components(
        **models,
        scheduler=_load(DDIMScheduler, directory, "scheduler"),
        tokenizer=_load(CLIPTokenizer, directory, "tokenizer"),
        feature_extractor=_load(CLIPImageProcessor, directory, "feature_extractor"),
    )


def _quiet_progress_bars() -> None:
    """The daemon logs structured lines; the libraries' tqdm bars (loading/saving shards) would be noise."""
    import diffusers
    import transformers

    libraries: tuple[Any, ...] = (diffusers, transformers)
    for library in libraries:
        library.utils.logging.disable_progress_bar()


def _embedded_tiny_dir(cache_dir: Path) -> Path:
    """Materialise the tiny model; a cache directory that cannot be written is fatal (config or disk problem)."""
    try:
        return materialize_tiny_model(cache_dir)
    except OSError as exc:
        raise FatalError(f"cannot build the embedded tiny model under {cache_dir} (model.cache_dir): {exc}") from exc


def load_generator(config: ModelConfig, *, clip_skip: int | None = DEFAULT_CLIP_SKIP) -> I2VGenXLGenerator:
    """Load the model named by `config.source` (a local diffusers directory, or `embedded-tiny`, which is first
    materialised into `config.cache_dir`) onto the resolved device and dtype. `load_seconds` covers all of it."""
    started = time.perf_counter()
    device, dtype = resolve_device_dtype(config)
    _quiet_progress_bars()
    if device.type == "cpu":
        # Late denoising steps produce subnormal floats; x86 handles them in microcode, which made a CPU step
        # 40x slower after the first ~15 steps (0.28 s -> 11 s at 128x128x16). Flushing them to zero is what
        # inference runtimes do and changes nothing at the 1e-4 level. (Set again per call in `render`: per thread.)
        torch.set_flush_denormal(True)
    if config.source == EMBEDDED_TINY:
        directory = _embedded_tiny_dir(config.cache_dir)
        revision: str | None = tiny_revision(directory)
    else:
        directory, revision = Path(config.source), config.revision
    parts = load_components(directory, device, dtype)
    info = ModelInfo(
        model_id=config.source,
        revision=revision,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
        library_versions=library_versions(),
    )
    return I2VGenXLGenerator(
        parts, info, device=device, decode_chunk_size=config.decode_chunk_size, clip_skip=clip_skip
    )


class _StageClock:
    """Seconds per stage; on CUDA it synchronises at each stage's end (once per stage, not per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        loop.synchronize(self.device)
        self.timings[stage] = time.perf_counter() - started


class I2VGenXLGenerator:
    """A loaded, warm I2VGen-XL; one job at a time (the worker is single-threaded per model)."""

    def __init__(
        self,
        parts: loop.Components,
        info: ModelInfo,
        *,
        device: torch.device,
        decode_chunk_size: int,
        clip_skip: int | None = DEFAULT_CLIP_SKIP,
    ) -> None:
        self._parts = parts
        self._info = info
        self._device = device
        self._decode_chunk_size = decode_chunk_size
        self._clip_skip = clip_skip

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def components(self) -> loop.Components:
        """The loaded components (e.g. to build the stock pipeline on the same weights for comparison)."""
        return self._parts

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        """Generate one video as uint8 RGB frames. Raises `TransientJobError` on out-of-memory, `JobInterrupted`
        when `should_interrupt` says so between steps."""
        video = self.render(request, on_step, should_interrupt)
        # Counted before the uint8 conversion, which cannot represent NaN (sanity.py reports it).
        nonfinite = int(video.frames.size - np.count_nonzero(np.isfinite(video.frames)))
        finite = video.frames if nonfinite == 0 else np.nan_to_num(video.frames, nan=0.0, posinf=1.0, neginf=0.0)
        frames = loop.to_uint8(finite)
        return GenerationResult(
            frames=frames, timings=video.timings, peak_vram_bytes=video.peak_vram_bytes, nonfinite_values=nonfinite
        )

    def render(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> RenderedVideo:
        """Like `generate`, but float frames in [0, 1]: comparable with the stock pipeline's `output_type="np"`."""
        if self._device.type == "cpu":
            # The flush-to-zero flag lives in each thread's MXCSR register; the worker thread that calls us is not
            # the thread that loaded the model (see load_generator).
            torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                return self._render(request, on_step, should_interrupt)
        except torch.cuda.OutOfMemoryError as exc:
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            size = f"{request.width}x{request.height}x{request.num_frames}"
            raise TransientJobError(f"out of GPU memory generating {size} on {self._device}: {exc}") from exc

    def _render(
        self, request: GenerationRequest, on_step: StepCallback | None, should_interrupt: InterruptCheck | None
    ) -> RenderedVideo:
        # A fresh scheduler per job: `set_timesteps` mutates it.
        scheduler = type(self._parts.scheduler).from_config(self._parts.scheduler.config)
        parts = dataclasses.replace(self._parts, scheduler=scheduler)
        guidance = request.guidance_scale > 1
        image = request.image.convert("RGB")
        clock = _StageClock(self._device)
        self._reset_peak_memory()
        with clock("encode_prompt"):
            prompt_embeds = loop.encode_prompt(
                parts, request.prompt, request.negative_prompt, guidance, self._clip_skip
            )
        with clock("encode_image"):
            cond = loop.Conditioning(
                prompt_embeds=prompt_embeds,
                image_embeddings=loop.encode_image(parts, image, request.width, guidance),
                image_latents=loop.encode_image_latents(
                    parts, image, (request.width, request.height), request.num_frames, guidance, request.seed
                ),
                fps=loop.fps_tensor(request.target_fps, guidance, self._device),
            )
        with clock("denoise"):
            # Timesteps stay on the CPU (the stock pipeline puts them on the device): DDIM indexes its CPU
            # `alphas_cumprod` with them, which with a CUDA timestep is a host sync on every step.
            scheduler.set_timesteps(request.steps)
            latents = loop.initial_latents(parts, self._latent_shape(request), prompt_embeds.dtype, request.seed)
            latents = loop.denoise(parts, latents, cond, request.guidance_scale, on_step, should_interrupt)
        with clock("decode"):
            frames = loop.decode(parts.vae, latents, self._decode_chunk_size)
        return RenderedVideo(frames=frames, timings=clock.timings, peak_vram_bytes=self._peak_memory())

    def _latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        """(1, C, F, H/s, W/s) where s = 2 ** (VAE levels - 1), as the stock `prepare_latents`."""
        scale = 2 ** (len(self._parts.vae.config.block_out_channels) - 1)
        channels = int(self._parts.unet.config.in_channels)
        return (1, channels, request.num_frames, request.height // scale, request.width // scale)

    def _reset_peak_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def _peak_memory(self) -> int:
        return int(torch.cuda.max_memory_allocated(self._device)) if self._device.type == "cuda" else 0

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes: `allocated`, `reserved` (torch's caching allocator), `total`, `free` (driver)."""
        if self._device.type != "cuda":
            return {}
        free, total = torch.cuda.mem_get_info(self._device)
        return {
            "allocated": int(torch.cuda.memory_allocated(self._device)),
            "reserved": int(torch.cuda.memory_reserved(self._device)),
            "total": int(total),
            "free": int(free),
        }

"""What every stock-pipeline backend shares: loading a local diffusers directory, the step callback (progress and
interrupt), the out-of-memory ladder, timings, peak VRAM and the conversion to uint8 frames.

A backend (svd.py, ltx.py, wan.py) only says how a `GenerationRequest` maps onto its pipeline's arguments and
which memory-saving steps its VAE offers. The diffusers pipelines are used as published (no own sampling loop):
their `callback_on_step_end` is the seam for progress and for stopping between steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import structlog
import torch

from daemon.config import BackendName, ModelConfig
from daemon.errors import ConfigError, FatalError, JobInterrupted, TransientJobError
from daemon.generate.base import GenerationRequest, GenerationResult, InterruptCheck, ModelInfo, StepCallback
from daemon.generate.cuda_memory import device_memory_stats, peak_memory_bytes
from daemon.generate.i2vgenxl import library_versions, resolve_device_dtype
from daemon.generate.i2vgenxl_loop import synchronize, to_uint8

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MemoryStep:
    """One rung of the out-of-memory ladder: applied before a retry of the same video, undone after the video.

    `phase` says where it helps: `decode` rungs (smaller decode chunks, VAE tiling) are only taken when the
    out-of-memory error came after the last denoising step; `any` rungs (CPU offload) always.
    """

    name: str
    phase: str
    apply: Callable[[], Mapping[str, Any]]
    """Changes the pipeline (or returns call arguments to override) for the retry."""
    undo: Callable[[], None] = field(default=lambda: None)


def resolve_runtime(config: ModelConfig, prefer_bfloat16: bool) -> tuple[torch.device, torch.dtype]:
    """Device and dtype as for I2VGen-XL, except that `auto` on CUDA means bfloat16 for models published in it
    (LTX-Video and Wan overflow in float16)."""
    device, dtype = resolve_device_dtype(config)
    if config.dtype == "auto" and device.type == "cuda" and prefer_bfloat16:
        dtype = torch.bfloat16
    return device, dtype


def read_model_index(directory: Path, backend: BackendName, class_names: Sequence[str]) -> dict[str, Any]:
    """Fail early, naming the backend and what the directory holds, instead of a traceback halfway through."""
    index_path = directory / "model_index.json"
    expected = f"a diffusers directory of {' or '.join(class_names)} (model_index.json and one folder per component)"
    if not directory.is_dir():
        raise FatalError(f"model directory {directory} does not exist (model.source); expected {expected}")
    try:
        index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FatalError(f"cannot read {index_path}: {exc}; expected {expected}") from exc
    found = index.get("_class_name")
    if found not in class_names:
        raise ConfigError(
            f"model.backend is {backend!r} but {index_path} describes {found!r}; expected {' or '.join(class_names)}"
        )
    missing = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (directory / name).is_dir()
    ]
    if missing:
        raise FatalError(
            f"model directory {directory} is incomplete: missing {', '.join(missing)}; expected {expected}"
        )
    return index


def load_pipeline(
    pipeline_class: Any, directory: Path, dtype: torch.dtype | dict[str, torch.dtype], device: torch.device
) -> Any:
    """`from_pretrained` on the local directory, offline; any failure is fatal and says where. `dtype` may map
    component names (and "default") to dtypes."""
    from diffusers.utils import deprecation_utils

    # diffusers renamed `torch_dtype` to `dtype` (and warns about the old name) in the releases with `_resolve_dtype`.
    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    try:
        pipe = pipeline_class.from_pretrained(directory, local_files_only=True, **{key: dtype})
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise FatalError(f"cannot load {pipeline_class.__name__} from {directory}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class StepTracker:
    """The pipelines' `callback_on_step_end`: reports each step, stops between steps when asked.

    Raising `JobInterrupted` from the callback ends the pipeline call at once (the pipelines' own `_interrupt`
    flag would still decode the unfinished latents, which costs time for a video nobody will publish).
    """

    def __init__(self, total: int, on_step: StepCallback | None, should_interrupt: InterruptCheck | None) -> None:
        self.total = total
        self.steps_done = 0
        self.started = self.last = time.perf_counter()
        self._on_step = on_step
        self._should_interrupt = should_interrupt

    def __call__(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.steps_done = index + 1
        total = int(getattr(pipe, "num_timesteps", None) or self.total)
        if self._on_step is not None:
            self._on_step(self.steps_done, total, seconds)
        if self._should_interrupt is not None and self._should_interrupt():
            raise JobInterrupted(f"interrupted after denoising step {self.steps_done} of {total}")
        return {}

    @property
    def phase(self) -> str:
        """`decode` once every denoising step has run, else `denoise`."""
        return "decode" if self.steps_done >= self.total else "denoise"


@dataclass
class _Run:
    """One video's progress across out-of-memory retries: latents survive a failed decode."""

    tracker: StepTracker
    latents: Any = None
    decode_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class DiffusersGenerator:
    """A warm stock diffusers image-to-video pipeline behind the `Generator` protocol."""

    backend: ClassVar[BackendName]

    def __init__(self, pipe: Any, info: ModelInfo, *, device: torch.device) -> None:
        # Inference mode for every module (dropout off): `from_pretrained` does it, a pipeline built in code does not.
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        self._pipe = pipe
        self._info = info
        self._device = device

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline (the benchmark calls it directly as the stock baseline)."""
        return self._pipe

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline's arguments for `request` (without generator, callback and output type)."""
        raise NotImplementedError

    def memory_ladder(self, request: GenerationRequest) -> list[MemoryStep]:
        """The rungs to try, in order, when a video runs out of device memory."""
        raise NotImplementedError

    decodes_latents: ClassVar[bool] = False
    """True when the backend decodes the pipeline's latents itself (`decode`): then an out-of-memory error in the
    decode retries only the decode, not the whole denoising."""

    def decode(self, latents: Any, request: GenerationRequest, overrides: Mapping[str, Any]) -> Any:
        """The pipeline's own decode of `output_type="latent"` output: (frames, height, width, 3) floats in [0, 1]."""
        raise NotImplementedError

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        """One video as uint8 RGB frames. On CUDA out-of-memory, walk the memory ladder and retry; when it is
        exhausted raise `TransientJobError`. `JobInterrupted` when `should_interrupt` says so between steps."""
        if should_interrupt is not None and should_interrupt():
            raise JobInterrupted("interrupted before the first denoising step")
        self._prepare_device()
        ladder = iter(self.memory_ladder(request))
        taken: list[MemoryStep] = []
        overrides: dict[str, Any] = {}
        run = _Run(StepTracker(request.steps, on_step, should_interrupt))
        try:
            while True:
                try:
                    video = self._render(request, overrides, run)
                    return self._result(video, run, overrides, tuple(step.name for step in taken))
                except torch.cuda.OutOfMemoryError as exc:
                    self._release_cached_memory()
                    phase = "decode" if run.latents is not None else run.tracker.phase
                    step = next((s for s in ladder if s.phase == "any" or phase == "decode"), None)
                    if step is None:
                        size = f"{request.width}x{request.height}x{request.num_frames}"
                        raise TransientJobError(
                            f"out of GPU memory generating {size} on {self._device}: {exc}"
                        ) from exc
                    log.warning("generate_degraded", step=step.name, phase=phase, backend=self.backend)
                    overrides |= step.apply()
                    taken.append(step)
                    if run.latents is None:
                        run.tracker = StepTracker(request.steps, on_step, should_interrupt)
        finally:
            for step in reversed(taken):
                step.undo()

    def _prepare_device(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        else:
            # Subnormal floats make CPU steps many times slower (see i2vgenxl.load_generator); the flag is per thread.
            torch.set_flush_denormal(True)

    def _render(self, request: GenerationRequest, overrides: Mapping[str, Any], run: _Run) -> Any:
        """Denoise (unless an earlier attempt did) and decode; float frames in [0, 1]."""
        if run.latents is None:
            # A CPU generator: the same seed makes the same initial noise on every device.
            generator = torch.Generator("cpu").manual_seed(request.seed)
            kwargs = {**self.call_kwargs(request), **overrides}
            output_type = "latent" if self.decodes_latents else "np"
            with torch.inference_mode():
                output = self._pipe(
                    **kwargs, generator=generator, output_type=output_type, callback_on_step_end=run.tracker
                )
            synchronize(self._device)
            if not self.decodes_latents:
                run.decode_seconds = time.perf_counter() - run.tracker.last
                return output.frames[0]
            run.latents = output.frames
        started = time.perf_counter()
        with torch.inference_mode():
            video = self.decode(run.latents, request, overrides)
        synchronize(self._device)
        run.decode_seconds = time.perf_counter() - started
        return video

    def _result(self, frames: Any, run: _Run, overrides: Mapping[str, Any], taken: tuple[str, ...]) -> GenerationResult:
        video = np.asarray(frames, dtype=np.float32)
        nonfinite = int(video.size - np.count_nonzero(np.isfinite(video)))
        if nonfinite:
            video = np.nan_to_num(video, nan=0.0, posinf=1.0, neginf=0.0)
        timings = {
            # The first step's time includes encoding the prompt and image: the stock pipeline does it inside.
            "denoise": run.tracker.last - run.tracker.started,
            "decode": run.decode_seconds,
            "pipeline": time.perf_counter() - run.started,
        }
        return GenerationResult(
            frames=to_uint8(np.clip(video, 0.0, 1.0)),
            timings=timings,
            peak_vram_bytes=self._peak_memory(),
            nonfinite_values=nonfinite,
            degradations=taken,
            used={key: overrides[key] for key in overrides if key in ("decode_chunk_size",)},
            out_of_memory_errors=len(taken),  # each step of the ladder was taken on a caught out-of-memory error
        )

    def _release_cached_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _peak_memory(self) -> int:
        return peak_memory_bytes(self._device)

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes: `allocated`, `reserved` (torch's caching allocator), `total`, `free` (driver)."""
        return device_memory_stats(self._device)

    # ----- rungs shared by several backends ------------------------------------------------------------------------
    def vae_tiling_step(self) -> list[MemoryStep]:
        """Decode in overlapping spatial tiles (the VAE's `enable_tiling`), unless it is already on."""
        vae = self._pipe.vae
        if not hasattr(vae, "enable_tiling") or getattr(vae, "use_tiling", False):
            return []

        def apply() -> dict[str, Any]:
            vae.enable_tiling()
            return {}

        return [MemoryStep("vae_tiling", "decode", apply, vae.disable_tiling)]

    def cpu_offload_step(self) -> list[MemoryStep]:
        """Keep only the running component on the GPU (accelerate hooks); CUDA only."""
        if self._device.type != "cuda":
            return []
        pipe, device = self._pipe, self._device

        def apply() -> dict[str, Any]:
            pipe.enable_model_cpu_offload(device=device)
            return {}

        def undo() -> None:
            pipe.remove_all_hooks()
            pipe.to(device)

        return [MemoryStep("cpu_offload", "any", apply, undo)]


def model_info(config: ModelConfig, device: torch.device, dtype: torch.dtype, started: float) -> ModelInfo:
    return ModelInfo(
        model_id=config.source,
        revision=config.revision,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
        library_versions=library_versions(),
    )


def source_directory(config: ModelConfig) -> Path:
    """The embedded tiny model is an I2VGen-XL; other backends need a local diffusers directory."""
    if config.source == "embedded-tiny":
        raise ConfigError(
            f"model.source 'embedded-tiny' is an I2VGen-XL model; backend {config.backend!r} needs a local "
            "diffusers directory (README: Models)"
        )
    return Path(config.source)

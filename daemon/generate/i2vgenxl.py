"""I2VGen-XL behind the `Generator` protocol: loading (real weights or the embedded tiny model) and running jobs.

Together with `i2vgenxl_loop` (the sampling maths) and `tiny` (the embedded model) this is the only code that
imports torch, diffusers and transformers; the rest of the daemon reaches it lazily through
`daemon.generate.load_generator`, so the worker, the CLI and most tests never pay for those imports.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
import torch
from PIL import Image

from daemon.config import ModelConfig
from daemon.errors import TransientJobError
from daemon.generate import batch_render, compile_cache, gpu_speed, ladder, offload, precompile, vram
from daemon.generate import i2vgenxl_loop as loop
from daemon.generate import predict as pred
from daemon.generate.base import (
    GenerationRequest,
    GenerationResult,
    InterruptCheck,
    ModelInfo,
    StepCallback,
    batch_key,
)
from daemon.generate.compile_cache import GuardedCompile
from daemon.generate.cuda_memory import device_memory_stats, peak_memory_bytes
from daemon.generate.loading import (
    embedded_tiny_dir,
    library_versions,
    load_components,
    quiet_progress_bars,
    resolve_device_dtype,
)
from daemon.generate.tiny import tiny_revision

log = structlog.get_logger(__name__)

EMBEDDED_TINY = "embedded-tiny"
DEFAULT_CLIP_SKIP: int | None = 1
"""Prompt embeddings from the penultimate text-encoder layer (+ final layer norm): the stock pipeline's default
(`clip_skip=1`) and what I2VGen-XL was trained with (VGen's OpenCLIP embedder uses layer "penultimate")."""
VRAM_BUDGET_FRACTION = 0.92
"""Share of the GPU's memory the preflight and the batch sizing plan with (the rest: CUDA context, other users)."""


@dataclass(frozen=True)
class RenderedVideo:
    """A video before quantisation: what the stock pipeline returns with `output_type="np"` (one video)."""

    frames: npt.NDArray[np.float32]
    """(num_frames, height, width, 3) float32 in [0, 1]."""
    timings: Mapping[str, float]
    peak_vram_bytes: int
    degradations: tuple[str, ...] = ()
    used: Mapping[str, object] = dataclasses.field(default_factory=dict)
    out_of_memory_errors: int = 0
    """Out-of-memory errors the degrade ladder caught and recovered from for this render."""


def load_generator(config: ModelConfig, *, clip_skip: int | None = DEFAULT_CLIP_SKIP) -> I2VGenXLGenerator:
    """Load the model named by `config.source` (a local diffusers directory, or `embedded-tiny`, which is first
    materialised into `config.cache_dir`) onto the resolved device and dtype. `load_seconds` covers all of it.
    Automatic garbage collection is paused meanwhile (`collector_paused`)."""
    with collector_paused():
        return _load_generator(config, clip_skip)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collections inside: loading and, above all, compiling create millions of objects that
    all live on, and each full collection they trigger walks the whole growing heap. Measured on the tiny model
    (CPU, warm compile cache): warm-up 7.29 s with 1183 collections taking 1.28 s, 6.56 s paused. Explicit
    `gc.collect()` calls still run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load_generator(config: ModelConfig, clip_skip: int | None) -> I2VGenXLGenerator:
    started = time.perf_counter()
    device, dtype = resolve_device_dtype(config)
    quiet_progress_bars()
    if device.type == "cpu":
        # Late denoising steps produce subnormal floats; x86 handles them in microcode, which made a CPU step
        # 40x slower after the first ~15 steps (0.28 s -> 11 s at 128x128x16). Flushing them to zero is what
        # inference runtimes do and changes nothing at the 1e-4 level. (Set again per call in `render`: per thread.)
        torch.set_flush_denormal(True)
    if config.source == EMBEDDED_TINY:
        directory = embedded_tiny_dir(config.cache_dir)
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
    compile_mode = config.compile if device.type == "cuda" else "off"
    if compile_mode != "off":
        compile_cache.point_caches_at(config.cache_dir)
    generator = I2VGenXLGenerator(
        parts,
        info,
        device=device,
        decode_chunk_size=config.decode_chunk_size,
        clip_skip=clip_skip,
        mode=config.mode,
        compile_mode=compile_mode,
        compile_scope=config.resolved_compile_scope,
        compile_vae=config.compile_vae,
        channels_last=config.resolved_channels_last(compile_mode),
        split_linear_bias=config.resolved_split_linear_bias(compile_mode),
        precompiled_dir=_precompiled_dir(config, parts) if compile_mode != "off" else None,
    )
    warm = generator.warm_up(
        config.cache_dir, batch_sizes=config.warm_up_batch_sizes, prune_after_days=config.compile_cache_max_age_days
    )
    if warm:
        # Restart-to-READY is mostly this (BENCHMARKS.md, GPU): logged so a slow start can be told apart.
        log.info("compile_warm_up", mode=compile_mode, scope=generator.step_fn.scope, **warm)
        freeze_heap()
    return generator


def _precompiled_dir(config: ModelConfig, parts: loop.Components) -> Path | None:
    """Where this model's ahead-of-time compiled layer graphs live (`precompile`), when they are wanted and this
    torch can load them; the name covers the model, the compile mode, torch, the GPU and the code the layers'
    graphs were traced from."""
    if not config.precompile_layers or not precompile.available():
        return None
    key = compile_cache.artifact_key(parts.unet.config, config.compile, f"layers:{precompile.code_fingerprint()}")
    return compile_cache.cache_root(config.cache_dir) / f"layers-{key}"


def freeze_heap() -> None:
    """Move every object alive now (the model, and dynamo's graphs, guards and compiled code) out of the garbage
    collector's sight (`gc.freeze`), right after the warm-up.

    Why: after a compile the heap holds millions of long-lived objects, and the full `gc.collect()` that releases a
    job's memory walked all of them: with the compiled step, 0.4-1.5 s per video on the GPU outside every stage
    timing (BENCHMARKS.md, "Compile scope"). No collection here: the warm-up's render has just ended with one
    (`_release`), and another full pass would walk the whole compiled heap once more before READY.
    Frozen objects are still freed by reference counting; only cycles among them would stay."""
    gc.freeze()


class _StageClock:
    """Seconds per stage; on CUDA it synchronises at each stage's end (once per stage, not per step). Remembers
    the stage that is running (an OOM's stage decides the degrade rung) and moves models for CPU offload."""

    def __init__(self, device: torch.device, offload: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.current = ""
        self._offload = offload

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.current = stage
        if self._offload is not None:
            self._offload(stage)
        started = time.perf_counter()
        yield
        loop.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started


class I2VGenXLGenerator:
    """A loaded, warm I2VGen-XL; one job (or one batch of jobs) at a time (the worker is single-threaded per model).

    `mode` 'exact' runs the stock maths; 'fast' the DeepCache predictor (see `predict`). On CUDA attention goes
    through `gpu_speed.AttentionProcessor` and the UNet step may be compiled (`compile_mode`, see `compile_cache`).
    """

    def __init__(
        self,
        parts: loop.Components,
        info: ModelInfo,
        *,
        device: torch.device,
        decode_chunk_size: int,
        clip_skip: int | None = DEFAULT_CLIP_SKIP,
        mode: str = "exact",
        compile_mode: str = "off",
        compile_scope: str = "step",
        compile_vae: bool = False,
        compile_backend: compile_cache.Backend = "inductor",
        fast_options: pred.FastOptions | None = None,
        channels_last: bool = False,
        split_linear_bias: bool = False,
        precompiled_dir: Path | None = None,
    ) -> None:
        self._parts = parts
        self._info = info
        self._device = device
        self._decode_chunk_size = decode_chunk_size
        self._clip_skip = clip_skip
        self.mode = mode
        self.fast_options = fast_options or pred.FastOptions()
        if device.type == "cuda":
            gpu_speed.install_attention(parts.unet)
            if channels_last:
                gpu_speed.to_channels_last(parts.unet)
            if split_linear_bias:
                gpu_speed.split_linear_bias(parts.unet)
        regions = (parts.unet, parts.vae.decoder) if compile_vae else (parts.unet,)
        layer_graphs = None
        if precompiled_dir is not None:  # used with scope 'blocks' only (`GuardedCompile` decides)
            layer_graphs = precompile.LayerGraphs(precompiled_dir, compile_mode, compile_backend)
        compiled_only = device.type == "cuda" and (channels_last or split_linear_bias)
        self.step_fn = GuardedCompile(
            pred.StepModule(parts.unet),
            compile_mode,
            scope=compile_scope,
            regions=regions,
            backend=compile_backend,
            layer_graphs=layer_graphs,
            on_fallback=functools.partial(gpu_speed.eager_layout, parts.unet) if compiled_only else None,
        )

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
        """Generate one video as uint8 RGB frames. Raises `TransientJobError` on out-of-memory once the degrade
        ladder is exhausted, `JobInterrupted` when `should_interrupt` says so between steps."""
        return self.generate_batch([request], on_step, should_interrupt)[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> list[GenerationResult]:
        """Several requests with equal `batch_key` in one batch; results in request order (`BatchGenerator`).
        Requests asking for different modes run as one sub-batch per mode."""
        results: dict[int, GenerationResult] = {}
        for mode in dict.fromkeys(request.mode or self.mode for request in requests):
            indices = [i for i, request in enumerate(requests) if (request.mode or self.mode) == mode]
            videos = self.render_batch([requests[i] for i in indices], on_step, should_interrupt, mode=mode)
            results.update(zip(indices, (_to_result(video) for video in videos), strict=True))
        return [results[index] for index in range(len(requests))]

    def max_batch_size(self, request: GenerationRequest) -> int:
        """From the measured VRAM model and this GPU's memory (1 on the CPU, where batching gains nothing)."""
        if self._device.type != "cuda":
            return 1
        budget = int(self.memory_stats()["total"] * VRAM_BUDGET_FRACTION)
        return vram.max_batch(request.width, request.height, request.num_frames, budget)

    def render(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> RenderedVideo:
        """Like `generate`, but float frames in [0, 1]: comparable with the stock pipeline's `output_type="np"`."""
        return self.render_batch([request], on_step, should_interrupt)[0]

    def render_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
        mode: str | None = None,
    ) -> list[RenderedVideo]:
        if len({batch_key(request) for request in requests}) != 1:
            raise ValueError("a batch needs requests with equal width, height, num_frames and steps")
        if self._device.type == "cpu":
            # The flush-to-zero flag lives in each thread's MXCSR register; the worker thread that calls us is not
            # the thread that loaded the model (see load_generator).
            torch.set_flush_denormal(True)
        first = requests[0]
        plan = ladder.Plan(first.width, first.height, first.num_frames, self._decode_chunk_size)
        if self._device.type == "cuda":
            check = vram.preflight(first.width, first.height, first.num_frames, self._budget(), plan.decode_chunk)
            if check.verdict == "degrade":
                plan = ladder.apply_rungs(plan, check.start_rungs)
        if self._device.type == "cuda" and "decode_chunk" not in " ".join(plan.taken):
            chunk = vram.decode_chunk_within_denoise_peak(
                plan.width, plan.height, plan.num_frames, len(requests), plan.decode_chunk
            )
            plan = dataclasses.replace(plan, decode_chunk=chunk)
        fast = self.fast_options if (mode or first.mode or self.mode) == "fast" else None
        try:
            with torch.inference_mode():
                return self._render_with_ladder(requests, plan, fast, on_step, should_interrupt)
        finally:
            self._release()

    def _render_with_ladder(
        self,
        requests: Sequence[GenerationRequest],
        plan: ladder.Plan,
        fast: pred.FastOptions | None,
        on_step: StepCallback | None,
        should_interrupt: InterruptCheck | None,
    ) -> list[RenderedVideo]:
        latents: torch.Tensor | None = None
        # On the CPU a single exact job keeps the stock UNet call (the reference path the equality tests pin),
        # unless the layers are compiled: their failures are caught only inside the guarded step.
        prepared_path = self._device.type == "cuda" or len(requests) > 1 or fast is not None or self.step_fn.active
        step_fn = self.step_fn if prepared_path else None
        out_of_memory = 0
        while True:
            clock = _StageClock(self._device, self._offloader(plan))
            self._reset_peak_memory()
            try:
                if latents is None:
                    latents = batch_render.denoise(
                        self._parts,
                        requests,
                        plan,
                        step_fn,
                        fast,
                        self._clip_skip,
                        clock,
                        on_step,
                        should_interrupt,
                    )
                with clock("decode"):
                    vae = self._parts.vae
                    videos = self.step_fn.run(batch_render.decode, vae, latents, plan, through=vae.decoder)
            except torch.cuda.OutOfMemoryError as exc:
                out_of_memory += 1
                stage = clock.current
                self._release()
                following = ladder.next_plan(plan, stage)
                if following is None:
                    size = f"{plan.width}x{plan.height}x{plan.num_frames}"
                    raise TransientJobError(f"out of GPU memory generating {size} on {self._device}: {exc}") from exc
                if stage != "decode":
                    latents = None
                plan = following
                continue
            finally:
                self._restore_placement()
            peak = self._peak_memory()
            first = requests[0]
            used = plan.used(first.width, first.height, first.num_frames)
            if fast is not None and fast.steps_for(first.steps) != first.steps:
                used["steps"] = fast.steps_for(first.steps)
            return [
                RenderedVideo(
                    frames=v,
                    timings=clock.timings,
                    peak_vram_bytes=peak,
                    degradations=plan.taken,
                    used=used,
                    out_of_memory_errors=out_of_memory,
                )
                for v in videos
            ]

    def _offloader(self, plan: ladder.Plan) -> Callable[[str], None] | None:
        """With `cpu_offload`, only the stage's own models stay on the GPU (the rest waits in host memory)."""
        return offload.stage_placer(self._parts, self._device, self._release) if plan.cpu_offload else None

    def _restore_placement(self) -> None:
        offload.restore(self._parts, self._device)

    def warm_up(
        self,
        cache_dir: Path,
        width: int = 512,
        height: int = 512,
        num_frames: int = 16,
        batch_sizes: Sequence[int] = (1,),
        prune_after_days: float = 0,
    ) -> dict[str, object]:
        """Compile before READY: load the saved compile artefacts, run a 2-step video of the usual shape in each of
        `batch_sizes` (every batch size is its own set of static-shape graphs), save the artefacts the first time
        (`compile_cache`), and delete our artefacts unused for `prune_after_days` (`compile_cache.prune_stale`).
        A no-op without compile."""
        if not self.step_fn.active:
            return {}
        shape = f"{width}x{height}x{num_frames}"
        if tuple(batch_sizes) != (1,):
            shape += ":b" + ",".join(map(str, batch_sizes))
        extra = shape if self.step_fn.scope == "step" else f"{self.step_fn.scope}:{self.step_fn.regions}:{shape}"
        key = compile_cache.artifact_key(self._parts.unet.config, self.step_fn.mode, extra)
        artefact = compile_cache.cache_root(cache_dir) / f"mega-{key}.bin"
        started = time.perf_counter()
        loaded = compile_cache.load_artifacts(artefact)
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        image = Image.new("RGB", (width, height), (128, 128, 128))
        request = GenerationRequest(image, "warm-up", "", width, height, num_frames, 16, 2, 9.0, 0)
        for size in batch_sizes:
            self.render_batch([dataclasses.replace(request, seed=seed) for seed in range(size)])
        saved = compile_cache.save_artifacts(artefact) if not loaded and self.step_fn.active else 0
        summary: dict[str, object] = {
            "loaded": loaded,
            "load_seconds": round(load_seconds, 2),
            "saved_bytes": saved,
            "seconds": round(time.perf_counter() - started, 2),
            "batch_sizes": list(batch_sizes),
        }
        in_use = [artefact]
        if self.step_fn.layer_graphs is not None:
            summary["precompiled_layers"] = self.step_fn.layer_graphs.stats.as_dict()
            in_use.append(self.step_fn.layer_graphs.directory)
        summary["pruned"] = compile_cache.prune_stale(cache_dir, in_use, prune_after_days)
        return summary

    def _budget(self) -> int:
        return int(self.memory_stats()["total"] * VRAM_BUDGET_FRACTION)

    def _release(self) -> None:
        """Return cached blocks after a job or a failed attempt, so memory does not creep across jobs."""
        if self._device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _reset_peak_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def _peak_memory(self) -> int:
        return peak_memory_bytes(self._device)

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes: `allocated`, `reserved` (torch's caching allocator), `total`, `free` (driver)."""
        return device_memory_stats(self._device)


def _to_result(video: RenderedVideo) -> GenerationResult:
    # Counted before the uint8 conversion, which cannot represent NaN (sanity.py reports it).
    nonfinite = int(video.frames.size - np.count_nonzero(np.isfinite(video.frames)))
    finite = video.frames if nonfinite == 0 else np.nan_to_num(video.frames, nan=0.0, posinf=1.0, neginf=0.0)
    return GenerationResult(
        frames=loop.to_uint8(finite),
        timings=video.timings,
        peak_vram_bytes=video.peak_vram_bytes,
        nonfinite_values=nonfinite,
        degradations=video.degradations,
        used=video.used,
        out_of_memory_errors=video.out_of_memory_errors,
    )


__all__ = ["I2VGenXLGenerator", "RenderedVideo", "library_versions", "load_generator", "resolve_device_dtype"]

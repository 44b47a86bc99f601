"""Stable Video Diffusion (SVD / SVD-xt) through diffusers' `StableVideoDiffusionPipeline`.

No text conditioning (daemon/modelrules.py: the prompt is only recorded). Model-specific settings, per job or from
the backend defaults: `motion_bucket_id` (more motion when higher), `noise_aug_strength` (how far the video may move
from the image), `decode_chunk_size` (frames decoded at once; `model.decode_chunk_size` when the job does not say).
Its VAE (`AutoencoderKLTemporalDecoder`) has neither tiling nor slicing, so the memory ladder halves the decode
chunk, then offloads to the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from daemon.config import BackendName, ModelConfig
from daemon.generate.base import GenerationRequest
from daemon.generate.diffusers_common import (
    DiffusersGenerator,
    MemoryStep,
    load_pipeline,
    model_info,
    read_model_index,
    resolve_runtime,
    source_directory,
)
from daemon.modelrules import rules_for

PIPELINE_CLASSES = ("StableVideoDiffusionPipeline",)


class SVDGenerator(DiffusersGenerator):
    backend: ClassVar[BackendName] = "svd"

    def __init__(self, pipe: Any, info: Any, *, device: Any, decode_chunk_size: int) -> None:
        super().__init__(pipe, info, device=device)
        self._decode_chunk_size = decode_chunk_size

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        defaults = rules_for("svd").defaults
        options = request.options
        return {
            "image": request.image,
            "height": request.height,
            "width": request.width,
            "num_frames": request.num_frames,
            "num_inference_steps": request.steps,
            # The pipeline ramps guidance linearly over the frames from min to max; 1.0 keeps the first frame
            # (the input image) unguided, as the published default does.
            "min_guidance_scale": 1.0,
            "max_guidance_scale": request.guidance_scale,
            "fps": request.target_fps,
            "motion_bucket_id": int(options.get("motion_bucket_id", defaults.motion_bucket_id or 127)),
            "noise_aug_strength": float(options.get("noise_aug_strength", defaults.noise_aug_strength or 0.02)),
            "decode_chunk_size": self._chunk(request),
        }

    decodes_latents: ClassVar[bool] = True

    def decode(self, latents: Any, request: GenerationRequest, overrides: Mapping[str, Any]) -> Any:
        """What the stock pipeline does after denoising (its VAE is back in its own dtype by then)."""
        chunk = int(overrides.get("decode_chunk_size", self._chunk(request)))
        frames = self._pipe.decode_latents(latents, request.num_frames, chunk)
        return self._pipe.video_processor.postprocess_video(video=frames, output_type="np")[0]

    def _chunk(self, request: GenerationRequest) -> int:
        return min(int(request.options.get("decode_chunk_size", self._decode_chunk_size)), request.num_frames)

    def memory_ladder(self, request: GenerationRequest) -> list[MemoryStep]:
        """Halve the decode chunk down to one frame, then CPU offload (CUDA only)."""
        steps, chunk = [], self._chunk(request)
        while chunk > 1:
            chunk //= 2
            steps.append(MemoryStep(f"decode_chunk={chunk}", "decode", _override_chunk(chunk)))
        return steps + self.cpu_offload_step()


def _override_chunk(size: int) -> Callable[[], dict[str, Any]]:
    return lambda: {"decode_chunk_size": size}


def load_generator(config: ModelConfig) -> SVDGenerator:
    from diffusers import StableVideoDiffusionPipeline

    started = time.perf_counter()
    directory = source_directory(config)
    device, dtype = resolve_runtime(config, prefer_bfloat16=False)
    read_model_index(directory, "svd", PIPELINE_CLASSES)
    pipe = load_pipeline(StableVideoDiffusionPipeline, directory, dtype, device)
    info = model_info(config, device, dtype, started)
    return SVDGenerator(pipe, info, device=device, decode_chunk_size=config.decode_chunk_size)

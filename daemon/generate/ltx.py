"""LTX-Video image-to-video through diffusers' `LTXImageToVideoPipeline` (LTX-Video 0.9.x, 2B).

`target_fps` is the pipeline's `frame_rate` conditioning. Checkpoints whose VAE is timestep-conditioned (0.9.1 and
later) decode with a little noise (`decode_timestep` 0.05, `decode_noise_scale` 0.025, the values their model cards
use); 0.9.0 decodes at timestep 0. Memory ladder: VAE tiling, then CPU offload.
"""

from __future__ import annotations

import time
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

# The published repository (Lightricks/LTX-Video) is saved as the text-to-video pipeline; both share components.
PIPELINE_CLASSES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")


class LTXVideoGenerator(DiffusersGenerator):
    backend: ClassVar[BackendName] = "ltx-video"

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "image": request.image,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "height": request.height,
            "width": request.width,
            "num_frames": request.num_frames,
            "frame_rate": request.target_fps,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
        }
        if getattr(self._pipe.vae.config, "timestep_conditioning", False):
            kwargs |= {"decode_timestep": 0.05, "decode_noise_scale": 0.025}
        return kwargs

    def memory_ladder(self, request: GenerationRequest) -> list[MemoryStep]:
        return self.vae_tiling_step() + self.cpu_offload_step()


def load_generator(config: ModelConfig) -> LTXVideoGenerator:
    from diffusers import LTXImageToVideoPipeline

    started = time.perf_counter()
    directory = source_directory(config)
    device, dtype = resolve_runtime(config, prefer_bfloat16=True)
    read_model_index(directory, "ltx-video", PIPELINE_CLASSES)
    pipe = load_pipeline(LTXImageToVideoPipeline, directory, dtype, device)
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    return LTXVideoGenerator(pipe, model_info(config, device, dtype, started), device=device)

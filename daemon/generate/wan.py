"""Wan 2.x image-to-video through diffusers' `WanImageToVideoPipeline` (Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B).

Wan has no frame-rate conditioning (daemon/modelrules.py refuses `target_fps`). Its VAE runs in float32, as the
published examples do (the 3D causal VAE is the part that suffers in bfloat16; it is small). Memory ladder: VAE
tiling, then CPU offload; the generator decodes the latents itself, so a decode that runs out of memory is retried
without denoising again (minutes for the 14B model).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

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

PIPELINE_CLASSES = ("WanImageToVideoPipeline",)


class WanI2VGenerator(DiffusersGenerator):
    backend: ClassVar[BackendName] = "wan-i2v"

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "image": request.image,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "height": request.height,
            "width": request.width,
            "num_frames": request.num_frames,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
        }

    decodes_latents: ClassVar[bool] = True

    def decode(self, latents: Any, request: GenerationRequest, overrides: Mapping[str, Any]) -> Any:
        """The stock pipeline's decode (`WanImageToVideoPipeline.__call__` after the loop): undo the latent
        normalisation, decode, post-process. Kept equal to it by test_frames_equal_the_stock_pipeline_call."""
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self._pipe.vae
        latents = latents.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self._pipe.video_processor.postprocess_video(video, output_type="np")[0]

    def memory_ladder(self, request: GenerationRequest) -> list[MemoryStep]:
        return self.vae_tiling_step() + self.cpu_offload_step()


def load_generator(config: ModelConfig) -> WanI2VGenerator:
    from diffusers import WanImageToVideoPipeline

    started = time.perf_counter()
    directory = source_directory(config)
    device, dtype = resolve_runtime(config, prefer_bfloat16=True)
    read_model_index(directory, "wan-i2v", PIPELINE_CLASSES)
    pipe = load_pipeline(WanImageToVideoPipeline, directory, {"default": dtype, "vae": torch.float32}, device)
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    return WanI2VGenerator(pipe, model_info(config, device, dtype, started), device=device)

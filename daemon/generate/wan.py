"""Wan 2.x image-to-video through diffusers' `WanImageToVideoPipeline` (Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B).

Wan has no frame-rate conditioning (daemon/modelrules.py refuses `target_fps`). Its VAE runs in float32, as the
published examples do (the 3D causal VAE is the part that suffers in bfloat16; it is small). Memory ladder: VAE
tiling, then CPU offload.
"""

from __future__ import annotations

import time
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

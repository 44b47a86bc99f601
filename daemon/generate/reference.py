"""diffusers' stock `I2VGenXLPipeline` assembled on our loaded components: the reference our loop is proven against.

Used by the reference-equality tests and by the benchmarks, which must always run the stock pipeline in the same
process as ours. Never used by the daemon itself (the stock pipeline is deprecated and breaks on transformers 5's
default `clip_skip` path, see DESIGN.md §5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from daemon.generate import i2vgenxl_loop as loop
from daemon.generate.base import GenerationRequest
from daemon.generate.i2vgenxl import I2VGenXLGenerator


def stock_pipeline(generator: I2VGenXLGenerator) -> Any:
    """The deprecated pipeline on the very same component objects (and a fresh scheduler of the same config)."""
    from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import I2VGenXLPipeline

    parts = generator.components
    pipeline = I2VGenXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        image_encoder=parts.image_encoder,
        feature_extractor=parts.feature_extractor,
        unet=parts.unet,
        scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
    )
    pipeline.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipeline


def run_stock(
    pipeline: Any, request: GenerationRequest, clip_skip: int | None, decode_chunk_size: int = 8
) -> npt.NDArray[np.float32]:
    """The stock pipeline with the request's settings, float frames (F, H, W, 3) in [0, 1].

    It draws the VAE posterior sample from torch's global RNG (our loop uses an explicit generator seeded with
    `image_noise_seed`), so the global RNG is seeded to match.
    """
    torch.manual_seed(loop.image_noise_seed(request.seed))
    output = pipeline(
        prompt=request.prompt,
        image=request.image,
        height=request.height,
        width=request.width,
        target_fps=request.target_fps,
        num_frames=request.num_frames,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
        decode_chunk_size=decode_chunk_size,
        clip_skip=clip_skip,
    )
    frames: npt.NDArray[np.float32] = output.frames[0]
    return frames

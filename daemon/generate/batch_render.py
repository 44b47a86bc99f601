"""One batch of compatible requests through the I2VGen-XL maths: conditioning, denoising, decoding.

Why batches: the UNet is the cost, and on a large GPU two or four videos in one pass use it better than one after
another. Each request keeps its own prompt, image, seed and guidance: conditioning is encoded per request and
stacked in the stock pipeline's row order (all unconditional rows, then all conditional rows), the initial noise
and the VAE posterior sample are drawn from each request's own seed, and guidance is a per-row tensor. A batch
of one is exactly the single-video path. If any request uses guidance, every row runs with it (a scale of 1 then
returns the conditional prediction, up to rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from daemon.generate import i2vgenxl_loop as loop
from daemon.generate import predict as pred
from daemon.generate.base import GenerationRequest, InterruptCheck, StepCallback
from daemon.generate.ladder import Plan

Stage = Callable[[str], Any]
"""A context-manager factory that times (and names, for OOM handling) each stage."""


def conditioning(
    parts: loop.Components,
    requests: Sequence[GenerationRequest],
    plan: Plan,
    guidance: bool,
    clip_skip: int | None,
    stage: Stage,
) -> loop.Conditioning:
    """Per-request conditioning stacked as (uncond..., cond...) rows when guidance is on."""
    device = parts.unet.device
    with stage("encode_prompt"):
        prompts = [
            loop.encode_prompt(parts, r.prompt, r.negative_prompt, guidance, clip_skip).to(device) for r in requests
        ]
    images, latents, fps = [], [], []
    with stage("encode_image"):
        for request in requests:
            image = request.image.convert("RGB")
            images.append(loop.encode_image(parts, image, plan.width, guidance).to(device))
            size = (plan.width, plan.height)
            latents.append(loop.encode_image_latents(parts, image, size, plan.num_frames, guidance, request.seed))
            fps.append(loop.fps_tensor(request.target_fps, guidance, device))

    def stack(items: list[torch.Tensor]) -> torch.Tensor:
        items = [item.to(device) for item in items]
        if not guidance:
            return torch.cat(items)
        halves = [item.chunk(2) for item in items]
        return torch.cat([half[0] for half in halves] + [half[1] for half in halves])

    return loop.Conditioning(
        prompt_embeds=stack(prompts), image_embeddings=stack(images), image_latents=stack(latents), fps=stack(fps)
    )


def initial_latents(
    parts: loop.Components, requests: Sequence[GenerationRequest], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    return torch.cat([loop.initial_latents(parts, shape, dtype, request.seed) for request in requests])


def build_predictor(
    parts: loop.Components,
    cond: loop.Conditioning,
    requests: Sequence[GenerationRequest],
    step_fn: pred.StepFn | None,
    fast: pred.FastOptions | None,
    steps: int,
) -> loop.Predictor:
    """`step_fn` None: the stock UNet call (one request, exact mode), e.g. the CPU reference path."""
    guided = any(request.guidance_scale > 1 for request in requests)
    dtype = cond.prompt_embeds.dtype
    scales = [max(1.0, request.guidance_scale) for request in requests]
    guidance = pred.guidance_tensor(scales, dtype, cond.prompt_embeds.device) if guided else None
    if step_fn is None:
        if len(requests) != 1 or fast is not None:
            raise ValueError("the stock UNet call serves one request in exact mode only")
        return loop.stock_predictor(parts, cond, requests[0].guidance_scale)
    prep = pred.prepare(parts.unet, cond)
    if fast is not None:
        return pred.fast_predictor(step_fn, prep, guidance, steps, fast)
    return pred.exact_predictor(step_fn, prep, guidance)


def denoise(
    parts: loop.Components,
    requests: Sequence[GenerationRequest],
    plan: Plan,
    step_fn: pred.StepFn | None,
    fast: pred.FastOptions | None,
    clip_skip: int | None,
    stage: Stage,
    on_step: StepCallback | None,
    should_interrupt: InterruptCheck | None,
) -> torch.Tensor:
    """Encode, then run the DDIM loop on the whole batch; returns (B, C, F, h, w) latents."""
    scheduler = type(parts.scheduler).from_config(parts.scheduler.config)  # `set_timesteps` mutates it
    parts = dataclasses.replace(parts, scheduler=scheduler)
    guidance = any(request.guidance_scale > 1 for request in requests)
    steps = requests[0].steps if fast is None else fast.steps_for(requests[0].steps)
    cond = conditioning(parts, requests, plan, guidance, clip_skip, stage)
    with stage("denoise"):
        # Timesteps stay on the CPU (the stock pipeline puts them on the device): DDIM indexes its CPU
        # `alphas_cumprod` with them, which with a CUDA timestep is a host sync on every step.
        scheduler.set_timesteps(steps)
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        shape = (1, int(parts.unet.config.in_channels), plan.num_frames, plan.height // scale, plan.width // scale)
        latents = initial_latents(parts, requests, shape, cond.prompt_embeds.dtype)
        predict = build_predictor(parts, cond, requests, step_fn, fast, steps)
        return loop.denoise(parts, latents, cond, requests[0].guidance_scale, on_step, should_interrupt, predict)


def decode(vae: Any, latents: torch.Tensor, plan: Plan) -> list[npt.NDArray[np.float32]]:
    """Each video of the batch decoded on its own, `plan.decode_chunk` frames at a time."""
    if plan.vae_tiling:
        vae.enable_tiling()
        vae.enable_slicing()
    try:
        return [loop.decode(vae, latents[row : row + 1], plan.decode_chunk) for row in range(latents.shape[0])]
    finally:
        if plan.vae_tiling:
            vae.disable_tiling()
            vae.disable_slicing()

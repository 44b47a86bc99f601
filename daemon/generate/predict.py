"""Noise predictors for the denoising loop: exact (the stock maths, step-invariant work done once) and fast.

The exact predictor runs `gpu_speed.step` on the batched classifier-free-guidance input: the same function as the
stock UNet call, with the layers before the first context computed once for both guidance halves (`guided`).
The fast predictor (opt-in, e.g. the `preview` preset) trades fidelity for time in two measured ways, both
standard:

- DeepCache (Ma et al., 2023): every `cache_interval`-th step is a full UNet pass that keeps the deep feature
  (the input of the last up block); the steps between run only the highest-resolution blocks and reuse it;
- guidance reuse: on the last `uncond_skip_fraction` of the steps the unconditional half is not recomputed; the last
  unconditional prediction stands in for it, halving the batch of those steps.

Per-request guidance scales are a (B, 1, 1, 1, 1) tensor, so a batch of jobs keeps each job's own guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from daemon.generate import gpu_speed
from daemon.generate.fastmode import FastOptions as FastOptions  # re-exported: the generator's knob
from daemon.generate.i2vgenxl_loop import Conditioning, Predictor

StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""`gpu_speed.step`'s signature minus the UNet: (sample, timestep, context, fps_emb, image_latents, deep, guided)."""


class StepModule(torch.nn.Module):
    """`gpu_speed.step` as a module with tensor arguments (and the `guided` flag, a constant to the compiler),
    which is what `torch.compile` handles best."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context_emb: torch.Tensor,
        fps_emb: torch.Tensor,
        image_latents: torch.Tensor,
        deep: torch.Tensor | None = None,
        guided: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prep = gpu_speed.Prepared(context_emb=context_emb, fps_emb=fps_emb, image_latents=image_latents)
        return gpu_speed.step(self.unet, sample, timestep, prep, deep, guided)


def guidance_tensor(scales: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One guidance scale per batch row, broadcastable over (B, C, F, H, W)."""
    return torch.tensor(scales, dtype=torch.float32).to(device=device, dtype=dtype).view(-1, 1, 1, 1, 1)


def prepare(unet: Any, cond: Conditioning) -> gpu_speed.Prepared:
    return gpu_speed.prepare(unet, cond.image_latents, cond.image_embeddings, cond.prompt_embeds, cond.fps)


def _half(prep: gpu_speed.Prepared, second: bool) -> gpu_speed.Prepared:
    """The unconditional (first) or conditional (second) half of every batched input."""

    def cut(tensor: torch.Tensor) -> torch.Tensor:
        middle = tensor.shape[0] // 2
        return tensor[middle:] if second else tensor[:middle]

    return gpu_speed.Prepared(cut(prep.context_emb), cut(prep.fps_emb), cut(prep.image_latents))


def _call(
    step_fn: StepFn,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    prep: gpu_speed.Prepared,
    deep: Any,
    guided: bool = False,
) -> Any:
    """`guided`: `sample` is the latents once and `prep` both guidance halves (`gpu_speed.step`)."""
    return step_fn(sample, timestep, prep.context_emb, prep.fps_emb, prep.image_latents, deep, guided)


def exact_predictor(step_fn: StepFn, prep: gpu_speed.Prepared, guidance: torch.Tensor | None) -> Predictor:
    """The stock maths; `guidance` None means no classifier-free guidance (scale <= 1)."""

    def predict(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
        if guidance is None:
            noise: torch.Tensor = _call(step_fn, latents, timestep, prep, None)[0]
            return noise
        noise = _call(step_fn, latents, timestep, prep, None, guided=True)[0]
        noise_uncond, noise_text = noise.chunk(2)
        guided: torch.Tensor = noise_uncond + guidance * (noise_text - noise_uncond)
        return guided

    return predict


def fast_predictor(
    step_fn: StepFn, prep: gpu_speed.Prepared, guidance: torch.Tensor | None, steps: int, options: FastOptions
) -> Predictor:
    """DeepCache plus optional guidance reuse (see the module docstring)."""
    skip_from = steps - round(steps * options.uncond_skip_fraction) if guidance is not None else steps
    cond_only = _half(prep, second=True) if guidance is not None else prep
    state: dict[str, torch.Tensor] = {}

    def predict(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
        full = index % max(1, options.cache_interval) == 0 or "deep" not in state
        reuse_uncond = index >= skip_from and "uncond" in state
        both = guidance is not None and not reuse_uncond
        inputs = prep if both else cond_only
        deep = None if full else state["deep" if both else "deep_cond"]
        noise: torch.Tensor
        noise, new_deep = _call(step_fn, latents, timestep, inputs, deep, guided=both)
        if full:
            # Cloned: a CUDA-graph replay may reuse the output's memory; only the conditional half is reused
            # once the unconditional branch is no longer computed.
            state["deep"] = new_deep.clone()
            state["deep_cond"] = new_deep.chunk(2)[1].clone() if both else state["deep"]
        if guidance is None:
            return noise
        if both:
            noise_uncond, noise_text = noise.chunk(2)
            state["uncond"] = noise_uncond.clone()
        else:
            noise_uncond, noise_text = state["uncond"], noise
        guided: torch.Tensor = noise_uncond + guidance * (noise_text - noise_uncond)
        return guided

    return predict

"""The I2VGen-XL sampling math, re-implemented on diffusers' components.

Why our own loop: diffusers' `I2VGenXLPipeline` is deprecated (no fixes after 0.33.1), has no step callback or
interrupt point, and its default `clip_skip=1` path reads `text_encoder.text_model`, which transformers 5 removed.
Every function here mirrors one step of that pipeline (diffusers 0.42.1,
`pipelines/deprecated/i2vgen_xl/pipeline_i2vgen_xl.py`) operation for operation, down to tensor layouts, so in
float32 on the CPU the frames are bit-for-bit the stock pipeline's (`tests/integration/test_generate_i2vgenxl.py`
checks it on the tiny model). Deliberate differences, none of which changes the maths:

- prompt encoding works on transformers 4 and 5 (the final layer norm is found where each version keeps it);
- the VAE posterior sample draws from an explicit seeded generator instead of torch's global RNG (the stock
  pipeline calls `latent_dist.sample()` without one), so a job is reproducible from its seed alone;
- noise is always drawn in float32 on the CPU and then cast, so float16 on a GPU starts from the same noise as
  float32 on the CPU (identical to the stock pipeline in float32; in float16 it draws other numbers);
- the scheduler step runs on the (B, C, F, H, W) tensor directly: DDIM's step is elementwise, so the stock
  pipeline's permute/reshape round trip around it does not change a single value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from daemon.errors import JobInterrupted
from daemon.generate.base import InterruptCheck, StepCallback

IMAGE_NOISE_SEED_OFFSET = 0x9E3779B97F4A7C15
"""The VAE posterior sample uses seed + this (mod 2**64), so it never reuses the initial latent noise."""


@dataclass(frozen=True)
class Components:
    """The loaded diffusers/transformers parts (typed `Any`: those libraries ship no type information)."""

    unet: Any
    vae: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    feature_extractor: Any


@dataclass(frozen=True)
class Conditioning:
    """Everything the UNet is conditioned on, already batched (uncond first, then cond) when guidance is on."""

    prompt_embeds: torch.Tensor
    image_embeddings: torch.Tensor
    image_latents: torch.Tensor
    fps: torch.Tensor


def cpu_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn on the CPU in float32, then moved and cast: the same seed gives the same noise on
    any device and in any dtype. (CPU `randn` in float16/bfloat16 draws different numbers than in float32; diffusers
    draws in the target dtype, which in float32 is exactly this.)"""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
    noise: torch.Tensor = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def image_noise_seed(seed: int) -> int:
    """The seed of the VAE posterior sample of the conditioning image (see IMAGE_NOISE_SEED_OFFSET)."""
    return (seed + IMAGE_NOISE_SEED_OFFSET) % 2**64


def encode_prompt(
    parts: Components, prompt: str, negative_prompt: str, guidance: bool, clip_skip: int | None
) -> torch.Tensor:
    """Text embeddings, `cat([negative, positive])` with guidance (the stock pipeline's batch order)."""
    positive = _encode_text(parts, prompt, clip_skip)
    if not guidance:
        return positive
    return torch.cat([_encode_text(parts, negative_prompt, clip_skip), positive])


def _encode_text(parts: Components, text: str, clip_skip: int | None) -> torch.Tensor:
    """The stock `encode_prompt` for one string: pad to 77 tokens, then the last layer (clip_skip None) or the
    output of layer -(clip_skip + 1) passed through the final layer norm, as the last layer's output is."""
    encoder = parts.text_encoder
    tokens = parts.tokenizer(
        [text], padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = tokens.input_ids.to(encoder.device)
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    if clip_skip is None:
        hidden = encoder(ids, attention_mask=mask)[0]
    else:
        output = encoder(ids, attention_mask=mask, output_hidden_states=True)
        hidden = final_layer_norm(encoder)(output.hidden_states[-(clip_skip + 1)])
    result: torch.Tensor = hidden.to(dtype=encoder.dtype)
    return result


def final_layer_norm(text_encoder: Any) -> Any:
    """transformers 5 keeps `final_layer_norm` on CLIPTextModel itself; transformers 4 under `.text_model`."""
    holder = getattr(text_encoder, "text_model", text_encoder)
    return holder.final_layer_norm


def center_crop_wide(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The stock `_center_crop_wide`: box-downscale so the smaller ratio fits, then center-crop to `size`."""
    scale = min(image.size[0] / size[0], image.size[1] / size[1])
    image = image.resize((round(image.width // scale), round(image.height // scale)), resample=Image.Resampling.BOX)
    left = (image.width - size[0]) // 2
    top = (image.height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1], as diffusers' `pil_to_numpy` + `numpy_to_pt`."""
    array = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(array[None].transpose(0, 3, 1, 2))


def encode_image(parts: Components, image: Image.Image, width: int, guidance: bool) -> torch.Tensor:
    """CLIP image embedding (1 or 2, 1, D): square crop of side `width` (the stock pipeline's choice), bilinear
    resize to the feature extractor's crop size, CLIP normalisation; zeros as the unconditional half."""
    encoder = parts.image_encoder
    extractor = parts.feature_extractor
    crop = center_crop_wide(image, (width, width))
    crop = crop.resize((extractor.crop_size["width"], extractor.crop_size["height"]), Image.Resampling.BILINEAR)
    pixels = _to_tensor(crop)
    mean = torch.tensor(extractor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(extractor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((pixels - mean) / std).to(device=encoder.device, dtype=encoder.dtype)
    embeddings: torch.Tensor = encoder(pixels).image_embeds.unsqueeze(1)
    if guidance:
        embeddings = torch.cat([torch.zeros_like(embeddings), embeddings])
    return embeddings


def encode_image_latents(
    parts: Components, image: Image.Image, size: tuple[int, int], num_frames: int, guidance: bool, seed: int
) -> torch.Tensor:
    """First-frame VAE latents plus one constant "position" frame per later frame ((i+1)/(F-1)), as the stock
    `prepare_image_latents`; the posterior sample uses `image_noise_seed(seed)`."""
    vae = parts.vae
    pixels = 2.0 * _to_tensor(center_crop_wide(image, size)) - 1.0
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    # `posterior.sample(generator)`, with the noise from `cpu_noise`.
    noise = cpu_noise(tuple(posterior.mean.shape), image_noise_seed(seed), posterior.mean.device, posterior.mean.dtype)
    latents = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
    latents = latents.unsqueeze(2)
    ramp = [torch.ones_like(latents[:, :, :1]) * ((index + 1) / (num_frames - 1)) for index in range(num_frames - 1)]
    if ramp:
        latents = torch.cat([latents, torch.cat(ramp, dim=2)], dim=2)
    # The VAE returns channels-last strides; the stock pipeline's `repeat` makes a contiguous copy, and the UNet's
    # convolutions round differently on the two layouts (~1e-6), so match it.
    latents = latents.contiguous()
    result: torch.Tensor = torch.cat([latents] * 2) if guidance else latents
    return result


def fps_tensor(target_fps: int, guidance: bool, device: torch.device) -> torch.Tensor:
    """The `fps` micro-condition, one entry per batch row."""
    return torch.tensor([target_fps, target_fps] if guidance else [target_fps]).to(device)


def initial_latents(parts: Components, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The stock `prepare_latents`: seeded Gaussian noise scaled by `init_noise_sigma`."""
    result: torch.Tensor = cpu_noise(shape, seed, parts.unet.device, dtype) * parts.scheduler.init_noise_sigma
    return result


Predictor = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""(latents, step index, timestep on the model's device) -> the guided noise prediction for that step."""


def stock_predictor(parts: Components, cond: Conditioning, guidance_scale: float) -> Predictor:
    """The stock pipeline's prediction: the UNet on `cat([latents] * 2)`, then classifier-free guidance."""
    guidance = guidance_scale > 1

    def predict(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if guidance else latents
        noise_pred: torch.Tensor = parts.unet(
            model_input,
            timestep,
            encoder_hidden_states=cond.prompt_embeds,
            fps=cond.fps,
            image_latents=cond.image_latents,
            image_embeddings=cond.image_embeddings,
            return_dict=False,
        )[0]
        if guidance:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        return noise_pred

    return predict


def denoise(
    parts: Components,
    latents: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    on_step: StepCallback | None,
    should_interrupt: InterruptCheck | None,
    predict: Predictor | None = None,
) -> torch.Tensor:
    """The DDIM loop (eta 0); `predict` defaults to the stock UNet call with batched classifier-free guidance.
    `parts.scheduler` must have its timesteps set on the CPU, so that the loop never waits for the GPU: step times
    come from CUDA events read when they have completed (`StepTimer`), not from a sync per step."""
    scheduler = parts.scheduler
    predict = predict if predict is not None else stock_predictor(parts, cond, guidance_scale)
    total = len(scheduler.timesteps)
    # The UNet gets the timestep on its device (moving a CPU one there would sync), the scheduler on the CPU.
    on_device = scheduler.timesteps.to(latents.device)
    timer = StepTimer(latents.device, total, on_step)
    for index, timestep in enumerate(scheduler.timesteps):
        if should_interrupt is not None and should_interrupt():
            raise JobInterrupted(f"interrupted before denoising step {index + 1} of {total}")
        timer.start()
        noise_pred = predict(latents, index, on_device[index])
        latents = scheduler.step(noise_pred, timestep, latents, eta=0.0).prev_sample
        timer.stop()
    timer.flush()
    return latents


class StepTimer:
    """Per-step seconds for `on_step` without a host sync per step.

    On CUDA each step is bracketed by two events; finished steps are reported as soon as `query()` says their end
    event has completed (non-blocking). The CPU may run at most `max_ahead` steps ahead of the GPU (then it waits
    for the oldest pending step), so an interrupt request is still honoured within a few steps. Elsewhere the host
    clock is the step time.
    """

    def __init__(self, device: torch.device, total: int, on_step: StepCallback | None, max_ahead: int = 3) -> None:
        self._cuda = device.type == "cuda" and on_step is not None
        self._total = total
        self._on_step = on_step
        self._max_ahead = max_ahead
        self._pending: list[tuple[int, Any, Any]] = []
        self._index = 0
        self._started = 0.0
        self._begin: Any = None

    def start(self) -> None:
        self._index += 1
        if self._cuda:
            self._begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self._begin.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._on_step is None:
            return
        if not self._cuda:
            self._on_step(self._index, self._total, time.perf_counter() - self._started)
            return
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end.record()
        self._pending.append((self._index, self._begin, end))
        if len(self._pending) > self._max_ahead:
            self._pending[0][2].synchronize()
        self._report(block=False)

    def flush(self) -> None:
        self._report(block=True)

    def _report(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][2].query()):
            index, begin, end = self._pending.pop(0)
            end.synchronize()
            assert self._on_step is not None
            self._on_step(index, self._total, begin.elapsed_time(end) / 1000.0)


def decode(vae: Any, latents: torch.Tensor, chunk_size: int) -> npt.NDArray[np.float32]:
    """VAE-decode `chunk_size` frames at a time; (F, H, W, 3) float32 in [0, 1] like `output_type="np"`."""
    latents = 1 / vae.config.scaling_factor * latents
    batch, channels, frames, height, width = latents.shape
    flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    decoded = [vae.decode(flat[start : start + chunk_size]).sample for start in range(0, flat.shape[0], chunk_size)]
    video = torch.cat(decoded).float()
    video = (video * 0.5 + 0.5).clamp(0, 1)
    result: npt.NDArray[np.float32] = video.permute(0, 2, 3, 1).cpu().numpy()
    return result


def to_uint8(frames: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """[0, 1] floats -> uint8 with diffusers' rounding (`numpy_to_pil`)."""
    return (frames * 255).round().astype(np.uint8)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so host clocks measure the GPU; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

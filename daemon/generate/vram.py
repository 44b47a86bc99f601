"""A measured VRAM and time model of the full-size I2VGen-XL, the preflight built on it, and the decode chunk size.

Why a model and not a guess: the daemon must refuse or degrade a job *before* it launches it (an OOM halfway
through 50 steps wastes the GPU for seconds), `i2vd validate` shows the estimate, and the worker sizes batches
from it. The coefficients live in `vram_model.json` next to this file, fitted by `bench/gpu_bench.py --fit` from
peak-memory measurements on the GPU (see BENCHMARKS.md, GPU section), so they are data, not code. The model is
linear in what dominates each stage:

- denoising: weights + `denoise_bytes_per_position` x batch x frames x (H/8)(W/8) (activations of the batched
  classifier-free-guidance UNet pass, both halves);
- decoding: weights + the denoised latents + `decode_bytes_per_pixel` x chunk x H x W (one chunk of frames
  through the VAE decoder);

and the peak is the larger of the two. The time of a batch is `fixed_seconds` (encoders, bookkeeping), the VAE
decode (`decode_seconds_per_pixel` x batch x frames x H x W) and per denoising step a constant (the per-layer
launches and glue), a term linear in the latent positions (convolutions, projections, norms, temporal attention)
and one in frames x tokens^2 (the spatial self-attention, quadratic in the latent tokens of a frame), per video of
the batch; fitted on the compiled 512p/16f, 768p/16f, 1024p/16f and 512p/32f steps with the shipped defaults within
1.8% (BENCHMARKS.md, "Packed temporal attention"; the constant came out at zero once the short attentions were
packed); a batch of two measured 3% under it.
Importable without torch: the CLI and the job resolver use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

MODEL_PATH = Path(__file__).with_name("vram_model.json")
SAFETY = 1.10
"""Head room over the fitted peak (allocator fragmentation, cuDNN workspaces)."""


@dataclass(frozen=True)
class VramModel:
    weights_bytes: int
    denoise_bytes_per_position: float
    decode_bytes_per_pixel: float
    seconds_per_step: float
    """Exact mode, compiled: what a denoising step of one video costs whatever its shape."""
    seconds_per_position_step: float
    """Per latent position (frames x H/8 x W/8) per video and denoising step."""
    seconds_per_attention_step: float
    """Per frames x (H/8 x W/8)^2 per video and denoising step."""
    decode_seconds_per_pixel: float
    """VAE decode, per output pixel of every frame and video."""
    fixed_seconds: float
    shallow_step_fraction: float
    """A fast-mode shallow step (DeepCache: only the highest-resolution blocks run) as a fraction of a full one."""
    source: str


@lru_cache(maxsize=1)
def load_model(path: Path = MODEL_PATH) -> VramModel:
    data = json.loads(path.read_text(encoding="utf-8"))
    return VramModel(**{name: data[name] for name in VramModel.__dataclass_fields__})


def latent_positions(width: int, height: int, num_frames: int, batch: int = 1) -> int:
    return batch * num_frames * math.ceil(width / 8) * math.ceil(height / 8)


def denoise_peak(width: int, height: int, num_frames: int, batch: int = 1) -> int:
    model = load_model()
    positions = latent_positions(width, height, num_frames, batch)
    return int(model.weights_bytes + model.denoise_bytes_per_position * positions)


def decode_peak(width: int, height: int, chunk: int) -> int:
    model = load_model()
    return int(model.weights_bytes + model.decode_bytes_per_pixel * chunk * width * height)


def estimate_peak_bytes(width: int, height: int, num_frames: int, batch: int = 1, decode_chunk: int = 8) -> int:
    """Predicted peak allocated bytes of one batch, without the safety margin."""
    chunk = min(decode_chunk, num_frames)
    return max(denoise_peak(width, height, num_frames, batch), decode_peak(width, height, chunk))


def job_peak_bytes(width: int, height: int, num_frames: int, batch: int = 1, decode_chunk: int = 8) -> int:
    """Predicted peak of a job as the generator runs it: the decode chunk is kept under the denoise peak."""
    chunk = decode_chunk_within_denoise_peak(width, height, num_frames, batch, decode_chunk)
    return estimate_peak_bytes(width, height, num_frames, batch, chunk)


def estimate_seconds(
    width: int, height: int, num_frames: int, steps: int, batch: int = 1, shallow_steps: int = 0
) -> float:
    """Predicted wall seconds of one batch on the GPU the model was fitted on; `shallow_steps` of the `steps` are
    fast-mode shallow passes (0: exact mode)."""
    model = load_model()
    full_equivalent = steps - shallow_steps + model.shallow_step_fraction * shallow_steps
    positions = latent_positions(width, height, num_frames)
    tokens = math.ceil(width / 8) * math.ceil(height / 8)
    per_video = (
        model.seconds_per_step
        + model.seconds_per_position_step * positions
        + model.seconds_per_attention_step * positions * tokens
    )
    # A batch costs its videos' steps nearly in full once compiled: a batch of two 512p/16f steps took 0.97x two
    # single ones (BENCHMARKS.md), so the step is per video, the constant included.
    decode = model.decode_seconds_per_pixel * batch * num_frames * width * height
    return model.fixed_seconds + decode + batch * per_video * full_equivalent


def decode_chunk_for(width: int, height: int, free_bytes: int, wanted: int) -> int:
    """The largest chunk <= `wanted` whose decode activations fit into `free_bytes` (at least 1)."""
    per_frame = load_model().decode_bytes_per_pixel * width * height * SAFETY
    return max(1, min(wanted, int(free_bytes // max(per_frame, 1.0))))


def decode_chunk_within_denoise_peak(width: int, height: int, num_frames: int, batch: int, wanted: int) -> int:
    """The largest chunk <= `wanted` whose decode activations stay under the denoise stage's activations, so that
    decoding never raises the job's peak (the stock pipeline decodes one frame at a time for the same reason)."""
    model = load_model()
    activations = model.denoise_bytes_per_position * latent_positions(width, height, num_frames, batch)
    return max(1, min(wanted, int(activations // (model.decode_bytes_per_pixel * width * height))))


def max_batch(width: int, height: int, num_frames: int, budget_bytes: int, limit: int = 4) -> int:
    """How many videos of this shape fit `budget_bytes` in one batch (at least 1: a single job is never refused
    here; the preflight decides about it)."""
    fits = [b for b in range(1, limit + 1) if denoise_peak(width, height, num_frames, b) * SAFETY <= budget_bytes]
    return max(fits, default=1)


Verdict = Literal["ok", "degrade", "refuse"]


@dataclass(frozen=True)
class Preflight:
    verdict: Verdict
    estimate_bytes: int
    budget_bytes: int
    start_rungs: tuple[str, ...] = ()
    """Degrade-ladder rungs to apply before launching (e.g. `decode_chunk=2`, `cpu_offload`)."""


def preflight(width: int, height: int, num_frames: int, budget_bytes: int, decode_chunk: int = 8) -> Preflight:
    """Launch as asked, launch degraded (smaller decode chunk, then model offload), or refuse."""
    estimate = estimate_peak_bytes(width, height, num_frames, 1, decode_chunk)
    if estimate * SAFETY <= budget_bytes:
        return Preflight("ok", estimate, budget_bytes)
    rungs: list[str] = []
    if denoise_peak(width, height, num_frames) * SAFETY <= budget_bytes:
        free_for_decode = budget_bytes - load_model().weights_bytes
        chunk = decode_chunk_for(width, height, free_for_decode, decode_chunk)
        rungs.append(f"decode_chunk={chunk}")
        if decode_peak(width, height, chunk) * SAFETY > budget_bytes:
            rungs.append("vae_tiling")
        return Preflight("degrade", estimate, budget_bytes, tuple(rungs))
    offloaded = denoise_peak(width, height, num_frames) - load_model().weights_bytes * 0.3
    if offloaded * SAFETY <= budget_bytes:
        return Preflight("degrade", estimate, budget_bytes, ("decode_chunk=1", "vae_tiling", "cpu_offload"))
    return Preflight("refuse", estimate, budget_bytes)

"""Measured VRAM and time models of the stock-pipeline backends (svd, ltx-video, wan-i2v), and their fit.

Why a model per backend: a 14B Wan transformer and a 1.5B SVD UNet differ by tens of gigabytes in weights and by
their latent geometry, so I2VGen-XL's model (`vram.py`) says nothing about them; `i2vd validate` and the job's
`estimated_vram_bytes` must use the configured model's own. The coefficients live in `vram_stock.json`, fitted by
`bench/gpu_backends.py --fit` from peaks and timings measured on the GPU at two sizes per backend (BENCHMARKS.md,
"Other backends"), so they are data, not code. Importable without torch (the CLI and the job resolver use it).

What the model counts (linear in what dominates each stage, as for I2VGen-XL):

- `tokens`: latent positions the denoiser sees, from the VAE's spatial and temporal compression and the
  transformer's patch size (SVD 8x, 1x; LTX-Video 32x, 8x; Wan 8x, 4x, 2x2 patches);
- denoising peak: weights + `denoise_fixed_bytes` + `denoise_bytes_per_token` x tokens (both classifier-free
  guidance halves; the encoders' activations are inside the fixed part);
- decoding peak: weights + `decode_fixed_bytes` + `decode_bytes_per_pixel` x pixels decoded at once (the whole
  video for LTX-Video and Wan, one `decode_chunk_size` chunk of frames for SVD);
- seconds: steps x (a x tokens + b x tokens^2: the attention term) + `decode_seconds_per_pixel` x all pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MODEL_PATH = Path(__file__).with_name("vram_stock.json")


@dataclass(frozen=True)
class LatentGeometry:
    spatial: int
    """Pixels per latent along each side (VAE downsampling)."""
    temporal: int
    """Frames per latent frame after the first (1: no temporal compression)."""
    patch: int = 1
    """Latents per transformer token along each side."""
    chunked_decode: bool = False
    """True when the VAE decodes `decode_chunk_size` frames at a time (SVD), else the whole video at once."""


GEOMETRY: Mapping[str, LatentGeometry] = {
    "svd": LatentGeometry(spatial=8, temporal=1, chunked_decode=True),
    "ltx-video": LatentGeometry(spatial=32, temporal=8),
    "wan-i2v": LatentGeometry(spatial=8, temporal=4, patch=2),
}


def tokens(backend: str, width: int, height: int, num_frames: int) -> int:
    """Latent positions of one video as the backend's denoiser sees them."""
    shape = GEOMETRY[backend]
    frames = num_frames if shape.temporal == 1 else (num_frames - 1) // shape.temporal + 1
    side = shape.spatial * shape.patch
    return frames * math.ceil(height / side) * math.ceil(width / side)


def decoded_pixels(backend: str, width: int, height: int, num_frames: int, decode_chunk: int) -> int:
    """Pixels the VAE decodes in one call: a chunk of frames (SVD) or the whole video."""
    frames = min(decode_chunk, num_frames) if GEOMETRY[backend].chunked_decode else num_frames
    return width * height * frames


@dataclass(frozen=True)
class StockModel:
    backend: str
    weights_bytes: int
    denoise_fixed_bytes: float
    denoise_bytes_per_token: float
    decode_fixed_bytes: float
    decode_bytes_per_pixel: float
    step_seconds_per_token: float
    step_seconds_per_token_squared: float
    decode_seconds_per_pixel: float
    source: str

    def peak_bytes(self, width: int, height: int, num_frames: int, decode_chunk: int = 8) -> int:
        count = tokens(self.backend, width, height, num_frames)
        denoise = self.weights_bytes + self.denoise_fixed_bytes + self.denoise_bytes_per_token * count
        pixels = decoded_pixels(self.backend, width, height, num_frames, decode_chunk)
        decode = self.weights_bytes + self.decode_fixed_bytes + self.decode_bytes_per_pixel * pixels
        return int(max(denoise, decode))

    def seconds(self, width: int, height: int, num_frames: int, steps: int) -> float:
        count = tokens(self.backend, width, height, num_frames)
        per_step = self.step_seconds_per_token * count + self.step_seconds_per_token_squared * count**2
        return steps * per_step + self.decode_seconds_per_pixel * width * height * num_frames


@lru_cache(maxsize=1)
def load_models(path: Path = MODEL_PATH) -> dict[str, StockModel]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: StockModel(backend=name, **fields) for name, fields in data["backends"].items()}


def model_for(backend: str) -> StockModel:
    return load_models()[backend]


@dataclass(frozen=True)
class Point:
    """One measured video: its shape, the peaks of both stages, the weights resident before it, and its times."""

    width: int
    height: int
    num_frames: int
    steps: int
    decode_chunk: int
    weights_bytes: int
    denoise_peak_bytes: int
    decode_peak_bytes: int
    denoise_seconds: float
    decode_seconds: float


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares intercept and slope; with a single distinct x (one size measured), the line through the
    origin and that point."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0, mean_y / mean_x if mean_x else 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return mean_y - slope * mean_x, slope


def _quadratic_through_origin(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """y = a x + b x^2 by least squares (normal equations of two unknowns); b is kept >= 0."""
    s2 = sum(x**2 for x in xs)
    s3 = sum(x**3 for x in xs)
    s4 = sum(x**4 for x in xs)
    t1 = sum(x * y for x, y in zip(xs, ys, strict=True))
    t2 = sum(x**2 * y for x, y in zip(xs, ys, strict=True))
    det = s2 * s4 - s3 * s3
    if len(set(xs)) < 2 or det <= 0:
        return t1 / s2, 0.0
    a, b = (t1 * s4 - t2 * s3) / det, (s2 * t2 - s3 * t1) / det
    return (a, b) if b >= 0 else (t1 / s2, 0.0)


def fit(backend: str, points: Sequence[Point], source: str) -> StockModel:
    """Coefficients from two or more measured points (different sizes) of one backend."""
    if not points:
        raise ValueError(f"no measured points for {backend}")
    weights = max(point.weights_bytes for point in points)
    counts = [float(tokens(backend, p.width, p.height, p.num_frames)) for p in points]
    denoise_fixed, per_token = _line(counts, [p.denoise_peak_bytes - weights for p in points])
    pixels = [float(decoded_pixels(backend, p.width, p.height, p.num_frames, p.decode_chunk)) for p in points]
    decode_fixed, per_pixel = _line(pixels, [p.decode_peak_bytes - weights for p in points])
    step_a, step_b = _quadratic_through_origin(counts, [p.denoise_seconds / p.steps for p in points])
    all_pixels = [float(p.width * p.height * p.num_frames) for p in points]
    decode_rate = sum(p.decode_seconds for p in points) / sum(all_pixels)
    return StockModel(
        backend=backend,
        weights_bytes=weights,
        denoise_fixed_bytes=round(max(denoise_fixed, 0.0)),
        denoise_bytes_per_token=round(max(per_token, 0.0), 3),
        decode_fixed_bytes=round(max(decode_fixed, 0.0)),
        decode_bytes_per_pixel=round(max(per_pixel, 0.0), 3),
        step_seconds_per_token=step_a,
        step_seconds_per_token_squared=step_b,
        decode_seconds_per_pixel=decode_rate,
        source=source,
    )


def to_json(models: Mapping[str, StockModel]) -> dict[str, Any]:
    """The file layout of `vram_stock.json`."""
    return {
        "backends": {
            name: {key: value for key, value in asdict(model).items() if key != "backend"}
            for name, model in sorted(models.items())
        }
    }

"""Which module loads which backend. Names only: importing this module imports no torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from daemon.config import BackendName

if TYPE_CHECKING:
    from daemon.config import ModelConfig
    from daemon.generate.base import Generator

LOADERS: dict[BackendName, str] = {
    "i2vgen-xl": "daemon.generate.i2vgenxl",
    "svd": "daemon.generate.svd",
    "ltx-video": "daemon.generate.ltx",
    "wan-i2v": "daemon.generate.wan",
}
"""Backend name -> module with a `load_generator(ModelConfig)` function."""

WEIGHTS: dict[BackendName, str] = {
    "i2vgen-xl": "ali-vilab/i2vgen-xl",
    "svd": "stabilityai/stable-video-diffusion-img2vid-xt (or -img2vid for 14 frames)",
    "ltx-video": "Lightricks/LTX-Video (diffusers layout at the repository root; 0.9.x 2B)",
    "wan-i2v": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (or -720P-Diffusers, Wan-AI/Wan2.2-I2V-A14B-Diffusers)",
}
"""Hugging Face repositories whose diffusers layout each backend loads (README: Models)."""


def load_backend(config: ModelConfig) -> Generator:
    """Import the backend's module and load its generator (torch, diffusers and the weights load here)."""
    module = importlib.import_module(LOADERS[config.backend])
    generator: Generator = module.load_generator(config)
    return generator

"""Video generators. Importing this package never imports torch: backends are imported inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import ModelConfig
    from daemon.generate.base import Generator


def load_generator(config: ModelConfig) -> Generator:
    """Load the generator of `config.backend` (daemon/generate/registry.py); imports torch/diffusers on first use."""
    from daemon.generate.registry import load_backend

    return load_backend(config)


__all__ = ["load_generator"]

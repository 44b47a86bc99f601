"""Video generators. Importing this package never imports torch: backends are imported inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import ModelConfig
    from daemon.generate.i2vgenxl import I2VGenXLGenerator


def load_generator(config: ModelConfig) -> I2VGenXLGenerator:
    """Load the I2VGen-XL generator described by `config` (imports torch/diffusers/transformers on first use)."""
    from daemon.generate.i2vgenxl import load_generator as load_i2vgenxl

    return load_i2vgenxl(config)


__all__ = ["load_generator"]

"""Per-layer compiled generators for the CPU compile tests: deep copies of an eager generator's UNet and VAE, so the
eager one stays the reference and each test compiles its own layers."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from daemon.generate.i2vgenxl import I2VGenXLGenerator


def compiled_copy(
    eager: I2VGenXLGenerator, backend: Any, *, compile_vae: bool = True, precompiled_dir: Path | None = None
) -> I2VGenXLGenerator:
    """A generator on copies of `eager`'s UNet and VAE, compiled per layer with `backend` (with `precompiled_dir`,
    through saved ahead-of-time graphs instead of dynamo's caches)."""
    parts = dataclasses.replace(
        eager.components, unet=copy.deepcopy(eager.components.unet), vae=copy.deepcopy(eager.components.vae)
    )
    return I2VGenXLGenerator(
        parts,
        eager.info,
        device=torch.device("cpu"),
        decode_chunk_size=4,
        compile_mode="default",
        compile_scope="blocks",
        compile_vae=compile_vae,
        compile_backend=backend,
        precompiled_dir=precompiled_dir,
    )

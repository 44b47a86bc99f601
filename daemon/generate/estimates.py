"""Predicted peak VRAM and GPU seconds of one job, from the configured backend's measured model.

One entry point for `i2vd validate` and the job resolver, so neither needs to know which model family has which
model: I2VGen-XL's own (`vram.py`, which the preflight, batching and degrade ladder also use) or the stock
backends' (`vram_stock.py`). Torch-free.
"""

from __future__ import annotations

from daemon.generate import vram, vram_stock
from daemon.generate.fastmode import FastOptions


def job_peak_bytes(backend: str, width: int, height: int, num_frames: int, decode_chunk: int = 8) -> int:
    """Peak allocated bytes of one video as the generator runs it (without the preflight's safety margin)."""
    if backend == "i2vgen-xl":
        return vram.job_peak_bytes(width, height, num_frames, decode_chunk=decode_chunk)
    return vram_stock.model_for(backend).peak_bytes(width, height, num_frames, decode_chunk)


def job_seconds(backend: str, width: int, height: int, num_frames: int, steps: int, mode: str | None = None) -> float:
    """Wall seconds of one video on the GPU its model was measured on. I2VGen-XL's fast mode runs its capped number
    of steps, of which the shallow ones cost `shallow_step_fraction` of a full one (measured 0.47 on an H200 with
    the per-layer compile; BENCHMARKS.md, "Compile scope")."""
    if backend == "i2vgen-xl":
        if mode == "fast":
            options = FastOptions()
            capped = options.steps_for(steps)
            return vram.estimate_seconds(width, height, num_frames, capped, shallow_steps=options.shallow_steps(capped))
        return vram.estimate_seconds(width, height, num_frames, steps)
    return vram_stock.model_for(backend).seconds(width, height, num_frames, steps)


def measured_on(backend: str) -> str:
    """Where the model's coefficients come from (shown by `i2vd validate`)."""
    if backend == "i2vgen-xl":
        return vram.load_model().source
    return vram_stock.model_for(backend).source

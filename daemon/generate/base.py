"""The contract between the worker and a video generator backend.

This module must stay importable without torch: the worker, the CLI and most tests only see these types.
A backend (e.g. `daemon.generate.i2vgenxl`) imports torch/diffusers lazily and implements `Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from PIL import Image

StepCallback = Callable[[int, int, float], None]
"""Called after each denoising step with (step index starting at 1, total steps, seconds the step took)."""

InterruptCheck = Callable[[], bool]
"""Polled between denoising steps; True makes the generator raise `JobInterrupted`."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one video needs, already resolved and validated (sizes are multiples of 8)."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    target_fps: int
    steps: int
    guidance_scale: float
    seed: int
    options: Mapping[str, int | float] = field(default_factory=dict)
    """Settings only some backends use (`ResolvedJob.model_options`, e.g. svd's `motion_bucket_id`); a backend
    reads the keys daemon/modelrules.py lets it accept and falls back to its configured defaults for the rest."""
    mode: str | None = None
    """'exact' or 'fast' (opt-in per job or preset, e.g. `preview`); None: the model config's `mode`."""


@dataclass(frozen=True)
class GenerationResult:
    """The decoded frames plus what the manifest and the metrics need to know about how they were made."""

    frames: npt.NDArray[np.uint8]
    """(num_frames, height, width, 3) RGB."""
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per internal stage: encode_prompt, encode_image, denoise, decode."""
    peak_vram_bytes: int = 0
    nonfinite_values: int | None = None
    """NaN/inf values seen in the float output before conversion to uint8 (None: not counted); sanity.py."""
    degradations: tuple[str, ...] = ()
    """Steps of the out-of-memory degrade ladder taken for this video, in order (e.g. `decode_chunk=4`,
    `vae_tiling`, `cpu_offload`, `num_frames=12`); recorded in the manifest and counted in metrics."""
    used: Mapping[str, object] = field(default_factory=dict)
    """Parameters that differ from the request because of a degradation (e.g. `{"num_frames": 12}`)."""
    out_of_memory_errors: int = 0
    """Out-of-memory errors the degrade ladder caught and recovered from (`i2vd_oom_total` counts them: an
    OOM that ended the job is counted where it is raised)."""


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded model, for manifests, logs and `build_info`."""

    model_id: str
    revision: str | None
    device: str
    dtype: str
    load_seconds: float
    library_versions: Mapping[str, str] = field(default_factory=dict)


class Generator(Protocol):
    """A loaded, warm pipeline. Loaded once per process and reused by every job."""

    @property
    def info(self) -> ModelInfo: ...

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> GenerationResult:
        """Generate one video. Raises `TransientJobError` on out-of-memory, `JobInterrupted` when asked to stop."""
        ...

    def memory_stats(self) -> Mapping[str, int]:
        """Device memory in bytes: keys `allocated`, `reserved`, `total`, `free` (empty on CPU)."""
        ...


class BatchGenerator(Generator, Protocol):
    """Optional capability: several compatible requests (same width, height, num_frames, steps) in one batch.

    Each request keeps its own seed, prompt, image and guidance; results come back in request order. The worker
    only batches when the generator has this method and `max_batch_size(...)` allows more than one.
    """

    def max_batch_size(self, request: GenerationRequest) -> int:
        """How many requests shaped like `request` fit the VRAM budget at once (1: do not batch)."""
        ...

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: StepCallback | None = None,
        should_interrupt: InterruptCheck | None = None,
    ) -> list[GenerationResult]: ...


def batch_key(request: GenerationRequest) -> tuple[int, int, int, int]:
    """Requests with equal keys can share a batch."""
    return (request.width, request.height, request.num_frames, request.steps)

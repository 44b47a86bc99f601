"""The svd, ltx-video and wan-i2v backends end to end on the CPU: a tiny random-weight pipeline is built, saved with
`save_pretrained` into tmp_path, loaded back through `daemon.generate.load_generator` (the real `from_pretrained`
path), and a job dropped in the inbox goes through intake, the worker, the encoder and the publisher.

GPU out-of-memory cannot be produced on this machine: it is simulated by making the pipeline's VAE decode raise
`torch.cuda.OutOfMemoryError` (the module boundary where it happens on a GPU) until the ladder makes it fit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.config import BackendName, ModelConfig, load_config
from daemon.errors import ConfigError, JobInterrupted, TransientJobError
from daemon.generate import load_generator
from daemon.generate.base import GenerationRequest
from daemon.generate.diffusers_common import DiffusersGenerator
from daemon.generate.tiny_backends import save_tiny_pipeline
from daemon.intake import Intake
from daemon.jobqueue import JobQueue
from daemon.metrics import DaemonMetrics
from daemon.store import ClaimedJob, JobStore
from daemon.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BACKENDS: list[BackendName] = ["svd", "ltx-video", "wan-i2v"]
FRAMES = 9  # allowed by every backend's rule (8k+1 and 4k+1)
SIZE = 32  # a multiple of every backend's size rule; keeps each video well under a few seconds on the CPU


@pytest.fixture(scope="module", params=BACKENDS)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[BackendName, Path]:
    backend: BackendName = request.param
    return backend, save_tiny_pipeline(backend, tmp_path_factory.mktemp(backend) / "model")


@pytest.fixture(scope="module")
def generator(model_dir: tuple[BackendName, Path]) -> DiffusersGenerator:
    backend, directory = model_dir
    loaded = load_generator(ModelConfig(backend=backend, source=str(directory), device="cpu"))
    assert isinstance(loaded, DiffusersGenerator) and loaded.backend == backend
    return loaded


def make_request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "image": Image.new("RGB", (80, 64), (200, 120, 40)),
        "prompt": "a cat walks on the sea",
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "num_frames": FRAMES,
        "target_fps": 8,
        "steps": 2,
        "guidance_scale": 3.0,
        "seed": 3,
    }
    return GenerationRequest(**(values | overrides))


def test_generates_the_requested_shape_deterministically(generator: DiffusersGenerator) -> None:
    steps: list[tuple[int, int]] = []
    first = generator.generate(make_request(), on_step=lambda step, total, seconds: steps.append((step, total)))
    again = generator.generate(make_request())
    assert first.frames.shape == (FRAMES, SIZE, SIZE, 3) and first.frames.dtype == np.uint8
    assert steps == [(1, 2), (2, 2)]
    assert np.array_equal(first.frames, again.frames)
    assert not np.array_equal(first.frames, generator.generate(make_request(seed=4)).frames)
    assert first.nonfinite_values == 0 and first.degradations == ()
    assert set(first.timings) == {"denoise", "decode", "pipeline"}
    assert generator.memory_stats() == {} and first.peak_vram_bytes == 0  # CPU: no device memory to report
    assert generator.info.model_id.endswith("model") and generator.info.device == "cpu"


def test_frames_equal_the_stock_pipeline_call(generator: DiffusersGenerator) -> None:
    """The generator adds only the step callback, the memory ladder and (svd, wan-i2v) its own copy of the
    pipeline's decode; the video must be the stock call's, bit for bit."""
    request = make_request()
    seed = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        stock = generator.pipeline(**generator.call_kwargs(request), generator=seed, output_type="np").frames[0]
    expected = np.clip(np.asarray(stock, dtype=np.float32), 0.0, 1.0)
    assert np.array_equal(generator.generate(request).frames, (expected * 255).round().astype(np.uint8))


def test_interrupt_between_steps_stops_the_pipeline(generator: DiffusersGenerator) -> None:
    seen: list[int] = []
    with pytest.raises(JobInterrupted, match="after denoising step 1 of 3"):
        generator.generate(
            make_request(steps=3),
            on_step=lambda step, total, seconds: seen.append(step),
            should_interrupt=lambda: bool(seen),
        )
    assert seen == [1]


def test_out_of_memory_in_decode_walks_the_ladder(
    generator: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: the VAE decode raises CUDA out-of-memory until a decode-saving rung is on."""
    vae = generator.pipeline.vae
    real_decode = vae.decode
    chunks: list[int] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        chunks.append(latents.shape[0])
        fits = getattr(vae, "use_tiling", False) or (generator.backend == "svd" and latents.shape[0] <= 2)
        if not fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(latents, *args, **kwargs)

    denoiser = getattr(generator.pipeline, "transformer", None) or generator.pipeline.unet
    real_forward, forwards = denoiser.forward, []
    monkeypatch.setattr(denoiser, "forward", lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    generator.generate(make_request())
    forwards_per_video = len(forwards)  # steps x (1 or 2 with unbatched CFG)
    forwards.clear()
    monkeypatch.setattr(vae, "decode", decode)
    # svd: a job asking for 4-frame decode chunks; the ladder halves them.
    result = generator.generate(make_request(options={"decode_chunk_size": 4}))
    expected = ("decode_chunk=2",) if generator.backend == "svd" else ("vae_tiling",)
    assert result.degradations == expected
    assert result.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert not getattr(vae, "use_tiling", False), "a rung is undone after its video"
    if generator.backend == "svd":
        assert result.used == {"decode_chunk_size": 2} and chunks[0] == 4 and set(chunks[1:]) == {2, 1}
    # svd and wan-i2v decode the latents themselves: only the decode is retried; ltx-video repeats the video.
    assert len(forwards) == forwards_per_video * (1 if generator.decodes_latents else 2)


def test_out_of_memory_while_denoising_is_transient_on_the_cpu(
    generator: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated in the denoiser: decode rungs cannot help and CPU offload needs CUDA, so the worker retries."""
    denoiser = getattr(generator.pipeline, "transformer", None) or generator.pipeline.unet

    def forward(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(denoiser, "forward", forward)
    with pytest.raises(TransientJobError, match=f"out of GPU memory generating {SIZE}x{SIZE}x{FRAMES}"):
        generator.generate(make_request())


def test_a_directory_of_another_model_is_refused(model_dir: tuple[BackendName, Path]) -> None:
    backend, directory = model_dir
    other: BackendName = "svd" if backend != "svd" else "ltx-video"
    with pytest.raises(ConfigError, match=f"model.backend is '{other}' but .* describes"):
        load_generator(ModelConfig(backend=other, source=str(directory), device="cpu"))


def test_a_job_goes_through_the_daemon(
    tmp_path: Path, generator: DiffusersGenerator, make_image: Callable[..., Path]
) -> None:
    backend = generator.backend
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"model: {{backend: {backend}, source: {generator.info.model_id}, device: cpu}}\n"
        f"generation: {{defaults: {{width: 64, height: 64, num_frames: {FRAMES}, steps: 2}}}}\n"
        "intake: {stable_seconds: 0.0}\n"
    )
    config = load_config(config_path, {"inbox": tmp_path / "inbox", "outbox": tmp_path / "outbox"})
    config.inbox.mkdir()
    config.outbox.mkdir()
    make_image("walk.png", size=(80, 64), directory=config.inbox)
    extra = "motion_bucket_id: 60\n" if backend == "svd" else "negative_prompt: blurry\n"
    (config.inbox / "walk.yaml").write_text(f"prompt: a dog runs\nseed: 11\nvariants: [first_frame]\n{extra}")
    store = JobStore(config.inbox, config.state_path)
    queue: JobQueue[ClaimedJob] = JobQueue()
    worker = Worker(config, generator, store, queue, DaemonMetrics(), interrupt=threading.Event())
    (job,) = Intake(config, store).poll().accepted
    assert worker.process(job) == "succeeded"
    [manifest_path] = config.outbox.glob("video_*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["seed"] == 11
    main_output = next(o for o in manifest["outputs"] if o["role"] == "main")
    assert (main_output["frames"], main_output["width"], main_output["height"]) == (
        FRAMES,
        64,
        64,
    )  # the smallest size a sidecar or config may ask for
    if backend == "svd":
        assert manifest["used"]["model_options"] == {"motion_bucket_id": 60, "noise_aug_strength": 0.02}

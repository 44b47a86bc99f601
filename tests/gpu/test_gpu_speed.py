"""The GPU path on CUDA with the embedded tiny model in float16: exact mode against the float32 reference loop,
batches, compile, memory release and the degrade ladder. Out-of-memory is injected at the module boundary
(`batch_render.decode` / `batch_render.denoise`): a real one would need a full GPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.config import ModelConfig
from daemon.generate import batch_render, compile_cache, gpu_speed
from daemon.generate.base import GenerationRequest
from daemon.generate.i2vgenxl import I2VGenXLGenerator, load_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def generator(cache: Path) -> I2VGenXLGenerator:
    return load_generator(ModelConfig(device="cuda", dtype="float16", cache_dir=cache))


@pytest.fixture(scope="module")
def reference(cache: Path) -> I2VGenXLGenerator:
    """The float32 reference loop on the CPU (bit-exact with the stock pipeline there)."""
    return load_generator(ModelConfig(device="cpu", dtype="float32", cache_dir=cache))


def make_request(seed: int = 3, guidance_scale: float = 9.0, **overrides: Any) -> GenerationRequest:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(72, 96, 3), dtype=np.uint8)
    values: dict[str, Any] = {
        "image": Image.fromarray(pixels),
        "prompt": f"a cat surfing wave {seed}",
        "negative_prompt": "blurry",
        "width": 128,
        "height": 96,
        "num_frames": 8,
        "target_fps": 16,
        "steps": 4,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    return GenerationRequest(**(values | overrides))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))


def test_exact_mode_in_float16_matches_the_float32_reference(
    generator: I2VGenXLGenerator, reference: I2VGenXLGenerator
) -> None:
    """Stated tolerance: PSNR >= 40 dB and max abs error < 0.03 against the float32 reference loop (the full-size
    model measured 61 dB, BENCHMARKS.md)."""
    request = make_request()
    ours = generator.render(request).frames
    ref = reference.render(request).frames
    assert psnr(ours, ref) >= 40.0
    assert float(np.abs(ours - ref).max()) < 0.03


@pytest.mark.parametrize(("length", "width"), [(300, 5), (16, 5), (16, 64), (32, 64), (8, 64)])
def test_our_attention_matches_plain_attention_on_cuda(length: int, width: int) -> None:
    """Padded heads, and short sequences through the memory-efficient kernel (16 and 8 frames packed under the
    block-diagonal mask), against fp32 attention."""
    torch.manual_seed(0)
    # 512 sequences: enough for the short ones to be packed (gpu_speed.PACK_MIN_BATCH)
    q, k, v = (torch.randn(512, 8, length, width, device="cuda", dtype=torch.float16) for _ in range(3))
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():  # the profiler's one-time notices are errors under our warning filters
        warnings.simplefilter("ignore", UserWarning)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ours = gpu_speed.attention(q, k, v).float()
            torch.cuda.synchronize()
    plain = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert float((ours - plain).abs().max()) < 2e-3
    if length <= gpu_speed.SHORT_SEQUENCE:  # "fmha_cutlass…": the memory-efficient kernel's name
        assert any("fmha" in event.key for event in prof.key_averages())
    assert gpu_speed.pack_group(512, length, length) == (4 if length == 16 else 8 if length == 8 else 1)


def test_more_short_sequences_than_one_kernel_launch_takes() -> None:
    """65536 temporal sequences (a batch of two 1024p videos): more than the memory-efficient kernel's grid takes
    in one launch; `attention` slices the batch (32 frames: not packed, so the batch stays that large)."""
    torch.manual_seed(0)
    shape = (gpu_speed.KERNEL_BATCH_LIMIT + 1, 1, 32, 8)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in "qkv")
    ours = gpu_speed.attention(q, k, v).float()
    plain = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert float((ours - plain).abs().max()) < 2e-3


def test_a_guided_step_matches_the_doubled_batch_on_cuda(generator: I2VGenXLGenerator) -> None:
    """The guided step (what precedes the first context computed once for both halves) against the same step on
    `cat([latents] * 2)`, in float16 on CUDA: the half batch may take other kernels, so equal within rounding."""
    unet = generator.components.unet
    torch.manual_seed(5)
    shape = (2, 4, 8, 12, 16)
    latents = torch.randn(shape, device="cuda", dtype=torch.float16)
    image_latents = torch.cat([torch.randn(shape, device="cuda", dtype=torch.float16)] * 2)
    dim = unet.config.cross_attention_dim
    images = torch.randn(4, 1, dim, device="cuda", dtype=torch.float16)
    prompts = torch.randn(4, 77, dim, device="cuda", dtype=torch.float16)
    fps, timestep = torch.tensor([16, 8] * 2, device="cuda"), torch.tensor(500, device="cuda")
    with torch.inference_mode():
        prep = gpu_speed.prepare(unet, image_latents, images, prompts, fps)
        doubled, deep = gpu_speed.step(unet, torch.cat([latents] * 2), timestep, prep)
        guided, guided_deep = gpu_speed.step(unet, latents, timestep, prep, guided=True)
        shallow, _ = gpu_speed.step(unet, latents, timestep, prep, deep, guided=True)
        doubled_shallow, _ = gpu_speed.step(unet, torch.cat([latents] * 2), timestep, prep, deep)
    scale = float(doubled.abs().max())
    assert float((guided - doubled).abs().max()) <= 1e-2 * scale
    assert float((guided_deep - deep).abs().max()) <= 1e-2 * float(deep.abs().max())
    assert float((shallow - doubled_shallow).abs().max()) <= 1e-2 * scale


def test_batch_of_two_equals_singles_in_float16(generator: I2VGenXLGenerator) -> None:
    first, second = make_request(1, 9.0), make_request(2, 4.0)
    batch = generator.render_batch([first, second])
    for video, request in zip(batch, (first, second), strict=True):
        assert psnr(video.frames, generator.render(request).frames) >= 45.0
    assert generator.max_batch_size(first) >= 2


def test_steps_are_reported_without_a_sync_per_step(generator: I2VGenXLGenerator) -> None:
    reported: list[tuple[int, int, float]] = []
    generator.render(make_request(steps=6), on_step=lambda s, t, secs: reported.append((s, t, secs)))
    assert [step for step, _, _ in reported] == [1, 2, 3, 4, 5, 6]
    assert all(total == 6 and seconds > 0 for _, total, seconds in reported)


def test_memory_is_released_after_every_job(generator: I2VGenXLGenerator) -> None:
    generator.generate(make_request(5))
    baseline = torch.cuda.memory_allocated()
    for seed in range(6, 16):
        generator.generate(make_request(seed))
    assert torch.cuda.memory_allocated() <= baseline + 1024 * 1024


def test_oom_in_decode_degrades_and_the_video_still_comes(
    generator: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = batch_render.decode
    calls: list[int] = []

    def failing_decode(vae: Any, latents: torch.Tensor, plan: Any) -> Any:
        calls.append(plan.decode_chunk)
        if len(calls) <= 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_decode(vae, latents, plan)

    monkeypatch.setattr(batch_render, "decode", failing_decode)
    result = generator.generate(make_request(20))
    assert result.degradations[-1] == "cpu_offload"
    assert "vae_tiling" in result.degradations
    assert result.frames.shape == (8, 96, 128, 3)
    assert next(generator.components.unet.parameters()).device.type == "cuda"
    assert next(generator.components.vae.parameters()).device.type == "cuda"


def test_oom_in_denoise_gives_up_frames(generator: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    real_denoise = batch_render.denoise
    frames: list[int] = []

    def failing_denoise(parts: Any, requests: Any, plan: Any, *args: Any) -> torch.Tensor:
        frames.append(plan.num_frames)
        if len(frames) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_denoise(parts, requests, plan, *args)

    monkeypatch.setattr(batch_render, "denoise", failing_denoise)
    result = generator.generate(make_request(21, num_frames=16))
    assert result.degradations[:2] == ("cpu_offload", "num_frames=12")
    assert result.used["num_frames"] == 12
    assert result.frames.shape == (12, 96, 128, 3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
def test_compiled_step_matches_eager(cache: Path) -> None:
    """torch.compile with CUDA graphs (the benchmarked mode) computes the same video as eager, within fp16.
    torch's own warnings while compiling (a deprecated TorchScript helper; an empty CUDA-graph partition of the
    tiny model) are not failures; with warnings as errors they would make the guard fall back to eager."""
    compiled = load_generator(ModelConfig(device="cuda", dtype="float16", cache_dir=cache, compile="reduce-overhead"))
    assert compile_cache.cache_root(cache).is_dir()  # compiled before READY by `warm_up`, artefacts kept there
    request = make_request(30, width=512, height=512, num_frames=16)  # the warmed-up shape: no second compile
    eager = load_generator(ModelConfig(device="cuda", dtype="float16", cache_dir=cache)).render(request).frames
    first = compiled.render(request).frames
    assert compiled.step_fn.failure is None and compiled.step_fn.active
    assert psnr(first, eager) >= 40.0
    np.testing.assert_allclose(compiled.render(request).frames, first, atol=1e-3)


def test_a_restart_takes_every_layer_graph_from_disk(cache: Path) -> None:
    """The per-layer compile saves each layer's graph whole (`precompile`): a second load of the same model with
    the same cache compiles nothing, falls back to dynamo nowhere, and renders what eager renders within fp16."""
    config = ModelConfig(device="cuda", dtype="float16", cache_dir=cache, compile="default")
    first = load_generator(config)
    assert first.step_fn.layer_graphs is not None and first.step_fn.failure is None
    again = load_generator(config)
    graphs = again.step_fn.layer_graphs
    assert graphs is not None
    assert (graphs.stats.compiled, graphs.stats.discarded, graphs.stats.dynamo_fallbacks) == (0, 0, 0)
    assert graphs.stats.loaded > 20
    request = make_request(32, width=512, height=512, num_frames=16)
    eager = load_generator(ModelConfig(device="cuda", dtype="float16", cache_dir=cache))
    assert psnr(again.render(request).frames, eager.render(request).frames) >= 40.0
    assert again.step_fn.failure is None and graphs.stats.compiled == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("compile_vae", [False, True])
def test_per_layer_compile_matches_eager_in_both_modes(cache: Path, compile_vae: bool) -> None:
    """The shipped way to compile (`compile: default`, scope auto -> blocks; with and without the VAE decoder's
    layers; linear biases after their GEMMs): same video as eager within fp16 in exact and fast mode, no fallback,
    the heap frozen after the warm-up."""
    import gc

    config = ModelConfig(device="cuda", dtype="float16", cache_dir=cache, compile="default", compile_vae=compile_vae)
    compiled = load_generator(config)
    unet_layers = sum(type(m).__name__ in compile_cache.REGION_CLASSES for m in compiled.components.unet.modules())
    assert compiled.step_fn.scope == "blocks"
    assert (compiled.step_fn.regions > unet_layers) == compile_vae
    assert any(type(m) is gpu_speed.BiasAfterLinear for m in compiled.components.unet.modules())  # the default
    assert gc.get_freeze_count() > 0
    eager = load_generator(ModelConfig(device="cuda", dtype="float16", cache_dir=cache))
    for mode in ("exact", "fast"):
        request = make_request(31, width=512, height=512, num_frames=16, mode=mode)
        want = eager.render_batch([request], mode=mode)[0].frames
        got = compiled.render_batch([request], mode=mode)[0].frames
        assert psnr(got, want) >= 40.0, mode
    assert compiled.step_fn.failure is None and compiled.step_fn.active

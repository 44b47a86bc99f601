"""The generator side of batching, the fast mode, the step-invariant UNet split and the degrade ladder, on the
embedded tiny model on the CPU. Out-of-memory cannot be produced on the CPU: it is injected at the module
boundary (`batch_render.decode` / `batch_render.denoise` raising `torch.cuda.OutOfMemoryError`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from daemon.config import ModelConfig
from daemon.errors import TransientJobError
from daemon.generate import batch_render, gpu_speed, tiny
from daemon.generate import i2vgenxl_loop as loop
from daemon.generate import predict as pred
from daemon.generate.base import GenerationRequest
from daemon.generate.compile_cache import GuardedCompile
from daemon.generate.i2vgenxl import I2VGenXLGenerator, load_generator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> I2VGenXLGenerator:
    return load_generator(ModelConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("cache")))


def make_request(seed: int, guidance_scale: float = 9.0, **overrides: Any) -> GenerationRequest:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    values: dict[str, Any] = {
        "image": Image.fromarray(pixels),
        "prompt": f"prompt number {seed}",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "num_frames": 8,
        "target_fps": 8 + seed,
        "steps": 3,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    return GenerationRequest(**(values | overrides))


@pytest.mark.slow
def test_a_batch_of_two_equals_the_two_single_runs(generator: I2VGenXLGenerator) -> None:
    """Each request keeps its own seed, prompt, image, fps and guidance; results come back in order."""
    first, second = make_request(1, 9.0), make_request(2, 5.0)
    singles = [generator.render(first), generator.render(second)]
    batch = generator.generate_batch([first, second])
    floats = generator.render_batch([first, second])
    for video, result, single in zip(floats, batch, singles, strict=True):
        assert float(np.abs(video.frames - single.frames).max()) < 1e-4
        assert result.frames.shape == (8, 64, 64, 3)
        assert int(np.abs(result.frames.astype(int) - loop.to_uint8(single.frames).astype(int)).max()) <= 1
    assert float(np.abs(floats[0].frames - floats[1].frames).mean()) > 1e-3


@pytest.mark.slow
def test_a_batch_mixing_guided_and_unguided_requests(generator: I2VGenXLGenerator) -> None:
    unguided, guided = make_request(3, 1.0), make_request(4, 9.0)
    videos = generator.render_batch([unguided, guided])
    assert float(np.abs(videos[0].frames - generator.render(unguided).frames).max()) < 1e-4
    assert float(np.abs(videos[1].frames - generator.render(guided).frames).max()) < 1e-4


def test_a_batch_needs_one_shape(generator: I2VGenXLGenerator) -> None:
    with pytest.raises(ValueError, match="equal width"):
        generator.render_batch([make_request(1), make_request(2, num_frames=9)])
    assert generator.max_batch_size(make_request(1)) == 1  # the CPU never batches


def test_prepared_step_is_bit_exact_with_the_unet_call(generator: I2VGenXLGenerator) -> None:
    """`gpu_speed.prepare` + `step` are `I2VGenXLUNet.forward` split in two: identical floats in eager mode, and
    a shallow (DeepCache) pass fed with its own step's deep feature gives the full pass's output too."""
    unet = generator.components.unet
    torch.manual_seed(0)
    sample, latents = torch.randn(2, 4, 8, 12, 16), torch.randn(2, 4, 8, 12, 16)
    images, prompts = torch.randn(2, 1, 32), torch.randn(2, 77, 32)
    fps, timestep = torch.tensor([16, 16]), torch.tensor(500)
    with torch.inference_mode():
        stock = unet(
            sample,
            timestep,
            encoder_hidden_states=prompts,
            fps=fps,
            image_latents=latents,
            image_embeddings=images,
            return_dict=False,
        )[0]
        prep = gpu_speed.prepare(unet, latents, images, prompts, fps)
        ours, deep = gpu_speed.step(unet, sample, timestep, prep)
        shallow, _ = gpu_speed.step(unet, sample, timestep, prep, deep)
    assert torch.equal(ours, stock)
    assert torch.equal(shallow, stock)


def test_a_guided_step_computes_what_precedes_the_context_once(generator: I2VGenXLGenerator) -> None:
    """`step(latents, guided=True)` is `step(cat([latents] * 2))` (full and shallow pass, two jobs' rows), while
    the layers before the first cross-attention see each job's rows once and the cross-attention both halves."""
    unet = generator.components.unet
    dtype = unet.dtype
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    unet.double()
    try:
        torch.manual_seed(4)
        jobs, frames = 2, 8
        shape = (jobs, 4, frames, 12, 16)
        latents, image_latents = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        doubled, both_latents = torch.cat([latents] * 2), torch.cat([image_latents] * 2)
        images = torch.randn(2 * jobs, 1, 32, dtype=torch.float64)
        prompts = torch.randn(2 * jobs, 77, 32, dtype=torch.float64)
        fps, timestep = torch.tensor([16, 8] * 2), torch.tensor(500)  # two jobs at different fps
        rows: dict[str, int] = {}
        first = unet.down_blocks[0]
        watched = {
            "conv_in": unet.conv_in,
            "transformer_in": unet.transformer_in,
            "resnet": first.resnets[0],
            "temp_conv": first.temp_convs[0],
            "cross_attention": first.attentions[0],
        }
        hooks += [
            module.register_forward_pre_hook(lambda _m, args, name=name: rows.__setitem__(name, args[0].shape[0]))
            for name, module in watched.items()
        ]
        with torch.inference_mode():
            prep = gpu_speed.prepare(unet, both_latents, images, prompts, fps)
            doubled_noise, deep = gpu_speed.step(unet, doubled, timestep, prep)
            doubled_shallow, _ = gpu_speed.step(unet, doubled, timestep, prep, deep)
            rows.clear()
            guided_noise, guided_deep = gpu_speed.step(unet, latents, timestep, prep, guided=True)
            guided_rows = dict(rows)
            guided_shallow, _ = gpu_speed.step(unet, latents, timestep, prep, guided_deep, guided=True)
    finally:
        for hook in hooks:
            hook.remove()
        unet.to(dtype)
    assert guided_noise.shape == doubled_noise.shape
    assert torch.allclose(guided_noise, doubled_noise, rtol=0, atol=1e-12)
    assert torch.allclose(guided_deep, deep, rtol=0, atol=1e-12)
    assert torch.allclose(guided_shallow, doubled_shallow, rtol=0, atol=1e-12)
    once, both = jobs * frames, 2 * jobs * frames
    assert guided_rows == {
        "conv_in": once,
        "transformer_in": once,
        "resnet": once,
        "temp_conv": once,
        "cross_attention": both,
    }


def test_a_guided_step_with_a_first_block_without_context_shares_only_the_head() -> None:
    """An I2VGen-XL-style UNet whose first down block has no cross-attention (a `DownBlock3D`): the guided step
    shares the input convolution and temporal transformer only, runs that block on both halves, and is still the
    doubled batch's step (float64, full and shallow pass)."""
    from diffusers import I2VGenXLUNet

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    config["down_block_types"] = ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"]
    config["up_block_types"] = ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"]
    torch.manual_seed(5)
    unet = I2VGenXLUNet.from_config(config).eval().double()
    assert not getattr(unet.down_blocks[0], "has_cross_attention", False)
    jobs, frames = 1, 8
    latents, image_latents = (torch.randn(jobs, 4, frames, 8, 8, dtype=torch.float64) for _ in range(2))
    images = torch.randn(2 * jobs, 1, 32, dtype=torch.float64)
    prompts = torch.randn(2 * jobs, 77, 32, dtype=torch.float64)
    fps, timestep = torch.tensor([16] * 2 * jobs), torch.tensor(300)
    rows: list[int] = []
    hook = unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            prep = gpu_speed.prepare(unet, torch.cat([image_latents] * 2), images, prompts, fps)
            doubled_noise, deep = gpu_speed.step(unet, torch.cat([latents] * 2), timestep, prep)
            doubled_shallow, _ = gpu_speed.step(unet, torch.cat([latents] * 2), timestep, prep, deep)
            rows.clear()
            guided_noise, guided_deep = gpu_speed.step(unet, latents, timestep, prep, guided=True)
            guided_shallow, _ = gpu_speed.step(unet, latents, timestep, prep, guided_deep, guided=True)
    finally:
        hook.remove()
    assert rows == [2 * jobs * frames, 2 * jobs * frames]  # the block ran on both halves, in both passes
    assert torch.allclose(guided_noise, doubled_noise, rtol=0, atol=1e-12)
    assert torch.allclose(guided_deep, deep, rtol=0, atol=1e-12)
    assert torch.allclose(guided_shallow, doubled_shallow, rtol=0, atol=1e-12)


def _tiny_unet_step(unet: Any, seed: int) -> torch.Tensor:
    """One guided step (full pass) of `unet` in float64 on fixed random inputs."""
    torch.manual_seed(seed)
    latents, image_latents = (torch.randn(1, 4, 8, 8, 8, dtype=torch.float64) for _ in range(2))
    images = torch.randn(2, 1, 32, dtype=torch.float64)
    prompts = torch.randn(2, 77, 32, dtype=torch.float64)
    with torch.inference_mode():
        prep = gpu_speed.prepare(unet, torch.cat([image_latents] * 2), images, prompts, torch.tensor([16, 16]))
        noise, _ = gpu_speed.step(unet, latents, torch.tensor(400), prep, guided=True)
    return noise


def test_fused_projections_compute_the_same_step() -> None:
    """The query/key/value projections as one GEMM (self-attention) and key/value as one (cross-attention) give
    the same step as one GEMM each (float64), through every attention layer of the UNet."""
    from diffusers import I2VGenXLUNet
    from diffusers.models.attention_processor import Attention

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(6)
    unet = I2VGenXLUNet.from_config(config).eval().double()
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert layers and all(gpu_speed.fusable(m) for m in layers)
    assert {m.is_cross_attention for m in layers} == {True, False}  # both kinds are covered
    assert gpu_speed.install_attention(unet) == len(layers)
    separate = _tiny_unet_step(unet, 7)
    called: list[str] = []
    hooks = [
        getattr(m, name).register_forward_pre_hook(lambda *_, key=f"{m.is_cross_attention}:{name}": called.append(key))
        for m in layers
        for name in ("to_q", "to_k", "to_v")
    ]
    assert gpu_speed.install_attention(unet, fuse_projections=True) == len(layers)
    try:
        fused = _tiny_unet_step(unet, 7)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(fused, separate, rtol=0, atol=1e-12)
    assert called and set(called) == {"True:to_q"}  # only a cross-attention's query is a GEMM of its own


def test_a_bias_added_after_the_gemm_computes_the_same_step() -> None:
    """`split_linear_bias` swaps the class of every plain biased `Linear` (weights and state dict untouched), the
    step is the same (float64), and `undo` swaps them back."""
    from diffusers import I2VGenXLUNet

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(8)
    unet = I2VGenXLUNet.from_config(config).eval().double()
    biased = [m for m in unet.modules() if type(m) is torch.nn.Linear and m.bias is not None]
    state = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    before = _tiny_unet_step(unet, 9)
    assert gpu_speed.split_linear_bias(unet) == len(biased) > 0
    assert all(type(m) is gpu_speed.BiasAfterLinear for m in biased)
    after = _tiny_unet_step(unet, 9)
    assert torch.allclose(after, before, rtol=0, atol=1e-12)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in unet.state_dict().items())
    assert gpu_speed.split_linear_bias(unet, undo=True) == len(biased)
    assert all(type(m) is torch.nn.Linear for m in biased)


def test_eager_layout_undoes_what_pays_only_when_compiled() -> None:
    """After a compile falls back to eager, the generator puts the UNet back as eager mode runs fastest: plain
    `Linear`s and contiguous convolution weights, the same step."""
    from diffusers import I2VGenXLUNet

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(10)
    unet = I2VGenXLUNet.from_config(config).eval().double()
    before = _tiny_unet_step(unet, 11)
    assert gpu_speed.split_linear_bias(unet) > 0 and gpu_speed.to_channels_last(unet) > 0
    convs = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert not all(m.weight.is_contiguous() for m in convs)
    gpu_speed.eager_layout(unet)
    assert not any(type(m) is gpu_speed.BiasAfterLinear for m in unet.modules())
    assert all(m.weight.is_contiguous() for m in convs)
    assert torch.allclose(_tiny_unet_step(unet, 11), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [8, 33])  # a short (temporal) and a long sequence
def test_padded_heads_compute_the_same_attention(length: int) -> None:
    torch.manual_seed(1)
    query, key, value = (torch.randn(2, 4, length, 5, dtype=torch.float64) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    assert torch.allclose(gpu_speed.attention(query, key, value), reference, atol=1e-12)


def test_attention_in_batches_equals_one_call() -> None:
    """The memory-efficient kernel takes at most 65535 batch entries per launch; slicing the batch changes nothing
    (shown with the default kernel and a small limit: the slicing is the same on every device)."""
    torch.manual_seed(3)
    query, key, value = (torch.randn(7, 2, 16, 8) for _ in range(3))

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        calls.append(q.shape[0])
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    calls: list[int] = []
    whole = F.scaled_dot_product_attention(query, key, value, scale=0.3)
    assert torch.equal(gpu_speed.in_batches(kernel, query, key, value, 0.3, 3), whole)
    assert calls == [3, 3, 1]
    calls.clear()
    assert torch.equal(gpu_speed.in_batches(kernel, query, key, value, 0.3, 7), whole) and calls == [7]


@pytest.mark.parametrize("group", [2, 4, 8])
def test_packed_short_sequences_attend_only_within_their_own(group: int) -> None:
    """Sequences packed side by side under the block-diagonal mask give each query exactly its own sequence's
    keys: the result equals one call per sequence, for (B, H, S, D) views of (B, S, H, D) projections."""
    torch.manual_seed(4)
    query, key, value = (torch.randn(16, 16, 3, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    reference = torch.stack(
        [F.scaled_dot_product_attention(q, k, v) for q, k, v in zip(query, key, value, strict=True)]
    )
    packed = gpu_speed.packed_attention(query, key, value, None, group)
    assert packed.shape == query.shape
    assert torch.allclose(packed, reference, atol=1e-12)


def test_only_short_self_attentions_are_packed() -> None:
    """16 frames four at a time (64 tokens), 8 frames eight at a time; 32 frames and few sequences (both measured
    no faster packed), cross-attentions and batches the group does not divide stay unpacked."""
    assert gpu_speed.pack_group(8192, 16, 16) == 4
    assert gpu_speed.pack_group(512, 16, 16) == 4
    assert gpu_speed.pack_group(8192, 8, 8) == 8
    assert gpu_speed.pack_group(8192, 32, 32) == 1
    assert gpu_speed.pack_group(128, 16, 16) == 1
    assert gpu_speed.pack_group(8192, 16, 12) == 1
    assert gpu_speed.pack_group(514, 16, 16) == 1


def test_packing_falls_back_where_it_cannot_pack() -> None:
    """A group that does not divide the batch, or keys of another length (cross-attention), make the plain call."""
    torch.manual_seed(5)
    query, value = torch.randn(6, 2, 16, 8), torch.randn(6, 2, 16, 8)
    assert torch.equal(
        gpu_speed.packed_attention(query, query, value, 0.3, 4),
        F.scaled_dot_product_attention(query, query, value, scale=0.3),
    )
    key = torch.randn(6, 2, 9, 8)
    assert torch.equal(
        gpu_speed.packed_attention(query, key, key, None, 2), F.scaled_dot_product_attention(query, key, key)
    )


def test_aligned_heads_make_the_stock_call() -> None:
    """8-aligned heads off CUDA: the very call diffusers' `AttnProcessor2_0` makes, identical floats."""
    torch.manual_seed(2)
    query, key, value = (torch.randn(2, 4, 40, 16) for _ in range(3))
    assert torch.equal(gpu_speed.attention(query, key, value), F.scaled_dot_product_attention(query, key, value))


def test_our_attention_processor_serves_every_layer_of_the_unet(tmp_path: Path) -> None:
    """Every attention layer of the I2VGen-XL UNet takes `AttentionProcessor`, and the UNet's output stays the
    stock processor's (the tiny model's heads are 4 wide, so padded: equal up to rounding)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = load_generator(ModelConfig(device="cpu", cache_dir=tmp_path)).components.unet
    torch.manual_seed(0)
    sample, latents = torch.randn(2, 4, 8, 12, 16), torch.randn(2, 4, 8, 12, 16)
    images, prompts = torch.randn(2, 1, 32), torch.randn(2, 77, 32)
    kwargs = {"encoder_hidden_states": prompts, "fps": torch.tensor([16, 16]), "image_latents": latents}
    outputs = []
    with torch.inference_mode():
        for install in (lambda: unet.set_attn_processor(AttnProcessor2_0()), lambda: gpu_speed.install_attention(unet)):
            install()
            outputs.append(unet(sample, torch.tensor(500), image_embeddings=images, return_dict=False, **kwargs)[0])
    assert gpu_speed.install_attention(unet) == len(unet.attn_processors)
    assert all(isinstance(p, gpu_speed.AttentionProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fast_mode_reuses_deep_features(generator: I2VGenXLGenerator) -> None:
    """Interval 1 recomputes everything (= exact); a longer interval changes the output, but not wildly."""
    request = make_request(5, steps=6)
    exact = generator.render(request).frames
    saved = generator.fast_options
    try:
        generator.fast_options = pred.FastOptions(cache_interval=1)
        assert float(np.abs(generator.render_batch([request], mode="fast")[0].frames - exact).max()) < 1e-5
        generator.fast_options = pred.FastOptions(cache_interval=3)
        fast = generator.render_batch([request], mode="fast")[0].frames
    finally:
        generator.fast_options = saved
    difference = float(np.abs(fast - exact).mean())
    assert 1e-5 < difference < 0.2


def test_oom_while_decoding_climbs_the_decode_rungs_and_keeps_the_latents(
    generator: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    denoised: list[int] = []
    decode_calls: list[int] = []
    real_denoise, real_decode = batch_render.denoise, batch_render.decode

    def counting_denoise(*args: Any, **kwargs: Any) -> torch.Tensor:
        denoised.append(1)
        return real_denoise(*args, **kwargs)

    def failing_decode(vae: Any, latents: torch.Tensor, plan: Any) -> Any:
        decode_calls.append(plan.decode_chunk)
        if len(decode_calls) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(vae, latents, plan)

    monkeypatch.setattr(batch_render, "denoise", counting_denoise)
    monkeypatch.setattr(batch_render, "decode", failing_decode)
    result = generator.generate(make_request(6, steps=2))
    assert result.degradations == ("decode_chunk=4", "decode_chunk=2")
    assert decode_calls == [8, 4, 2]
    assert denoised == [1]
    assert result.used == {"decode_chunk_size": 2}
    assert result.frames.shape == (8, 64, 64, 3)
    assert result.out_of_memory_errors == 2  # both caught and recovered from: `i2vd_oom_total` counts them


def test_oom_while_denoising_offloads_then_gives_up_frames(
    generator: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_denoise = batch_render.denoise
    attempts: list[int] = []

    def failing_denoise(parts: Any, requests: Any, plan: Any, *args: Any) -> torch.Tensor:
        attempts.append(plan.num_frames)
        if len(attempts) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_denoise(parts, requests, plan, *args)

    monkeypatch.setattr(batch_render, "denoise", failing_denoise)
    result = generator.generate(make_request(7, steps=2, num_frames=12))
    assert result.degradations == ("cpu_offload", "num_frames=9")
    assert result.used == {"num_frames": 9, "decode_chunk_size": 8}
    assert result.frames.shape == (9, 64, 64, 3)
    assert attempts == [12, 12, 9]
    assert generator.components.unet.device.type == "cpu"  # every model back in place after the job


def test_oom_on_every_rung_is_transient(generator: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    def always(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(batch_render, "denoise", always)
    with pytest.raises(TransientJobError, match="out of GPU memory generating 64x64x8"):
        generator.generate(make_request(8, steps=2))


def test_a_failing_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler failure (here: the compiled callable raising) must not fail the job; OOM still propagates."""

    def broken_compile(function: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any) -> Any:
            raise RuntimeError("inductor: no working C compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    guarded = GuardedCompile(lambda x: x + 1, "reduce-overhead")
    assert guarded.active
    assert guarded(1) == 2
    assert not guarded.active and "no working C compiler" in (guarded.failure or "")

    def out_of_memory(*args: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    guarded = GuardedCompile(lambda x: x, "default")
    guarded.compiled = out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        guarded(1)


def test_compile_is_off_on_the_cpu(tmp_path: Path) -> None:
    config = ModelConfig(device="cpu", compile="reduce-overhead", cache_dir=tmp_path)
    generator = load_generator(config)
    assert not generator.step_fn.active
    assert generator.warm_up(tmp_path) == {}


@pytest.mark.slow
def test_fast_mode_per_request_inside_a_batch(generator: I2VGenXLGenerator) -> None:
    """A request can opt into the fast mode; a mixed batch runs one sub-batch per mode and keeps the order, and
    the fast mode's step cap is reported in `used`."""
    exact, fast = make_request(9), dataclasses.replace(make_request(10), mode="fast")
    saved = generator.fast_options
    try:
        generator.fast_options = pred.FastOptions(cache_interval=2, max_steps=2)
        results = generator.generate_batch([fast, exact])
        alone = generator.generate(fast)
    finally:
        generator.fast_options = saved
    assert results[0].used == {"steps": 2} and results[1].used == {}
    np.testing.assert_array_equal(results[0].frames, alone.frames)
    assert int(np.abs(results[1].frames.astype(int) - generator.generate(exact).frames.astype(int)).max()) <= 1


def test_compile_cache_files_that_cannot_be_used_are_ignored(tmp_path: Path) -> None:
    """A missing or corrupt mega-cache means compiling from scratch, and one that cannot be written is skipped."""
    from daemon.generate import compile_cache

    assert compile_cache.load_artifacts(tmp_path / "missing.bin") is False
    (tmp_path / "corrupt.bin").write_bytes(b"not a torch cache")
    assert compile_cache.load_artifacts(tmp_path / "corrupt.bin") is False
    (tmp_path / "file").write_text("x")
    assert compile_cache.save_artifacts(tmp_path / "file" / "mega.bin") == 0

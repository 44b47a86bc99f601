"""The I2VGen-XL generator on the embedded tiny model: equal to diffusers' stock pipeline, loadable with
`from_pretrained`, deterministic, observable (steps), interruptible, and honest about out-of-memory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.config import ModelConfig
from daemon.errors import ConfigError, DeviceUnavailable, FatalError, JobInterrupted, TransientJobError
from daemon.generate import reference
from daemon.generate.base import GenerationRequest
from daemon.generate.i2vgenxl import I2VGenXLGenerator, load_generator, resolve_device_dtype
from daemon.generate.tiny import MARKER_NAME, materialize_tiny_model

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> I2VGenXLGenerator:
    cache = tmp_path_factory.mktemp("cache")
    return load_generator(ModelConfig(source="embedded-tiny", device="cpu", dtype="auto", cache_dir=cache))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A non-square noisy RGB image, so cropping and resizing matter."""
    pixels = np.random.default_rng(7).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_request(image: Image.Image, **overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "image": image,
        "prompt": "a cat surfing a wave",
        "negative_prompt": "blurry, static",
        "width": 64,
        "height": 64,
        "num_frames": 8,
        "target_fps": 16,
        "steps": 2,
        "guidance_scale": 9.0,
        "seed": 1234,
    }
    return GenerationRequest(**(values | overrides))


def with_clip_skip(generator: I2VGenXLGenerator, clip_skip: int | None) -> I2VGenXLGenerator:
    return I2VGenXLGenerator(generator.components, generator.info, device=CPU, decode_chunk_size=8, clip_skip=clip_skip)


@pytest.fixture
def stock_pipeline(generator: I2VGenXLGenerator) -> Iterator[Any]:
    yield reference.stock_pipeline(generator)


run_stock = reference.run_stock


@pytest.mark.parametrize("guidance_scale", [9.0, 1.0])
def test_equals_stock_pipeline_without_clip_skip(
    generator: I2VGenXLGenerator, stock_pipeline: Any, image: Image.Image, guidance_scale: float
) -> None:
    """clip_skip=None: the stock pipeline runs unmodified on transformers 5 (prompt and negative prompt encoding,
    CLIP image embedding, VAE image latents, DDIM with batched CFG, chunked decode)."""
    request = make_request(image, steps=3, guidance_scale=guidance_scale)
    ours = with_clip_skip(generator, None).render(request).frames
    stock = run_stock(stock_pipeline, request, clip_skip=None)
    assert ours.shape == stock.shape == (8, 64, 64, 3)
    assert ours.dtype == stock.dtype == np.float32
    assert float(np.abs(ours - stock).max()) <= 1e-4


def test_equals_stock_pipeline_with_default_clip_skip(
    generator: I2VGenXLGenerator, stock_pipeline: Any, image: Image.Image
) -> None:
    """clip_skip=1 (both defaults). The stock code reads `text_encoder.text_model.final_layer_norm`, which
    transformers 5 flattened into `text_encoder.final_layer_norm`; give it that alias (outside the module tree) so
    the stock encode_prompt itself computes the penultimate-layer embeddings we compare against."""
    text_encoder = stock_pipeline.text_encoder
    alias = types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    object.__setattr__(text_encoder, "text_model", alias)
    try:
        request = make_request(image, steps=3)
        ours = generator.render(request).frames
        stock = run_stock(stock_pipeline, request, clip_skip=1)
    finally:
        del text_encoder.__dict__["text_model"]
    assert float(np.abs(ours - stock).max()) <= 1e-4
    # ...and clip_skip matters: the last layer gives a different video.
    assert float(np.abs(ours - with_clip_skip(generator, None).render(request).frames).max()) > 1e-3


def test_tokenizer_gives_sensible_ids(generator: I2VGenXLGenerator) -> None:
    tokenizer = generator.components.tokenizer
    ids = tokenizer("a cat surfing a wave").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) > 4 and tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat surfing a wave"
    assert len(tokenizer) == generator.components.text_encoder.config.vocab_size


def test_loads_a_directory_saved_with_save_pretrained(
    generator: I2VGenXLGenerator, stock_pipeline: Any, image: Image.Image, tmp_path: Path
) -> None:
    """The real loading path: a diffusers directory written by `save_pretrained`, read by `from_pretrained`."""
    stock_pipeline.save_pretrained(tmp_path / "model")
    config = ModelConfig(source=str(tmp_path / "model"), revision="abc123", device="cpu", cache_dir=tmp_path)
    loaded = load_generator(config)
    assert loaded.info.model_id == str(tmp_path / "model")
    assert loaded.info.revision == "abc123"
    assert (loaded.info.device, loaded.info.dtype) == ("cpu", "float32")
    assert set(loaded.info.library_versions) == {"torch", "diffusers", "transformers"}
    request = make_request(image)
    np.testing.assert_array_equal(loaded.generate(request).frames, generator.generate(request).frames)


def test_info_of_the_embedded_model(generator: I2VGenXLGenerator) -> None:
    info = generator.info
    assert info.model_id == "embedded-tiny"
    assert info.revision is not None and info.revision.startswith("sha256:")
    assert info.load_seconds > 0
    assert generator.memory_stats() == {}


def test_same_seed_same_frames_other_seed_other_frames(generator: I2VGenXLGenerator, image: Image.Image) -> None:
    first = generator.generate(make_request(image, seed=5))
    again = generator.generate(make_request(image, seed=5))
    other = generator.generate(make_request(image, seed=6))
    np.testing.assert_array_equal(first.frames, again.frames)
    assert np.abs(first.frames.astype(int) - other.frames.astype(int)).max() > 0
    assert set(first.timings) == {"encode_prompt", "encode_image", "denoise", "decode"}
    assert first.peak_vram_bytes == 0


def test_on_step_reports_every_step_in_order(generator: I2VGenXLGenerator, image: Image.Image) -> None:
    calls: list[tuple[int, int, float]] = []
    generator.generate(
        make_request(image, steps=3), on_step=lambda step, total, secs: calls.append((step, total, secs))
    )
    assert [(step, total) for step, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert all(seconds > 0 for _, _, seconds in calls)


def test_should_interrupt_raises_job_interrupted(generator: I2VGenXLGenerator, image: Image.Image) -> None:
    steps: list[int] = []
    with pytest.raises(JobInterrupted):
        generator.generate(
            make_request(image, steps=3),
            on_step=lambda step, total, secs: steps.append(step),
            should_interrupt=lambda: len(steps) >= 1,
        )
    assert steps == [1]


def test_non_square_output_shape_and_dtype(generator: I2VGenXLGenerator, image: Image.Image) -> None:
    result = generator.generate(make_request(image, width=96, height=64, num_frames=8, guidance_scale=1.0))
    assert result.frames.shape == (8, 64, 96, 3)
    assert result.frames.dtype == np.uint8


def test_out_of_memory_in_the_unet_is_transient(
    generator: I2VGenXLGenerator, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(generator.components.unet, "forward", out_of_memory)
    with pytest.raises(TransientJobError, match="out of GPU memory"):
        generator.generate(make_request(image))


def _weights(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in directory.rglob("*.safetensors")}


def test_materialize_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = materialize_tiny_model(tmp_path / "a")
    second = materialize_tiny_model(tmp_path / "b")
    assert len(_weights(first)) == 4
    assert _weights(first) == _weights(second)
    marker = first / MARKER_NAME
    stamp = marker.stat().st_mtime_ns
    assert materialize_tiny_model(tmp_path / "a") == first
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [entry.name for entry in first.parent.iterdir()] == [first.name]  # no temporary leftovers


def test_materialize_rebuilds_a_damaged_model(tmp_path: Path) -> None:
    model = materialize_tiny_model(tmp_path)
    weights = _weights(model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert materialize_tiny_model(tmp_path) == model
    assert _weights(model) == weights


def test_missing_model_directory_is_fatal_and_says_where(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FatalError, match=r"nowhere does not exist \(model.source\)"):
        load_generator(ModelConfig(source=str(missing), device="cpu"))


def test_incomplete_model_directory_names_the_missing_files(tmp_path: Path) -> None:
    model = materialize_tiny_model(tmp_path / "cache")
    (model / "vae" / "config.json").unlink()
    with pytest.raises(FatalError, match=r"incomplete: missing vae/config\.json"):
        load_generator(ModelConfig(source=str(model), device="cpu"))


def test_unwritable_cache_dir_is_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FatalError, match=r"model\.cache_dir"):
        load_generator(ModelConfig(device="cpu", cache_dir=blocker / "cache"))


def test_unreadable_weights_are_fatal(tmp_path: Path) -> None:
    model = materialize_tiny_model(tmp_path / "cache")
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FatalError, match=r"cannot load unet \(I2VGenXLUNet\)"):
        load_generator(ModelConfig(source=str(model), device="cpu"))


def test_device_and_dtype_resolution() -> None:
    device, dtype = resolve_device_dtype(ModelConfig(device="cpu", dtype="auto"))
    assert (device.type, dtype) == ("cpu", torch.float32)
    assert resolve_device_dtype(ModelConfig(device="cpu", dtype="bfloat16"))[1] == torch.bfloat16
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        resolve_device_dtype(ModelConfig(device="cpu", dtype="float16"))
    if not torch.cuda.is_available():
        assert resolve_device_dtype(ModelConfig())[0].type == "cpu"
        with pytest.raises(DeviceUnavailable, match=r"model\.device"):
            resolve_device_dtype(ModelConfig(device="cuda"))


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, daemon.generate, daemon.generate.base; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_request_fields_are_all_used(generator: I2VGenXLGenerator, image: Image.Image) -> None:
    """Prompt, negative prompt, target_fps and image each change the output (guards against a dropped input)."""
    base = make_request(image)
    reference = generator.render(base).frames
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for change in ({"prompt": "a dog"}, {"negative_prompt": ""}, {"target_fps": 8}, {"image": flipped}):
        changed = generator.render(dataclasses.replace(base, **change)).frames
        assert float(np.abs(changed - reference).max()) > 1e-6, change

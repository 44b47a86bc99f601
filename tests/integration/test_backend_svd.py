"""Stable Video Diffusion specifics: the published SVD-xt layout, its model options reaching the pipeline, and the
documented decision that its prompt steers nothing (SVD has no text conditioning)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.config import ModelConfig
from daemon.errors import ConfigError, FatalError
from daemon.generate import load_generator
from daemon.generate.base import GenerationRequest
from daemon.generate.diffusers_common import read_model_index
from daemon.generate.svd import PIPELINE_CLASSES, SVDGenerator
from daemon.generate.tiny_backends import save_tiny_pipeline
from daemon.modelrules import rules_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PUBLISHED = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "svd-xt"
needs_published = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="reference configs in ../shared/models/svd-xt")


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> SVDGenerator:
    directory = save_tiny_pipeline("svd", tmp_path_factory.mktemp("svd") / "model")
    loaded = load_generator(ModelConfig(backend="svd", source=str(directory), device="cpu", decode_chunk_size=3))
    assert isinstance(loaded, SVDGenerator)
    return loaded


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "image": Image.new("RGB", (48, 32), (30, 140, 220)),
        "prompt": "a boat",
        "negative_prompt": "",
        "width": 32,
        "height": 32,
        "num_frames": 8,
        "target_fps": 7,
        "steps": 2,
        "guidance_scale": 2.5,
        "seed": 5,
    }
    return GenerationRequest(**(values | overrides))


def test_options_and_conditioning_reach_the_pipeline(generator: SVDGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    pipe = generator.pipeline
    real_call = type(pipe).__call__

    def recording_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    generator.generate(request(options={"motion_bucket_id": 30, "noise_aug_strength": 0.1}))
    generator.generate(request())
    asked, defaults = calls
    assert (asked["motion_bucket_id"], asked["noise_aug_strength"], asked["fps"]) == (30, 0.1, 7)
    assert (asked["min_guidance_scale"], asked["max_guidance_scale"]) == (1.0, 2.5)
    assert asked["decode_chunk_size"] == 3  # model.decode_chunk_size when the job does not say
    assert (defaults["motion_bucket_id"], defaults["noise_aug_strength"]) == (127, 0.02)
    assert "prompt" not in asked


def test_motion_bucket_changes_the_video_and_the_prompt_does_not(generator: SVDGenerator) -> None:
    base = generator.generate(request()).frames
    assert np.array_equal(base, generator.generate(request(prompt="a storm at night")).frames)
    assert not np.array_equal(base, generator.generate(request(options={"motion_bucket_id": 255})).frames)


@needs_published
def test_the_published_svd_xt_layout_is_accepted_and_matches_the_rules(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    index = read_model_index(PUBLISHED, "svd", PIPELINE_CLASSES)
    assert {"unet", "vae", "image_encoder", "scheduler", "feature_extractor"} <= set(index)
    with torch.device("meta"):  # published sizes without allocating 1.5 B parameters
        unet = UNetSpatioTemporalConditionModel.from_config(
            UNetSpatioTemporalConditionModel.load_config(PUBLISHED / "unet")
        )
        vae = AutoencoderKLTemporalDecoder.from_config(AutoencoderKLTemporalDecoder.load_config(PUBLISHED / "vae"))
    rules = rules_for("svd")
    assert unet.config.num_frames == rules.defaults.num_frames
    assert 2 ** (len(vae.config.block_out_channels) - 1) == rules.size_multiple
    # A config-only copy (no weights) fails at load with a message naming the pipeline and the directory.
    copy = shutil.copytree(PUBLISHED, tmp_path / "svd-xt")
    with pytest.raises(FatalError, match=r"cannot load StableVideoDiffusionPipeline from .*svd-xt"):
        load_generator(ModelConfig(backend="svd", source=str(copy), device="cpu"))


def test_a_missing_component_is_named(tmp_path: Path, generator: SVDGenerator) -> None:
    directory = save_tiny_pipeline("svd", tmp_path / "model")
    shutil.rmtree(directory / "vae")
    with pytest.raises(FatalError, match="incomplete: missing vae"):
        load_generator(ModelConfig(backend="svd", source=str(directory), device="cpu"))


def test_the_embedded_tiny_model_is_refused_for_other_backends() -> None:
    with pytest.raises(ConfigError, match="'embedded-tiny' is an I2VGen-XL model; backend 'svd' needs a local"):
        load_generator(ModelConfig(backend="svd", device="cpu"))

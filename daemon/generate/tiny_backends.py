"""Tiny random-weight pipelines for the svd, ltx-video and wan-i2v backends, saved as ordinary diffusers directories.

Why: weights cannot be downloaded where the daemon is tested, yet each backend's real loading path
(`from_pretrained` on a local directory) and its stock pipeline must run end to end on a CPU in seconds. The
component configs start from diffusers' own fast-test configs for each pipeline, adjusted to keep the published
models' shape relations that the daemon's rules depend on (LTX-Video: 32x spatial and 8x temporal compression;
Wan: 8x spatial, 4x temporal, 2x2 patches; SVD: four VAE levels). Tokenizers that would need a download (T5, UMT5)
are replaced by a tiny word-level tokenizer built here. Used by the tests and by `bench/gpu_backends.py --smoke`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from daemon.config import BackendName

TEXT_DIM = 32
WORDS = [
    "a",
    "an",
    "the",
    "cat",
    "dog",
    "sea",
    "sky",
    "moves",
    "slowly",
    "walks",
    "runs",
    "light",
    "wind",
    "waves",
    "over",
    "in",
    "on",
    "and",
    "with",
]


def _library(name: str) -> Any:
    """diffusers/transformers classes, typed loosely (their constructors are untyped for mypy --strict)."""
    return importlib.import_module(name)


def word_tokenizer() -> Any:
    """A word-level tokenizer with T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    PreTrainedTokenizerFast = _library("transformers").PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: index + 3 for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapper: Any = PreTrainedTokenizerFast
    return wrapper(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _t5_config(umt5: bool = False) -> Any:
    T5Config = _library("transformers").T5Config
    UMT5Config = _library("transformers").UMT5Config

    values: dict[str, Any] = {
        "vocab_size": 64,
        "d_model": TEXT_DIM,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 1,
        "num_heads": 4,
    }
    return UMT5Config(**values) if umt5 else T5Config(**values)


def _svd() -> Any:
    AutoencoderKLTemporalDecoder = _library("diffusers").AutoencoderKLTemporalDecoder
    EulerDiscreteScheduler = _library("diffusers").EulerDiscreteScheduler
    StableVideoDiffusionPipeline = _library("diffusers").StableVideoDiffusionPipeline
    UNetSpatioTemporalConditionModel = _library("diffusers").UNetSpatioTemporalConditionModel
    CLIPImageProcessor = _library("transformers").CLIPImageProcessor
    CLIPVisionConfig = _library("transformers").CLIPVisionConfig
    CLIPVisionModelWithProjection = _library("transformers").CLIPVisionModelWithProjection

    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    # The published scheduler (svd-xt/scheduler/scheduler_config.json).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,  # the pipeline resizes the image to 224 before the feature extractor
            intermediate_size=37,
            patch_size=32,
        )
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )


def _ltx() -> Any:
    AutoencoderKLLTXVideo = _library("diffusers").AutoencoderKLLTXVideo
    FlowMatchEulerDiscreteScheduler = _library("diffusers").FlowMatchEulerDiscreteScheduler
    LTXImageToVideoPipeline = _library("diffusers").LTXImageToVideoPipeline
    LTXVideoTransformer3DModel = _library("diffusers").LTXVideoTransformer3DModel
    T5EncoderModel = _library("transformers").T5EncoderModel

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    # patch_size 4 and three spatio-temporal scalings: 32x spatial and 8x temporal compression, as published.
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=T5EncoderModel(_t5_config()),
        tokenizer=word_tokenizer(),
        transformer=transformer,
    )


def _wan() -> Any:
    AutoencoderKLWan = _library("diffusers").AutoencoderKLWan
    FlowMatchEulerDiscreteScheduler = _library("diffusers").FlowMatchEulerDiscreteScheduler
    WanImageToVideoPipeline = _library("diffusers").WanImageToVideoPipeline
    Transformer = _library("diffusers").WanTransformer3DModel
    CLIPImageProcessor = _library("transformers").CLIPImageProcessor
    CLIPVisionConfig = _library("transformers").CLIPVisionConfig
    CLIPVisionModel = _library("transformers").CLIPVisionModel
    UMT5EncoderModel = _library("transformers").UMT5EncoderModel

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = Transformer(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=4,
    )
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            intermediate_size=16, patch_size=4,
        )
    )  # fmt: skip
    return WanImageToVideoPipeline(
        tokenizer=word_tokenizer(),
        text_encoder=UMT5EncoderModel(_t5_config(umt5=True)),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=encoder,
        transformer=transformer,
    )


BUILDERS: dict[BackendName, Callable[[], Any]] = {"svd": _svd, "ltx-video": _ltx, "wan-i2v": _wan}


def build_tiny_pipeline(backend: BackendName, seed: int = 0) -> Any:
    """A tiny pipeline with deterministic random weights (fixed seed before building)."""
    torch.manual_seed(seed)
    return BUILDERS[backend]()


def save_tiny_pipeline(backend: BackendName, directory: Path, seed: int = 0) -> Path:
    """Build and `save_pretrained` a tiny pipeline into `directory` (a diffusers directory the daemon loads)."""
    build_tiny_pipeline(backend, seed).save_pretrained(directory)
    return directory

"""Each stock-pipeline backend (svd, ltx-video, wan-i2v) at its published size with random weights: our generator
against the stock diffusers pipeline call, same process, same components, same arguments and seed.

Per backend and mode (`stock`, `ours`): seconds per video (median of `--repeats` after a 2-step warm-up) and peak
VRAM, plus the max abs difference between the two videos (uint8; ours adds only the step callback and the
out-of-memory handling, so it should be 0). Components are built from the published configs (SVD-xt, LTX-Video
0.9 2B, Wan2.1-I2V-14B-480P with T5/UMT5-XXL and CLIP ViT-H/14), initialised randomly on the device: timings and
memory do not depend on the weights' values. Writes JSON to `--out`.

    python bench/gpu_backends.py --out bench/results/gpu_backends-DATE.json [--backends svd ltx-video]
        [--steps N] [--frames N] [--repeats 1]           # GPU; wan-i2v (14B) only when asked for
    python bench/gpu_backends.py --out ... --backends wan-i2v --steps 10   # 14B: fewer steps fit a 10-minute slot
    python bench/gpu_backends.py --smoke --out /tmp/smoke.json   # tiny pipelines, CPU, seconds

With `--points`, each backend is also run at its default and its `preview` preset size for `--point-steps` steps,
recording the denoising peak and the decoding peak separately (peak statistics reset between the two stages), the
resident weights and the stage times: the data of the backend's VRAM/time model (`daemon/generate/vram_stock.py`).
`--fit FILE` fits the model from those points and writes it (the shipped file is `daemon/generate/vram_stock.json`;
backends not measured in this run keep their entries from `--fit-base`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from daemon.config import BackendName
from daemon.generate import vram_stock
from daemon.generate.base import GenerationRequest, ModelInfo
from daemon.generate.diffusers_common import DiffusersGenerator
from daemon.generate.i2vgenxl import library_versions
from daemon.generate.i2vgenxl_loop import to_uint8
from daemon.generate.ltx import LTXVideoGenerator
from daemon.generate.svd import SVDGenerator
from daemon.generate.tiny_backends import build_tiny_pipeline, word_tokenizer
from daemon.generate.wan import WanI2VGenerator
from daemon.modelrules import rules_for

GENERATORS: dict[BackendName, type[DiffusersGenerator]] = {
    "svd": SVDGenerator,
    "ltx-video": LTXVideoGenerator,
    "wan-i2v": WanI2VGenerator,
}
PUBLISHED_NAMES = {
    "svd": "stabilityai/stable-video-diffusion-img2vid-xt",
    "ltx-video": "Lightricks/LTX-Video 0.9 (2B)",
    "wan-i2v": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
}
Place = Callable[[], AbstractContextManager[None]]
"""Where (device, dtype) the big models are built."""
CLIP_VIT_H = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu",
}  # fmt: skip
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}  # fmt: skip


def _published_svd(place: Place) -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with place():
        unet = UNetSpatioTemporalConditionModel()  # the constructor's defaults are SVD-xt's UNet (svd-xt/unet)
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=2
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True,
    )  # fmt: skip
    return StableVideoDiffusionPipeline(
        unet=unet, vae=vae, image_encoder=image_encoder, scheduler=scheduler, feature_extractor=CLIPImageProcessor()
    )


def _published_ltx(place: Place) -> Any:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    with place():
        transformer = LTXVideoTransformer3DModel()  # defaults: the 2B transformer
        vae = AutoencoderKLLTXVideo()  # defaults: the 0.9.0 VAE (32x spatial, 8x temporal)
        text_encoder = T5EncoderModel(T5Config(**T5_XXL))
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05, shift_terminal=0.1,
        use_dynamic_shifting=True,
    )  # fmt: skip
    return LTXImageToVideoPipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=word_tokenizer(), scheduler=scheduler
    )


def _published_wan(place: Place) -> Any:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with place():
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
        )  # fmt: skip
        vae = AutoencoderKLWan()  # defaults: the Wan 2.1 VAE
        text_encoder = UMT5EncoderModel(UMT5Config(**(T5_XXL | {"vocab_size": 256384})))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
    return WanImageToVideoPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=word_tokenizer(),
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )


PUBLISHED: dict[BackendName, Callable[[Place], Any]] = {
    "svd": _published_svd,
    "ltx-video": _published_ltx,
    "wan-i2v": _published_wan,
}


@contextmanager
def on_device(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Models are built directly on the device in the target dtype: Wan's 14B transformer plus UMT5-XXL in float32
    would not fit an 80 GB GPU, and initialising them on the CPU takes minutes. Schedulers stay outside."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default_dtype)


def keep_float32_modules(pipe: Any) -> None:
    """What `from_pretrained(dtype=...)` does and `.to(dtype)` does not: keep the modules a model lists in
    `_keep_in_fp32_modules` (Wan's norms, rope, time embedder) in float32, so the timing matches the daemon's."""
    for component in pipe.components.values():
        keep = set(getattr(component, "_keep_in_fp32_modules", None) or ())
        if keep and isinstance(component, torch.nn.Module):
            for name, module in component.named_modules():
                if keep & set(name.split(".")):
                    module.to(torch.float32)


def build(backend: BackendName, smoke: bool, device: torch.device, dtype: torch.dtype) -> DiffusersGenerator:
    """Random weights, built directly on the device (a 14B model would take minutes to initialise on the CPU)."""
    started = time.perf_counter()
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(backend) if smoke else PUBLISHED[backend](lambda: on_device(device, dtype))
    pipe.to(device, dtype)
    keep_float32_modules(pipe)
    if backend == "wan-i2v":
        pipe.vae.to(torch.float32)  # as the daemon loads it
    pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(
        model_id=f"random weights, {'tiny' if smoke else PUBLISHED_NAMES[backend]} config",
        revision=None,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started,
        library_versions=library_versions(),
    )
    if backend == "svd":
        return SVDGenerator(pipe, info, device=device, decode_chunk_size=8)
    return GENERATORS[backend](pipe, info, device=device)


def make_request(
    backend: BackendName, args: argparse.Namespace, preset: str | None = None, steps: int | None = None
) -> GenerationRequest:
    defaults = rules_for(backend).defaults
    chosen = rules_for(backend).presets[preset] if preset else defaults  # type: ignore[index]
    width, height = (32, 32) if args.smoke else (chosen.width or 512, chosen.height or 512)
    frames = (None if preset else args.frames) or (9 if args.smoke else chosen.num_frames or 16)
    if args.smoke and preset:  # a second, larger tiny point
        width, height, frames = 64, 64, rules_for(backend).frames.nearest(13)
    options = {key: value for key in ("motion_bucket_id", "noise_aug_strength") if (value := getattr(defaults, key))}
    return GenerationRequest(
        image=Image.new("RGB", (width, height), (180, 120, 60)),
        prompt="waves rolling onto the beach at sunset",
        negative_prompt="blurry",
        width=width,
        height=height,
        num_frames=frames,
        target_fps=defaults.target_fps or 8,
        steps=steps or args.steps or (2 if args.smoke else defaults.steps or 50),
        guidance_scale=defaults.guidance_scale or 5.0,
        seed=42,
        options=options,
    )


def measure(run: Callable[[], np.ndarray], device: torch.device, repeats: int) -> tuple[float, int, np.ndarray]:
    """Median seconds per video, peak allocated bytes, last frames."""
    seconds, frames, peak = [], np.empty(0), 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        frames = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = max(peak, int(torch.cuda.max_memory_allocated(device)))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), peak, frames


def measure_point(generator: DiffusersGenerator, request: GenerationRequest, device: torch.device) -> dict[str, Any]:
    """One video with the peaks of denoising and decoding taken apart: `generate` resets the peak statistics at its
    start; the step callback of the last denoising step reads them (the denoising peak) and resets them again, so
    the peak after the call is the decoding peak (whether the backend or the pipeline decodes)."""
    marks: dict[str, int] = {}

    def on_step(done: int, total: int, seconds: float) -> None:
        if done == total and device.type == "cuda":
            torch.cuda.synchronize(device)
            marks["denoise_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    weights = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0
    result = generator.generate(request, on_step=on_step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        marks["decode_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    chunk = int(request.options.get("decode_chunk_size", getattr(generator, "_decode_chunk_size", request.num_frames)))
    point = vram_stock.Point(
        width=request.width,
        height=request.height,
        num_frames=request.num_frames,
        steps=request.steps,
        decode_chunk=chunk,
        weights_bytes=weights,
        denoise_peak_bytes=marks.get("denoise_peak_bytes", 0),
        decode_peak_bytes=marks.get("decode_peak_bytes", 0),
        denoise_seconds=round(result.timings["denoise"], 3),
        decode_seconds=round(result.timings["decode"], 3),
    )
    return dataclasses.asdict(point)


def bench_backend(backend: BackendName, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    dtype = torch.float32 if device.type == "cpu" else (torch.float16 if backend == "svd" else torch.bfloat16)
    generator = build(backend, args.smoke, device, dtype)
    request = make_request(backend, args)
    warmup = GenerationRequest(**{**request.__dict__, "steps": 2})
    generator.generate(warmup)  # kernels, autotuning and allocator warm-up for both modes

    def stock() -> np.ndarray:
        seed = torch.Generator("cpu").manual_seed(request.seed)
        with torch.inference_mode():
            output = generator.pipeline(**generator.call_kwargs(request), generator=seed, output_type="np")
        return to_uint8(np.clip(np.asarray(output.frames[0], dtype=np.float32), 0.0, 1.0))

    def ours() -> np.ndarray:
        return generator.generate(request).frames

    stock_s, stock_peak, stock_frames = measure(stock, device, args.repeats)
    ours_s, ours_peak, ours_frames = measure(ours, device, args.repeats)
    diff = int(np.abs(stock_frames.astype(np.int16) - ours_frames.astype(np.int16)).max())
    common = {
        "backend": backend,
        "model": generator.info.model_id,
        "size": f"{request.width}x{request.height}",
        "frames": request.num_frames,
        "steps": request.steps,
        "batch": 1,
        "dtype": generator.info.dtype,
        "max_abs_diff_uint8": diff,
    }
    rows = [
        common | {"mode": "stock", "s_per_video": round(stock_s, 3), "peak_vram_bytes": stock_peak},
        common | {"mode": "ours", "s_per_video": round(ours_s, 3), "peak_vram_bytes": ours_peak},
    ]
    if args.points:
        for preset in (None, "preview"):
            point = measure_point(generator, make_request(backend, args, preset, args.point_steps), device)
            rows.append({"backend": backend, "mode": "point", "dtype": generator.info.dtype} | point)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_fit(rows: list[dict[str, Any]], args: argparse.Namespace, gpu: str | None) -> None:
    """Fit each measured backend's model from its points; keep the others' entries from `--fit-base`."""
    models = dict(vram_stock.load_models(args.fit_base)) if args.fit_base.exists() else {}
    fields = set(vram_stock.Point.__dataclass_fields__)
    for backend in {row["backend"] for row in rows if row["mode"] == "point"}:
        points = [
            vram_stock.Point(**{k: v for k, v in row.items() if k in fields})
            for row in rows
            if row["mode"] == "point" and row["backend"] == backend
        ]
        dtype = next(row["dtype"] for row in rows if row["backend"] == backend)
        when = datetime.now(UTC).date().isoformat()
        source = f"bench/gpu_backends.py --points on {gpu or 'cpu'}, {dtype}, torch {torch.__version__}, {when}"
        models[backend] = vram_stock.fit(backend, points, source)
    args.fit.write_text(json.dumps(vram_stock.to_json(models), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--smoke", action="store_true", help="tiny pipelines at 32x32x9, 2 steps (CPU is fine)")
    parser.add_argument("--backends", nargs="+", choices=list(GENERATORS), default=["svd", "ltx-video"])
    parser.add_argument("--steps", type=int, help="override the published default steps (e.g. to fit a time limit)")
    parser.add_argument("--frames", type=int, help="override the published default frame count")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--points", action="store_true", help="also measure the VRAM/time model's points")
    parser.add_argument("--point-steps", type=int, default=3, help="denoising steps of each point")
    parser.add_argument("--fit", type=Path, help="write the fitted per-backend model here (needs --points)")
    parser.add_argument("--fit-base", type=Path, default=vram_stock.MODEL_PATH, help="entries kept for the others")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for backend in args.backends:
        rows += bench_backend(backend, args, device)
        print(json.dumps(rows[-2:]), flush=True)
        gc.collect()  # the backend's pipeline went out of scope: give its memory back before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "benchmark": "gpu_backends",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "smoke": args.smoke,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.fit is not None:
        write_fit(rows, args, result["gpu"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""I2VGen-XL at full size on the GPU: stock diffusers vs i2vd (exact and fast modes), same process, same weights.

No weights can be downloaded, so the full-size model is built from the published configs (`--configs`, default
`../shared/models/i2vgen-xl`) with seeded random weights; the tokenizer is the embedded tiny model's (same CLIP
BPE format; token ids stay inside the real vocabulary). Every record follows DESIGN.md §6 and goes to
`--out` as JSON lines, written as soon as it is measured, plus a summary table at the end.

    python bench/gpu_bench.py --phases ref,stock,exact,fast,batch,tiers --compile reduce-overhead --out results.jsonl

Phases: `ref` (fp32 reference loop, stock attention: the PSNR reference), `stock`, `exact`, `fast`, `batch`,
`tiers` (768p, 1024p, 32 frames), `profile` (CUDA kernels of one step by kind, stock vs ours as configured),
`attn` (each attention shape of a step under each SDPA backend, and the short ones packed), `conv` (each
convolution of a step alone, cuDNN's heuristic or `--cudnn-benchmark`'s measured algorithm), `layout` (NCHW vs
channels-last weights), `vram` (peak per stage for the VRAM model), `creep` (allocated memory over many jobs),
`tuning` (each compiled layer alone under inductor's tuning options: `--tunings`, `--tuning-budget`), `sharing`
(the guided step against the doubled batch, alternating in one process), `changes` (whole compiled steps with
and without a model change: `--changes`), `roofline` (one compiled step's kernels
against the GPU's bandwidth and FLOP rate: `--roofline triton|extern`), `ready` (load + compile + first video: run
twice in fresh processes to see the cold and the warm compile cache).
`profile`, `attn`, `conv`, `tuning`, `sharing`, `changes`, `roofline` and `layout` look at one step of `--step-shape`
(default 512p:16).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from step_flops import stock_forward_tflop  # the sibling script; bench/ is on sys.path when run

from daemon.config import ModelConfig, resolve_compile_scope
from daemon.generate import gpu_speed
from daemon.generate import i2vgenxl_loop as loop
from daemon.generate import predict as pred
from daemon.generate.base import GenerationRequest, ModelInfo
from daemon.generate.i2vgenxl import I2VGenXLGenerator, freeze_heap, library_versions
from daemon.generate.reference import run_stock, stock_pipeline

REPO = Path(__file__).resolve().parent.parent
TIERS = {"256p": (256, 256), "512p": (512, 512), "768p": (768, 768), "1024p": (1024, 1024)}


def build_components(configs: Path, device: torch.device) -> loop.Components:
    """Full-size components with seeded random weights, built directly on the GPU in float32."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    def config(name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((configs / name / "config.json").read_text())
        return loaded

    models: dict[str, Any] = {}
    with device:
        for seed, (name, build) in enumerate(
            {
                "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
                "image_encoder": lambda: CLIPVisionModelWithProjection(
                    CLIPVisionConfig.from_dict(config("image_encoder"))
                ),
                "vae": lambda: AutoencoderKL.from_config(config("vae")),
                "unet": lambda: I2VGenXLUNet.from_config(config("unet")),
            }.items()
        ):
            torch.manual_seed(seed + 1)
            models[name] = build().float().eval()
    return loop.Components(
        **models,
        scheduler=DDIMScheduler.from_pretrained(configs / "scheduler"),
        tokenizer=CLIPTokenizer.from_pretrained(REPO / "daemon" / "generate" / "tiny" / "tokenizer"),
        feature_extractor=CLIPImageProcessor.from_pretrained(configs / "feature_extractor"),
    )


def make_generator(parts: loop.Components, dtype: torch.dtype, **kwargs: Any) -> I2VGenXLGenerator:
    info = ModelInfo("bench-random", None, "cuda", str(dtype), 0.0, library_versions())
    return I2VGenXLGenerator(parts, info, device=torch.device("cuda"), decode_chunk_size=8, clip_skip=None, **kwargs)


@contextlib.contextmanager
def eager_layers(*models: Any) -> Iterator[None]:
    """The models' layers run their plain forward meanwhile: ours shares the UNet and VAE with the stock pipeline
    and installs compiled calls on their layers, through which the stock pipeline (and the flop counter) would
    otherwise run once ours exists (measured: stock at 768p 16f 20 steps 7.29 s that way, 10.30 s without).
    Every layer's call is put back as it was afterwards, uncompiled ones too (a phase may compile layers
    meanwhile)."""
    calls = [(m, m._compiled_call_impl) for model in models for m in model.modules()]
    for module, _ in calls:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in calls:
            module._compiled_call_impl = call


@contextlib.contextmanager
def plain_unet(unet: Any) -> Iterator[None]:
    """The UNet as diffusers has it, whatever a generator of an earlier phase installed: plain `Linear`s,
    unfused projections, uncompiled layers (what the stock pipeline runs, and what the `tuning` and `changes`
    phases compare from); put back as it was afterwards."""
    classes = [(module, type(module)) for module in unet.modules()]
    processors = [getattr(module, "processor", None) for module in unet.modules()]
    flags = [(p, p.fuse_projections) for p in processors if isinstance(p, gpu_speed.AttentionProcessor)]
    gpu_speed.split_linear_bias(unet, undo=True)
    _set_fused_projections(unet, False)
    try:
        with eager_layers(unet):
            yield
    finally:
        for module, kind in classes:
            module.__class__ = kind
        for processor, flag in flags:
            processor.fuse_projections = flag


@contextlib.contextmanager
def stock_attention(unet: Any, vae: Any) -> Iterator[None]:
    """The stock pipeline runs with diffusers' own processors on the plain UNet (`plain_unet`) and an uncompiled
    VAE, whatever ours installed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        with plain_unet(unet), eager_layers(vae):
            yield
    finally:
        unet.set_attn_processor(saved)


def request(tier: str, frames: int, steps: int, seed: int = 42, guidance: float = 9.0) -> GenerationRequest:
    width, height = TIERS[tier]
    return GenerationRequest(
        image=Image.open(REPO / "examples" / "sunset.png").convert("RGB"),
        prompt="waves at sunset, cinematic",
        negative_prompt="blurry, low quality",
        width=width,
        height=height,
        num_frames=frames,
        target_fps=16,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, Any, int]:
    """Median seconds over `repeats` runs (after the caller's warm-up) and the peak allocated bytes."""
    seconds, result = [], None
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result, int(torch.cuda.max_memory_allocated())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def step_tflop(parts: loop.Components, width: int, height: int, frames: int, batch: int) -> float:
    """FLOPs of one guided UNet step (batch x 2 rows) of the stock forward, counted by torch's flop counter on the
    plain layers and diffusers' attention (`step_flops.stock_forward_tflop`)."""
    with stock_attention(parts.unet, parts.vae):
        return stock_forward_tflop(parts.unet, width, height, frames, batch)


class Recorder:
    def __init__(self, out: Path, gpu: str) -> None:
        self.out, self.gpu, self.rows = out, gpu, []  # type: ignore[var-annotated]
        self.flops: dict[tuple[int, int, int, int], float] = {}

    def add(self, parts: loop.Components, mode: str, req: GenerationRequest, batch: int, seconds: float, **extra: Any):
        key = (req.width, req.height, req.num_frames, batch)
        if key not in self.flops:
            self.flops[key] = step_tflop(parts, *key)
        tier = next(name for name, size in TIERS.items() if size == (req.width, req.height))
        row = {
            "mode": mode,
            "tier": tier,
            "frames": req.num_frames,
            "steps": req.steps,
            "batch": batch,
            "s_per_video": round(seconds / batch, 3),
            "tflops": round(self.flops[key] * req.steps / seconds, 1),
            "gpu": self.gpu,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            **extra,
        }
        self.rows.append(row)
        self.emit(row)

    def write(self, row: dict[str, Any]) -> None:
        """Append one record to `--out` (JSON lines), as soon as it is measured."""
        with self.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def emit(self, row: dict[str, Any]) -> None:
        """`write` it and print it."""
        self.write(row)
        print(json.dumps(row), flush=True)


class Bench:
    """Shared state of one run: the components, the generators per mode, and the frames to compare against."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.parts = build_components(args.configs, torch.device("cuda"))
        self.rec = Recorder(args.out, torch.cuda.get_device_name())
        self.ref: dict[tuple[str, int], np.ndarray] = {}
        self.exact: dict[tuple[str, int], np.ndarray] = {}
        self.ours: I2VGenXLGenerator | None = None

    def to_half(self) -> None:
        for model in (self.parts.unet, self.parts.vae, self.parts.text_encoder, self.parts.image_encoder):
            model.to(torch.float16)

    def generator(self, warm_up: GenerationRequest | list[GenerationRequest] | None = None) -> I2VGenXLGenerator:
        """Ours, compiled (if asked) at first use, and warmed up on `warm_up` (a list: that batch; at first use
        one 512p x 16 frames video unless given): every new shape or batch size compiles its own graphs."""
        fresh = self.ours is None
        if self.ours is None:
            layers = self.args.cache_dir / "compile" / "bench-layers"
            self.ours = make_generator(
                self.parts,
                torch.float16,
                compile_mode=self.args.compile,
                compile_scope=self.args.compile_scope,
                compile_vae=self.args.compile_vae,
                channels_last=self.args.channels_last,
                split_linear_bias=self.args.split_linear_bias,
                precompiled_dir=layers if self.args.precompile_layers else None,
            )
            warm_up = warm_up or request("512p", 16, 2)
        if isinstance(warm_up, list):
            self.ours.render_batch(warm_up)
        elif warm_up is not None:
            self.ours.render(warm_up)
        if fresh and self.ours.step_fn.active:
            freeze_heap()  # as `load_generator` does after its warm-up
        return self.ours


def phase_ref(b: Bench, tier: str = "512p", frames: int = 16) -> None:
    """fp32, TF32 off, diffusers' attention: the reference the exact mode's PSNR is measured against."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    generator = make_generator(b.parts, torch.float32)
    req = request(tier, frames, b.args.steps)
    with stock_attention(b.parts.unet, b.parts.vae):
        seconds, video, peak = timed(lambda: generator.render(req), 1)
    b.ref[(tier, frames)] = video.frames
    if b.args.save_ref is not None:
        np.save(b.args.save_ref, video.frames)
    torch.backends.cudnn.allow_tf32 = True
    b.rec.add(b.parts, "reference_fp32", req, 1, seconds, peak_vram_bytes=peak)


def run_stock_case(b: Bench, tier: str, frames: int, repeats: int) -> np.ndarray:
    pipeline = stock_pipeline(make_generator(b.parts, torch.float16))
    req = request(tier, frames, b.args.steps)
    with stock_attention(b.parts.unet, b.parts.vae):
        # decode_chunk_size=1: the stock pipeline's default (its peak is the denoise stage's).
        run_stock(pipeline, request(tier, frames, 2), clip_skip=None, decode_chunk_size=1)
        seconds, frames_out, peak = timed(
            lambda: run_stock(pipeline, req, clip_skip=None, decode_chunk_size=1), repeats
        )
    ref = b.ref.get((tier, frames))
    b.rec.add(b.parts, "stock", req, 1, seconds, peak_vram_bytes=peak, psnr_db=_psnr_or_none(frames_out, ref))
    return frames_out  # type: ignore[no-any-return]


def _psnr_or_none(frames: np.ndarray, ref: np.ndarray | None) -> float | None:
    return None if ref is None else round(psnr(frames, ref), 2)


def run_exact_case(b: Bench, tier: str, frames: int, repeats: int, stock: np.ndarray | None = None) -> None:
    generator = b.generator(request(tier, frames, 2))
    req = request(tier, frames, b.args.steps)
    seconds, video, peak = timed(lambda: generator.render(req), repeats)
    b.exact[(tier, frames)] = video.frames
    extra = {
        "vs_stock_psnr_db": _psnr_or_none(video.frames, stock),
        "timings": {stage: round(value, 3) for stage, value in video.timings.items()},
        "compile_scope": b.args.compile_scope,
        "compile_vae": b.args.compile_vae,
        "precompile_layers": b.args.precompile_layers,
        "compile": b.args.compile,
        "channels_last": b.args.channels_last,
        "split_linear_bias": b.args.split_linear_bias,
    }
    b.rec.add(
        b.parts,
        "exact",
        req,
        1,
        seconds,
        peak_vram_bytes=peak,
        psnr_db=_psnr_or_none(video.frames, b.ref.get((tier, frames))),
        **extra,
    )


def phase_fast(b: Bench) -> None:
    generator = b.generator()
    exact = b.exact.get(("512p", 16))
    for spec in b.args.fast_variants.split(";"):
        interval, skip, steps = spec.split(",")
        generator.fast_options = pred.FastOptions(int(interval), float(skip))
        req = request("512p", 16, int(steps))
        generator.render_batch([req], mode="fast")
        seconds, videos, peak = timed(lambda r=req: generator.render_batch([r], mode="fast"), 1)
        b.rec.add(
            b.parts,
            "fast",
            req,
            1,
            seconds,
            peak_vram_bytes=peak,
            psnr_db=_psnr_or_none(videos[0].frames, exact),
            fast=spec,
            timings={stage: round(value, 3) for stage, value in videos[0].timings.items()},
        )


def phase_batch(b: Bench) -> None:
    """Batches of `--batch-sizes` exact 512p x 16 videos, each with its own seed and guidance; with
    `--batch-compare` the second row against the same request alone (which compiles the single-video graphs too,
    where the compile of a batch-only run covers its batch size only)."""
    for size in map(int, b.args.batch_sizes.split(",")):
        reqs = [request("512p", 16, b.args.steps, seed=42 + i, guidance=9.0 - i) for i in range(size)]
        warm = [request("512p", 16, 2, seed=i) for i in range(size)]
        generator = b.generator(warm)
        seconds, videos, peak = timed(lambda r=reqs, g=generator: g.render_batch(r), 1)
        extra: dict[str, Any] = {"timings": {k: round(v, 3) for k, v in videos[0].timings.items()}}
        if b.args.batch_compare:
            single = generator.render(reqs[1]).frames
            extra["row1_vs_single_psnr_db"] = round(psnr(videos[1].frames, single), 2)
        extra["channels_last"] = b.args.channels_last
        b.rec.add(b.parts, "exact", reqs[0], size, seconds, peak_vram_bytes=peak, **extra)


def phase_tiers(b: Bench) -> None:
    """Stock vs ours at the other tiers and 32 frames (`--tier-steps` steps; ours eager unless --compile)."""
    b.args.steps = b.args.tier_steps
    for item in b.args.tier_list.split(","):
        tier, frames = item.split(":")[0], int(item.split(":")[1])
        stock = run_stock_case(b, tier, frames, 1)
        run_exact_case(b, tier, frames, 1, stock)


def phase_layout(b: Bench) -> None:
    """NCHW vs channels-last convolution weights: eager ms per guided UNet step at `--step-shape`, or with
    `--compile` an exact video of that shape and the kernel kinds of one step for each (ours compiled per layout)."""
    if b.args.compile != "off":
        for layout in ("nchw", "channels_last"):
            # A new generator per layout converts the weights and installs the layers again (their graphs are
            # specialised on the weights' layout).
            b.args.channels_last, b.ours = layout == "channels_last", None
            run_exact_case(b, *step_shape(b.args), 2)
            phase_profile(b, suffix=f"-{layout}")
        return
    cond, latents, t = step_inputs(make_generator(b.parts, torch.float16), *step_shape(b.args))
    for layout in ("nchw", "channels_last"):
        if layout == "channels_last":
            gpu_speed.to_channels_last(b.parts.unet)
        with torch.inference_mode():
            prep = pred.prepare(b.parts.unet, cond)
            seconds, _, peak = timed(lambda p=prep: guided_step(b.parts.unet, latents, t, p), 6)
        print(json.dumps({"layout": layout, "ms_per_step": round(seconds * 1000, 1), "peak": peak}), flush=True)
    for module in b.parts.unet.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            module.weight.data = module.weight.data.contiguous()


KERNEL_KINDS = (
    # Inductor names its kernels after the ops it fused ("triton_poi_fused_convolution_native_group_norm_silu"),
    # so its own kinds are matched first.
    ("triton reduction (norms)", ("triton_red", "triton_per")),
    ("triton pointwise", ("triton_poi", "triton_")),
    ("layout copy", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("convolution", ("fprop", "conv", "dgrad", "implicit_gemm")),
    ("gemm", ("nvjet", "gemm", "cutlass", "cublas", "sm90_xmma")),
    ("eager norm statistics", ("rowwisemoments", "groupnorm", "layer_norm", "welford")),
    ("eager elementwise", ("elementwise", "vectorized", "reduce_kernel", "copy", "cat", "index")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel by its name (first match in `KERNEL_KINDS`), for a per-step time breakdown."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def phase_profile(b: Bench, suffix: str = "") -> None:
    """CUDA kernels of one guided UNet step at `--step-shape`: stock (eager) vs ours (as configured: with `--compile`,
    the compiled layers), the top kernels and the time per kernel kind (`KERNEL_KINDS`)."""
    from torch.profiler import ProfilerActivity, profile

    parts = b.parts
    generator = b.generator() if b.args.compile != "off" else make_generator(parts, torch.float16)
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    with torch.inference_mode():
        prep = pred.prepare(parts.unet, cond)

    def stock_step() -> Any:
        with stock_attention(parts.unet, parts.vae):
            return parts.unet(
                latents,
                t,
                encoder_hidden_states=cond.prompt_embeds,
                fps=cond.fps,
                image_latents=cond.image_latents,
                image_embeddings=cond.image_embeddings,
                return_dict=False,
            )

    report, kinds = [], {}
    for name, function in (("stock", stock_step), ("ours", lambda: guided_step(parts.unet, latents, t, prep))):
        with torch.inference_mode():
            function()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                function()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_kind: dict[str, list[float]] = {}
        for event in events:
            entry = per_kind.setdefault(kernel_kind(event.key), [0.0, 0])
            entry[0] += event.self_device_time_total / 1000
            entry[1] += event.count
        kinds[name] = {kind: {"ms": round(ms, 2), "kernels": int(n)} for kind, (ms, n) in sorted(per_kind.items())}
        total = sum(ms for ms, _ in per_kind.values())
        lines = [f"== {name}: {total:.1f} ms of kernels per step"]
        lines += [f"  {kind:28s} {ms:8.2f} ms {int(n):6d} kernels" for kind, (ms, n) in sorted(per_kind.items())]
        lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
        report.append("\n".join(lines))
    text = "\n".join(report)
    shape = "" if b.args.step_shape == "512p:16" else "-" + b.args.step_shape.replace(":", "x")
    (b.args.out.parent / f"gpu_profile{shape}{suffix}.txt").write_text(text)
    case = {"compile": b.args.compile, "scope": b.args.compile_scope, "case": suffix, "shape": b.args.step_shape}
    row = {"profile": case | {"kinds": kinds}}
    b.rec.write(row)
    print(text[-9000:], flush=True)


def _median_ms(function: Callable[[], Any], repeats: int = 10) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        function()
        finish.record()
        finish.synchronize()
        times.append(begin.elapsed_time(finish))
    return statistics.median(times)


def phase_attn(b: Bench) -> None:
    """Every distinct attention call of one guided step at `--step-shape` (shapes and calls per step,
    recorded from an eager step) timed with each SDPA backend and with the plain softmax(q k^T) v (softmax in fp32)
    compiled by inductor, where its weights matrix fits."""
    calls: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    # Recorded where every attention layer of the UNet calls (the generator gives all of them
    # `gpu_speed.AttentionProcessor` on CUDA): short sequences never reach F.scaled_dot_product_attention.
    original = gpu_speed.attention

    def recording(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        shapes = (tuple(query.shape), tuple(key.shape))
        calls[shapes] = calls.get(shapes, 0) + 1
        return original(query, key, value)

    generator = make_generator(b.parts, torch.float16)
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    with torch.inference_mode():
        prepared = pred.prepare(b.parts.unet, cond)  # once per job (the image-latent encoder's 4-wide heads)
    gpu_speed.attention = recording
    try:
        with torch.inference_mode(), eager_layers(b.parts.unet):
            guided_step(b.parts.unet, latents, t, prepared)
    finally:
        gpu_speed.attention = original

    def plain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        weights = (query @ key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
        return weights.softmax(dim=-1).to(value.dtype) @ value

    compiled_plain = torch.compile(plain, fullgraph=True, dynamic=False)
    rows = []
    for (q_shape, k_shape), count in sorted(calls.items(), key=lambda item: -item[1]):
        with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=64):
            timings = _attention_timings(q_shape, k_shape, compiled_plain)
        row = {"attn": {"q": q_shape, "k": k_shape, "calls_per_step": count, "ms": timings}}
        rows.append(row["attn"])
        b.rec.emit(row)
        torch.cuda.empty_cache()
    default = sum(r["calls_per_step"] * r["ms"]["default"] for r in rows)
    best = sum(r["calls_per_step"] * min(v for v in r["ms"].values() if isinstance(v, float)) for r in rows)

    def chosen(row: dict[str, Any]) -> float:  # what gpu_speed.attention sends this shape to
        timing: float = row["ms"]["default"]
        if gpu_speed.takes_efficient_kernel(row["q"][2], row["k"][2]):
            timing = row["ms"].get("efficient_attention", timing)
        if gpu_speed.pack_group(row["q"][0], row["q"][2], row["k"][2]) > 1:
            timing = row["ms"].get(f"packed {gpu_speed.PACKED_LENGTH} efficient_attention", timing)
        return timing

    ours = sum(r["calls_per_step"] * chosen(r) for r in rows)
    per_step = {"default": round(default, 2), "ours": round(ours, 2), "best_per_shape": round(best, 2)}
    summary = {"attn_per_step_ms": per_step, "shape": b.args.step_shape}
    b.rec.emit(summary)


def _attention_timings(q_shape: tuple[int, ...], k_shape: tuple[int, ...], plain: Any) -> dict[str, Any]:
    """Median ms of one attention call of these shapes per variant, and each variant's max error vs default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    batch, heads, length, width = q_shape
    # As the processors see them: (B, S, H, D) projections viewed and transposed to (B, H, S, D).
    query = torch.randn(batch, length, heads, width, device="cuda", dtype=torch.float16).transpose(1, 2)
    key = torch.randn(batch, k_shape[2], heads, width, device="cuda", dtype=torch.float16).transpose(1, 2)
    value = torch.randn_like(key)
    reference = sdpa(query, key, value).float()
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [("default", lambda: sdpa(query, key, value))]
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

        def forced(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return sdpa(query, key, value)

        variants.append((backend.name.lower(), forced))
    if batch * heads * length * k_shape[2] * 4 < 8 << 30:  # the fp32 weights matrix fits
        variants.append(("inductor softmax(qk)v", lambda: plain(query, key, value)))
    variants += _packed_variants(query, key, value)
    timings: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for label, function in variants:
        try:
            errors[label] = f"{(function().float() - reference).abs().max().item():.1e}"
            timings[label] = round(_median_ms(function), 3)
        except Exception as exc:  # a backend that refuses the shape
            errors[label] = f"refused: {type(exc).__name__}: {str(exc)[:80]}"
    return {**timings, "max_error": errors}


PACKED_LENGTHS = (64, 128)
"""Packed sequence lengths tried for the short (temporal) self-attentions: `group` = length // frames."""


def _packed_variants(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """`gpu_speed.packed_attention` for the short self-attentions: eager under each SDPA backend, compiled by
    inductor (as inside the compiled layers) and through FlexAttention with the same block-diagonal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, length, width = query.shape
    if not gpu_speed.takes_efficient_kernel(length, key.shape[-2]) or key.shape[-2] != length:
        return []
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = []
    compiled = torch.compile(gpu_speed.packed_attention, fullgraph=True, dynamic=False)
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    for packed in PACKED_LENGTHS:
        group = packed // length
        if group < 2 or batch % group:
            continue
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, None):

            def eager(backend: SDPBackend | None = backend, group: int = group) -> torch.Tensor:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    return gpu_speed.packed_attention(query, key, value, None, group)

            label = backend.name.lower() if backend is not None else "default"
            variants.append((f"packed {packed} {label}", eager))
        variants.append(
            (f"packed {packed} compiled", lambda g=group: compiled(query, key, value, None, g))  # type: ignore[misc]
        )
        mask = create_block_mask(
            lambda b, h, q, k, s=length: q // s == k // s, None, None, group * length, group * length, device="cuda"
        )

        def flexed(group: int = group, mask: Any = mask) -> torch.Tensor:
            def pack(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(1, 2).reshape(batch // group, group * length, heads, width).transpose(1, 2)

            out: torch.Tensor = flex(pack(query), pack(key), pack(value), block_mask=mask)
            return out.transpose(1, 2).reshape(batch, length, heads, width).transpose(1, 2)

        variants.append((f"packed {packed} flex", flexed))
    return variants


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def phase_conv(b: Bench) -> None:
    """Every distinct convolution of one guided step at `--step-shape` (recorded from an eager step, in the
    layouts the generator gives them, `--channels-last` or not) timed alone with cuDNN's heuristic algorithm
    choice, or with `--cudnn-benchmark` its measured one (and the first call, which searches). cuDNN caches one
    plan per shape for the process whichever way it was found, so the two need a process each."""
    calls: dict[tuple[Any, ...], int] = {}

    def record(module: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        x = inputs[0]
        layout = "nchw" if x.is_contiguous() else "strided"
        if layout == "strided" and x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
            layout = "channels_last"
        shape = (tuple(x.shape), layout, tuple(module.weight.shape), module.stride, module.padding, module.groups)
        calls[shape] = calls.get(shape, 0) + 1

    generator = make_generator(b.parts, torch.float16)
    if b.args.channels_last:
        gpu_speed.to_channels_last(b.parts.unet)
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    convs = [m for m in b.parts.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    hooks = [m.register_forward_hook(record) for m in convs]
    try:
        with torch.inference_mode(), eager_layers(b.parts.unet):
            prepared = pred.prepare(b.parts.unet, cond)
            calls.clear()  # the step's convolutions only
            torch.cuda.synchronize()
            begin = time.perf_counter()
            guided_step(b.parts.unet, latents, t, prepared)  # with cudnn.benchmark: the searches
            torch.cuda.synchronize()
            recording_step_s = time.perf_counter() - begin
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for (x_shape, layout, w_shape, stride, padding, groups), count in sorted(calls.items(), key=lambda i: -i[1]):
        conv = torch.nn.functional.conv2d if len(x_shape) == 4 else torch.nn.functional.conv3d
        fmt = CHANNELS_LAST[len(x_shape)] if layout == "channels_last" else torch.contiguous_format
        with torch.inference_mode():
            x = torch.randn(x_shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
            w = torch.randn(w_shape, device="cuda", dtype=torch.float16) * 0.05
            w = w.contiguous(memory_format=CHANNELS_LAST[len(w_shape)]) if b.args.channels_last else w
            bias = torch.randn(w_shape[0], device="cuda", dtype=torch.float16)

            run = functools.partial(conv, x, w, bias, stride, padding, 1, groups)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            run()  # the plan is cached per shape for the process by now (found during the recorded step)
            torch.cuda.synchronize()
            first_ms = (time.perf_counter() - begin) * 1000
            median_ms = _median_ms(run)
        row = {
            "conv": {
                "x": x_shape,
                "layout": layout,
                "w": w_shape,
                "stride": stride,
                "padding": padding,
                "calls_per_step": count,
                "cudnn_benchmark": b.args.cudnn_benchmark,
                "ms": round(median_ms, 3),
                "first_call_ms": round(first_ms, 1),
            }
        }
        rows.append(row["conv"])
        b.rec.emit(row)
        torch.cuda.empty_cache()
    summary = {
        "conv_per_step_ms": round(sum(r["calls_per_step"] * r["ms"] for r in rows), 2),
        "recording_step_s": round(recording_step_s, 2),
        "cudnn_benchmark": b.args.cudnn_benchmark,
        "channels_last": b.args.channels_last,
        "shape": b.args.step_shape,
    }
    b.rec.emit(summary)


TUNINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "coordinate-descent": {"coordinate_descent_tuning": True},
    "max-autotune": {"max_autotune": True},
    "looped-reductions": {"triton.persistent_reductions": False},
    "unfused-addmm": {"keep_addmm_fused_for_half_dtypes": False},
    "multi-kernel": {"triton.multi_kernel": 1},
    "combo-kernels": {"combo_kernels": True},
    "aggressive-fusion": {"aggressive_fusion": True},
    "freezing": {"freezing": True},
    "cooperative-reductions": {"triton.cooperative_reductions": True},
    "fused-projections": {},
    "split-bias": {},
}
"""Inductor options per `--tunings` name: coordinate descent tunes the block sizes of inductor's own pointwise and
reduction kernels; max-autotune also benchmarks Triton GEMM/convolution templates against cuBLAS/cuDNN (and can
then fuse the epilogue into them); looped reductions stop inductor from reducing a whole row in one block (the
channels-last GroupNorm statistics at 768p ran as such persistent reductions at 2.7x the NCHW ones' time).
Unfused addmm: a linear's bias is added in the pointwise kernel that follows instead of in cuBLAS's epilogue (the
320-wide addmm ran at 278 TFLOP/s, the mm of the same shape at 486, `--phases roofline`; torch 2.11 has no such
option); multi-kernel: inductor
compiles both a persistent and a looped variant of each reduction and keeps the faster per kernel at run time;
combo kernels: independent small kernels (the GroupNorm statistics' later stages) launched as one; aggressive
fusion: nodes fused even without shared reads; freezing: weights as constants (inductor then concatenates linears
that share an input); cooperative reductions: a split reduction in one kernel with a grid-wide barrier instead of
several (the GroupNorm statistics' later stages). Two are changes to the model, not options:
`MODEL_CHANGES`."""


def _set_fused_projections(unet: Any, on: bool) -> None:
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, gpu_speed.AttentionProcessor):
            processor.fuse_projections = on


MODEL_CHANGES: dict[str, Callable[[Any, bool], Any]] = {
    "fused-projections": _set_fused_projections,
    "split-bias": lambda unet, on: gpu_speed.split_linear_bias(unet, undo=not on),
}
"""`--tunings` names that change the model (on, then off again) under inductor's default options:
`AttentionProcessor.fuse_projections` and `gpu_speed.split_linear_bias`."""


def _max_difference(ours: Any, reference: Any) -> float:
    """The largest absolute difference between two layer outputs (tensors, or tuples/lists of them)."""
    if isinstance(ours, torch.Tensor):
        return float((ours.float() - reference.float()).abs().max())
    return max((_max_difference(a, b) for a, b in zip(ours, reference, strict=True)), default=0.0)


def _time_tuning(tuning: str, ordered: list[dict[str, Any]], rows: list[dict[str, Any]], budget: float) -> float:
    """Compile and time the layers of `ordered` (heaviest first) under `tuning` into `rows` until `budget` compile
    seconds are spent; returns the seconds spent."""
    spent = 0.0
    for layer, row in zip(ordered, rows, strict=True):
        if spent > budget:
            break
        compiled = torch.compile(layer["module"], dynamic=False, options=TUNINGS[tuning] or None)
        call = functools.partial(compiled, *layer["args"], **layer["kwargs"])
        with torch.inference_mode():
            begin = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            spent += time.perf_counter() - begin
            row[tuning] = round(_median_ms(call), 3)
            row[f"{tuning}_max_diff"] = _max_difference(out, layer["reference"])
            del out
        print(json.dumps({"tuning": tuning, "spent_s": round(spent, 1)} | row), flush=True)
    return spent


def _run_tunings(
    b: Bench, tunings: list[str], ordered: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, float]:
    """`_time_tuning` for each of `tunings` (those that fail are removed from the list); their compile seconds."""
    import torch._dynamo

    compile_s: dict[str, float] = {}
    for tuning in list(tunings):
        torch._dynamo.reset()
        change = MODEL_CHANGES.get(tuning)
        try:
            if change is not None:
                change(b.parts.unet, True)
            spent = _time_tuning(tuning, ordered, rows, b.args.tuning_budget)
        except Exception:  # an option this torch lacks, or a failed compile: the other tunings still count
            traceback.print_exc()
            print(json.dumps({"tuning": tuning, "failed": True}), flush=True)
            tunings.remove(tuning)
            for row in rows:
                row.pop(tuning, None)
                row.pop(f"{tuning}_max_diff", None)
            continue
        finally:
            if change is not None:
                change(b.parts.unet, False)
        compile_s[tuning] = round(spent, 1)
        print(json.dumps({"tuning": tuning, "compile_s": compile_s[tuning]}), flush=True)
    return compile_s


def _tuning_on_plain_unet(b: Bench) -> None:
    """Each distinct compiled layer of one guided step at `--step-shape` (one per `compile_cache.REGION_CLASSES`
    layer, inputs recorded from an eager step) compiled alone under each `--tunings` inductor option set and timed
    against eager. The heaviest layers go first and each tuning stops compiling new layers after `--tuning-budget`
    seconds, so a tuning whose compile is too slow for the whole UNet still measures what it gains where it matters;
    the summary compares only the layers every tuning covered."""
    import torch._dynamo

    from daemon.generate import compile_cache, precompile

    generator = make_generator(b.parts, torch.float16)
    if b.args.channels_last:
        gpu_speed.to_channels_last(b.parts.unet)
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    layers: dict[Any, list[Any]] = {}  # signature -> [module, args, kwargs, calls per step]

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # What the daemon's precompiled layer graphs are keyed by: one graph per distinct signature.
        signature = (precompile.state_signature(module), precompile.value_signature((args, kwargs)))
        entry = layers.setdefault(signature, [module, args, kwargs, 0])
        entry[3] += 1

    regions = [m for m in b.parts.unet.modules() if type(m).__name__ in compile_cache.REGION_CLASSES]
    with torch.inference_mode(), eager_layers(b.parts.unet):
        prepared = pred.prepare(b.parts.unet, cond)
        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in regions]
        try:
            guided_step(b.parts.unet, latents, t, prepared)
        finally:
            for hook in hooks:
                hook.remove()
        ordered = []
        for module, args, kwargs, calls in layers.values():
            eager_ms = _median_ms(lambda m=module, a=args, k=kwargs: m(*a, **k))
            reference = module(*args, **kwargs)
            ordered.append(
                {
                    "module": module,
                    "args": args,
                    "kwargs": kwargs,
                    "calls": calls,
                    "eager_ms": eager_ms,
                    "reference": reference,
                }
            )
        ordered.sort(key=lambda layer: -layer["eager_ms"] * layer["calls"])
    compile_cache.raise_graph_limits()  # as the daemon's per-layer compile does
    rows = [
        {"layer": type(m["module"]).__name__, "calls_per_step": m["calls"], "eager": round(m["eager_ms"], 3)}
        for m in ordered
    ]
    tunings = b.args.tunings.split(",")
    compile_s = _run_tunings(b, tunings, ordered, rows)
    covered = [row for row in rows if all(tuning in row for tuning in tunings)]
    for row in rows:
        b.rec.emit({"tuning_layer": row | {"shape": b.args.step_shape}})

    def per_step(name: str, chosen: list[dict[str, Any]]) -> float:
        return round(sum(row["calls_per_step"] * row[name] for row in chosen), 2)

    summary = {
        "tuning_summary": {
            "shape": b.args.step_shape,
            "channels_last": b.args.channels_last,
            "layers": len(rows),
            "layers_covered": len(covered),
            "calls_covered": sum(row["calls_per_step"] for row in covered),
            "calls_per_step": sum(row["calls_per_step"] for row in rows),
            "eager_ms_all": per_step("eager", rows),
            "ms_per_step_covered": {name: per_step(name, covered) for name in ["eager", *tunings]},
            "compile_s": compile_s,
        }
    }
    b.rec.emit(summary)


def _changes_on_plain_unet(b: Bench) -> None:
    """Whole compiled steps with and without `MODEL_CHANGES` (`--changes`, in that order; a name given again is
    compiled again with inductor's caches off, so that the difference between two compiles of the same code, which
    inductor's own kernel benchmarks at compile time make vary, is measured next to the change). Each variant: the
    layers compiled per layer (`compile_cache.compile_regions`, dynamo, as without precompiled graphs) after a
    dynamo reset, one guided step at `--step-shape`, 5 rounds of the median of 10, and the step's largest
    difference to the first variant's output."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from daemon.generate import compile_cache

    generator = make_generator(b.parts, torch.float16)
    if b.args.channels_last:
        gpu_speed.to_channels_last(b.parts.unet)
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    unet = b.parts.unet
    seen: set[str] = set()
    first: Any = None
    for name in b.args.changes.split(","):
        torch._dynamo.reset()
        change = MODEL_CHANGES.get(name)
        if change is not None:
            change(unet, True)
        caches = contextlib.nullcontext() if name not in seen else inductor_config.patch(force_disable_caches=True)
        try:
            with torch.inference_mode(), caches:
                compile_cache.compile_regions([unet], "default")
                prep = pred.prepare(unet, cond)
                begin = time.perf_counter()
                out = guided_step(unet, latents, t, prep)[0]
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - begin
                timed_step = functools.partial(guided_step, unet, latents, t, prep)
                rounds = [_median_ms(timed_step) for _ in range(5)]
        finally:
            if change is not None:
                change(unet, False)
        first = out if first is None else first
        row = {
            "change": name,
            "again": name in seen,
            "shape": b.args.step_shape,
            "channels_last": b.args.channels_last,
            "compile_s": round(compile_s, 1),
            "ms_per_step": round(statistics.median(rounds), 3),
            "rounds": [round(x, 3) for x in rounds],
            "max_diff_to_first": _max_difference(out, first),
        }
        seen.add(name)
        print(json.dumps(row), flush=True)
        b.rec.emit({"changes": row})
        del out


def phase_tuning(b: Bench) -> None:
    """`_tuning_on_plain_unet` on `plain_unet`."""
    with plain_unet(b.parts.unet):
        _tuning_on_plain_unet(b)


def phase_changes(b: Bench) -> None:
    """`_changes_on_plain_unet` on `plain_unet`."""
    with plain_unet(b.parts.unet):
        _changes_on_plain_unet(b)


def phase_sharing(b: Bench) -> None:
    """The guidance halves' shared head against the doubled batch: one step at `--step-shape` both ways, on the
    generator as configured (with `--compile`, the compiled layers: the shared layers get graphs of one job's rows),
    timed in alternating rounds in one process, so that a machine start's drift is the same for both. Full and
    shallow (DeepCache) pass."""
    generator = b.generator()
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    unet = b.parts.unet
    with torch.inference_mode():
        prep = pred.prepare(unet, cond)
        _, deep = gpu_speed.step(unet, latents, t, prep)
        cases: dict[str, Callable[[], Any]] = {
            "doubled": lambda: gpu_speed.step(unet, latents, t, prep),
            "guided": lambda: guided_step(unet, latents, t, prep),
            "doubled_shallow": lambda: gpu_speed.step(unet, latents, t, prep, deep=deep),
            "guided_shallow": lambda: guided_step(unet, latents, t, prep, deep),
        }
        rounds: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(5):
            for name, function in cases.items():
                rounds[name].append(_median_ms(function, repeats=10))
    medians = {name: round(statistics.median(times), 3) for name, times in rounds.items()}
    row = {
        "sharing": {
            "shape": b.args.step_shape,
            "compile": b.args.compile,
            "channels_last": b.args.channels_last,
            "ms_per_step": medians,
            "rounds": {name: [round(x, 3) for x in times] for name, times in rounds.items()},
            "saved_full_ms": round(medians["doubled"] - medians["guided"], 3),
            "saved_shallow_ms": round(medians["doubled_shallow"] - medians["guided_shallow"], 3),
        }
    }
    b.rec.emit(row)


def phase_roofline(b: Bench) -> None:
    """Where one compiled guided step at `--step-shape` stands against the GPU's limits, kernel by kernel.

    `--roofline triton`: inductor's own kernels, compiled with `profile_bandwidth` (each kernel benchmarked alone,
    with the bytes it must move): per kernel its time, bytes and GB/s, and the time it takes beyond what the bytes
    need at the bandwidth of a plain device copy measured here ("excess"); the generated modules of the kernels
    with the most excess are kept beside `--out`. The kernels then no longer compute (they are timed once and
    skipped), so this needs a process of its own. `--roofline extern`: the library calls inside the compiled
    graphs (GEMMs, convolutions, attention) under torch's profiler with their shapes: TFLOP/s per call shape."""
    import shutil

    from torch._inductor import config as inductor_config

    kind = b.args.roofline
    report = b.args.out.parent / "bandwidth.txt"
    if kind == "triton":
        report.unlink(missing_ok=True)
        inductor_config.profile_bandwidth = True
        inductor_config.profile_bandwidth_regex = ""
        inductor_config.profile_bandwidth_output = str(report)
        inductor_config.benchmark_harness = False  # with an output file, torch 2.11 calls the harness wrongly
    generator = make_generator(
        b.parts,
        torch.float16,
        compile_mode=b.args.compile,
        compile_scope=b.args.compile_scope,
        channels_last=b.args.channels_last,
        split_linear_bias=b.args.split_linear_bias,
    )
    cond, latents, t = step_inputs(generator, *step_shape(b.args))
    unet = b.parts.unet
    with torch.inference_mode():
        prep = pred.prepare(unet, cond)
        guided_step(unet, latents, t, prep)
        torch.cuda.synchronize()
        if kind == "triton":
            copy_gb_s = _copy_bandwidth()
            inductor_config.profile_bandwidth_output = None
            kernels = _bandwidth_report(report.read_text(), copy_gb_s)
            kept = b.args.out.parent / "roofline-kernels"
            kept.mkdir(exist_ok=True)
            for entry in kernels["top"][:25]:
                source = Path(entry["module"])
                if source.is_file():
                    shutil.copyfile(source, kept / source.name)
            b.rec.emit({"roofline": {"kind": "triton", "shape": b.args.step_shape} | kernels})
            return
        extern = _extern_report(unet, latents, t, prep)
        b.rec.emit({"roofline": {"kind": "extern", "shape": b.args.step_shape} | extern})


def _copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written): the bandwidth a pointwise kernel can reach."""
    source = torch.empty(2**29, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    ms = _median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * 2 / 1e9 / (ms / 1e3)


def _bandwidth_report(text: str, copy_gb_s: float) -> dict[str, Any]:
    """`profile_bandwidth_output`'s sections (one per graph call: "ms  GB  GB/s  share  kernel") summed per kernel
    of a generated module over the step; excess = time beyond bytes / `copy_gb_s`."""
    per_kernel: dict[tuple[str, str], list[float]] = {}
    module = ""
    for line in text.splitlines():
        if line.startswith("TRITON KERNELS BANDWIDTH INFO ("):
            module = line[len("TRITON KERNELS BANDWIDTH INFO (") : -1]
            continue
        fields = line.split()
        if len(fields) < 5 or not fields[0].endswith("ms") or fields[1] == "":
            continue
        try:
            ms, gb = float(fields[0][:-2]), float(fields[1])
        except ValueError:
            continue
        entry = per_kernel.setdefault((module, fields[-1]), [0.0, 0.0, 0])
        entry[0] += ms
        entry[1] += gb
        entry[2] += 1
    rows = []
    for (source, name), (ms, gb, calls) in per_kernel.items():
        floor = gb / copy_gb_s * 1e3
        rows.append(
            {
                "kernel": name,
                "module": source,
                "calls": int(calls),
                "ms": round(ms, 4),
                "gb": round(gb, 4),
                "gb_s": round(gb / (ms / 1e3), 1) if ms else 0.0,
                "excess_ms": round(ms - floor, 4),
            }
        )
    rows.sort(key=lambda row: -row["excess_ms"])
    total = sum(row["ms"] for row in rows)
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        kind = row["kernel"].split("_")[1] if row["kernel"].count("_") > 1 else "other"
        entry = by_kind.setdefault(kind, [0.0, 0.0])
        entry[0] += row["ms"]
        entry[1] += row["excess_ms"]
    return {
        "copy_gb_s": round(copy_gb_s, 1),
        "kernel_ms": round(total, 3),
        "excess_ms": round(sum(row["excess_ms"] for row in rows), 3),
        "by_kind": {kind: {"ms": round(ms, 3), "excess_ms": round(ex, 3)} for kind, (ms, ex) in by_kind.items()},
        "kernels": len(rows),
        "top": rows[:60],
    }


EXTERN_OPS = {
    "aten::mm": "gemm",
    "aten::addmm": "gemm",
    "aten::bmm": "gemm",
    "aten::baddbmm": "gemm",
    "aten::convolution": "convolution",
    "aten::_convolution": None,  # inside aten::convolution: counted there
    "aten::_scaled_dot_product_cudnn_attention": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention",
    "aten::_scaled_dot_product_flash_attention": "attention",
}


def _extern_report(unet: Any, latents: torch.Tensor, t: torch.Tensor, prep: gpu_speed.Prepared) -> dict[str, Any]:
    """The library calls of one compiled guided step by op and input shapes: calls, CUDA ms, TFLOP and TFLOP/s
    (torch's FLOP formulas for GEMMs and convolutions; 4 B H Sq Sk D for attention), summed per kind."""
    from torch.profiler import ProfilerActivity, profile

    guided_step(unet, latents, t, prep)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_flops=True) as prof:
        guided_step(unet, latents, t, prep)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        kind = EXTERN_OPS.get(event.key)
        if kind is None:
            continue
        shapes = [list(shape) for shape in event.input_shapes if shape]
        flops = float(event.flops or 0)
        if kind == "attention" and len(shapes) >= 2:
            (batch, heads, sq, dim), (_, _, sk, _) = shapes[0][:4], shapes[1][:4]
            flops = 4.0 * batch * heads * sq * sk * dim * event.count
        ms = event.device_time_total / 1000
        rows.append(
            {
                "op": event.key,
                "kind": kind,
                "shapes": shapes[:3],
                "calls": int(event.count),
                "ms": round(ms, 3),
                "tflop": round(flops / 1e12, 4),
                "tflops": round(flops / 1e12 / (ms / 1e3), 1) if ms else 0.0,
            }
        )
    rows.sort(key=lambda row: -row["ms"])
    kinds: dict[str, list[float]] = {}
    for row in rows:
        entry = kinds.setdefault(row["kind"], [0.0, 0.0])
        entry[0] += row["ms"]
        entry[1] += row["tflop"]
    summary = {
        kind: {"ms": round(ms, 3), "tflop": round(tf, 3), "tflops": round(tf / (ms / 1e3), 1) if ms else 0.0}
        for kind, (ms, tf) in kinds.items()
    }
    return {"by_kind": summary, "top": rows[:60]}


def step_shape(args: argparse.Namespace) -> tuple[str, int]:
    """`--step-shape` ("768p:16") as (tier, frames)."""
    tier, frames = args.step_shape.split(":")
    if tier not in TIERS:
        raise SystemExit(f"--step-shape: unknown tier {tier!r} (one of {', '.join(TIERS)})")
    return tier, int(frames)


def step_inputs(
    generator: I2VGenXLGenerator, tier: str = "512p", frames: int = 16
) -> tuple[loop.Conditioning, torch.Tensor, torch.Tensor]:
    """What one guided UNet step of this shape takes: the conditioning, the latents (both CFG rows) and the
    timestep, for the phases that look at a single step."""
    width, height = TIERS[tier]
    cond = batch_cond(generator, request(tier, frames, 1))
    latents = torch.randn(2, 4, frames, height // 8, width // 8, device="cuda", dtype=torch.float16)
    return cond, latents, torch.tensor(500, device="cuda")


def guided_step(
    unet: Any,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prep: gpu_speed.Prepared,
    deep: torch.Tensor | None = None,
) -> Any:
    """One guided UNet step as the predictors run it: `latents` holds both guidance halves (`step_inputs`), the
    step takes them once (`gpu_speed.step(..., guided=True)`); with `deep`, the shallow (DeepCache) pass."""
    return gpu_speed.step(unet, latents[: latents.shape[0] // 2], timestep, prep, deep, guided=True)


def batch_cond(generator: I2VGenXLGenerator, req: GenerationRequest) -> loop.Conditioning:
    from daemon.generate import batch_render
    from daemon.generate.ladder import Plan

    plan = Plan(req.width, req.height, req.num_frames, 8)
    with torch.inference_mode():
        return batch_render.conditioning(
            generator.components, [req], plan, True, None, lambda _: contextlib.nullcontext()
        )


def phase_vram(b: Bench) -> None:
    """Peak allocated bytes of the denoise stage and of one decode chunk per shape: the VRAM model's data."""
    from daemon.generate import batch_render
    from daemon.generate.ladder import Plan

    generator = make_generator(b.parts, torch.float16)
    torch.cuda.empty_cache()
    weights = int(torch.cuda.memory_allocated())
    rows = []
    for tier, frames, batch, chunk in (
        ("512p", 16, 1, 8),
        ("512p", 16, 2, 8),
        ("512p", 32, 1, 4),
        ("768p", 16, 1, 8),
        ("1024p", 16, 1, 2),
    ):
        reqs = [request(tier, frames, 1, seed=i) for i in range(batch)]
        plan = Plan(reqs[0].width, reqs[0].height, frames, chunk)
        nothing = lambda _: contextlib.nullcontext()  # noqa: E731
        with torch.inference_mode():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            latents = batch_render.denoise(
                generator.components, reqs, plan, generator.step_fn, None, None, nothing, None, None
            )
            denoise_peak = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            batch_render.decode(b.parts.vae, latents[:1], plan)
            decode_peak = int(torch.cuda.max_memory_allocated())
        rows.append(
            {
                "tier": tier,
                "frames": frames,
                "batch": batch,
                "chunk": chunk,
                "weights": weights,
                "denoise_peak": denoise_peak,
                "decode_peak": decode_peak,
                "latent_bytes": latents.numel() * 2,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del latents
    (b.args.out.parent / "gpu_vram_points.json").write_text(json.dumps(rows, indent=1))


def phase_creep(b: Bench) -> None:
    generator = make_generator(b.parts, torch.float16)
    allocated = []
    for index in range(b.args.creep_jobs):
        generator.generate(request("256p", 8, 10, seed=index))
        allocated.append(int(torch.cuda.memory_allocated()))
    row = {
        "jobs": len(allocated),
        "first": allocated[0],
        "last": allocated[-1],
        "max": max(allocated),
        "reserved_last": int(torch.cuda.memory_reserved()),
    }
    print("creep", json.dumps(row), flush=True)
    b.rec.write({"creep": row})


def phase_ready(b: Bench) -> None:
    """Process start -> first exact video done, with the compile cache in `--cache-dir` (cold or warm)."""
    from daemon.generate import compile_cache

    compile_cache.point_caches_at(b.args.cache_dir)
    generator = make_generator(b.parts, torch.float16, compile_mode=b.args.compile)
    key = compile_cache.artifact_key(b.parts.unet.config, b.args.compile, "512p16")
    artifact = compile_cache.cache_root(b.args.cache_dir) / f"mega-{key}.bin"
    loaded = compile_cache.load_artifacts(artifact)
    started = time.perf_counter()
    generator.render(request("512p", 16, 2))
    warm_s = time.perf_counter() - started
    saved = compile_cache.save_artifacts(artifact) if not loaded else 0
    row = {
        "ready": {
            "process_to_ready_s": round(time.perf_counter() - START, 1),
            "compile_warmup_s": round(warm_s, 1),
            "mega_cache_loaded": loaded,
            "mega_cache_saved_bytes": saved,
            "compile_failure": generator.step_fn.failure,
        }
    }
    b.rec.emit(row)


START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models" / "i2vgen-xl")
    parser.add_argument("--phases", default="ref,stock,exact,fast,batch")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--compile-scope", default="auto", choices=("auto", "blocks", "step"))
    parser.add_argument("--compile-vae", action="store_true", help="blocks scope: the VAE decoder's layers too")
    parser.add_argument(
        "--precompile-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="blocks scope: layer graphs saved whole (model.precompile_layers, the daemon's default)",
    )
    parser.add_argument(
        "--changes",
        default="default,split-bias,default",
        help=f"changes phase: variants in order, of default, {', '.join(MODEL_CHANGES)}",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fast-variants", default="3,0,50;5,0,50;3,0.3,50;3,0,25")
    parser.add_argument("--creep-jobs", type=int, default=100)
    parser.add_argument("--batch-sizes", default="2,4")
    parser.add_argument("--batch-compare", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tier-steps", type=int, default=50)
    parser.add_argument("--tier-list", default="768p:16,512p:32,1024p:16")
    parser.add_argument(
        "--step-shape", default="512p:16", help="TIER:FRAMES of the single step that attn, profile and layout look at"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last UNet convolution weights (default: as the daemon's model.channels_last unset decides)",
    )
    parser.add_argument(
        "--split-linear-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="UNet linear biases added after the GEMM (default: as the daemon's model.split_linear_bias unset decides)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark for the whole run"
    )
    parser.add_argument(
        "--tunings", default="default,coordinate-descent,max-autotune", help=f"tuning phase: of {', '.join(TUNINGS)}"
    )
    parser.add_argument("--tuning-budget", type=float, default=150.0, help="tuning phase: compile seconds per tuning")
    parser.add_argument(
        "--roofline", default="extern", choices=("extern", "triton"), help="roofline phase: which kernels"
    )
    parser.add_argument("--save-ref", type=Path, help="write the fp32 reference frames (512p x 16) here")
    parser.add_argument("--load-ref", type=Path, help="read them from here instead of running `ref`")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "i2vd")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_bench.jsonl")
    args = parser.parse_args()
    args.compile_scope = resolve_compile_scope(args.compile, args.compile_scope)
    if args.channels_last is None:
        # The tuning phase compiles layers whatever `--compile` says, so it takes a compiled generator's layout.
        compiled = "default" if args.compile == "off" and "tuning" in args.phases.split(",") else args.compile
        scope = args.compile_scope if compiled == args.compile else resolve_compile_scope(compiled, "auto")
        model = ModelConfig(compile=compiled, compile_scope=scope)
        args.channels_last = model.resolved_channels_last(compiled)
    if args.split_linear_bias is None:  # as the daemon decides (the tuning and changes phases set it themselves)
        args.split_linear_bias = ModelConfig(
            compile=args.compile, compile_scope=args.compile_scope
        ).resolved_split_linear_bias(args.compile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    from daemon.generate import compile_cache

    compile_cache.point_caches_at(args.cache_dir)
    b = Bench(args)
    if args.load_ref is not None:
        b.ref[("512p", 16)] = np.load(args.load_ref)
    phases = args.phases.split(",")
    stock: list[np.ndarray] = []
    order: list[tuple[str, Callable[[Bench], Any]]] = [
        ("ref", phase_ref),
        ("half", lambda b: b.to_half()),
        ("stock", lambda b: stock.append(run_stock_case(b, "512p", 16, 2))),
        ("ready", phase_ready),
        ("exact", lambda b: run_exact_case(b, "512p", 16, 2, stock[0] if stock else None)),
        ("attn", phase_attn),
        ("conv", phase_conv),
        ("tuning", phase_tuning),
        ("sharing", phase_sharing),
        ("changes", phase_changes),
        ("roofline", phase_roofline),
        ("profile", phase_profile),
        ("vram", phase_vram),
        ("fast", phase_fast),
        ("batch", phase_batch),
        ("creep", phase_creep),
        ("layout", phase_layout),
        ("tiers", phase_tiers),
    ]
    for name, function in order:
        if name in phases or name == "half":
            try:
                function(b)
            except Exception:  # a failed phase must not cost the other phases' numbers
                traceback.print_exc()
                print(f"phase {name} failed", flush=True)
    print("\n".join(json.dumps(row) for row in b.rec.rows))


if __name__ == "__main__":
    main()

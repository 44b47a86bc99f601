"""Where a restart's time goes, and what each compile scope costs and buys (issue 7: READY <= 30 s, fast <= 2.0 s).

Every measurement runs in a fresh process, as a restart would:

- `load`: the loading of the saved full-size model split into its parts: importing torch, CUDA initialisation,
  importing diffusers + transformers, and per component `from_pretrained` and the move to the GPU;
- `compile SCOPE MODE`, twice per variant (`--variants step:reduce-overhead,blocks:default,...`): the first with an
  empty cache directory (the cold compile), the second with what the first left there (a warm restart). Each
  reports the generator's `warm_up` seconds, dynamo's own compile-time table, then times a 50-step exact video and
  a fast-mode video (stage timings included, so the fixed part of a video is visible), the PSNR of fast vs exact,
  and with `--vae` the decode with the VAE decoder's layers compiled too.

The model is the full-size I2VGen-XL with seeded random weights saved in fp16 (`gpu_daemon.save_model`).

    python bench/gpu_startup.py --configs .gpumodels/i2vgen-xl --out results.jsonl \\
        --variants blocks:default,step:reduce-overhead [--budget 540]

Records go to `--out` as JSON lines as soon as each process ends; `--budget` seconds stops starting new ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _since() -> float:
    return round(time.perf_counter() - STARTED, 3)


def child_load(model_dir: Path) -> dict[str, Any]:
    """The parts of `load_components`, in its order, each timed (the first CUDA use pays the context)."""
    marks: dict[str, Any] = {"interpreter_to_main": _since()}
    import torch

    marks["import_torch"] = _since()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    marks["cuda_init"] = _since()
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    marks["import_diffusers_transformers"] = _since()
    for name, cls in (
        ("unet", I2VGenXLUNet),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
        ("image_encoder", CLIPVisionModelWithProjection),
    ):
        kwargs = {"torch_dtype": torch.float16} if name in ("unet", "vae") else {"dtype": torch.float16}
        started = time.perf_counter()
        model = cls.from_pretrained(model_dir / name, local_files_only=True, **kwargs)
        marks[f"{name}_from_pretrained_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        model.to("cuda")
        torch.cuda.synchronize()
        marks[f"{name}_to_cuda_s"] = round(time.perf_counter() - started, 3)
    marks["total"] = _since()
    return marks


def child_compile(model_dir: Path, cache: Path, scope: str, mode: str, vae: bool) -> dict[str, Any]:
    import torch
    from gpu_bench import psnr
    from gpu_bench import request as make_request
    from PIL import Image

    from daemon.generate import compile_cache
    from daemon.generate import predict as pred
    from daemon.generate.base import GenerationRequest
    from daemon.generate.i2vgenxl import I2VGenXLGenerator, freeze_heap
    from daemon.generate.loading import load_components

    record: dict[str, Any] = {"scope": scope, "mode": mode, "torch": torch.__version__}
    compile_cache.point_caches_at(cache)
    started = time.perf_counter()
    parts = load_components(model_dir, torch.device("cuda"), torch.float16)
    record["load_s"] = round(time.perf_counter() - started, 2)
    info: Any = None
    generator = I2VGenXLGenerator(
        parts, info, device=torch.device("cuda"), decode_chunk_size=8, compile_mode=mode, compile_scope=scope
    )
    record["regions"] = generator.step_fn.regions
    record["warm_up"] = generator.warm_up(cache)
    record["ready_equivalent_s"] = _since()
    begun = time.perf_counter()
    gc.collect()
    record["gc_collect_before_freeze_s"] = round(time.perf_counter() - begun, 3)
    freeze_heap()
    begun = time.perf_counter()
    gc.collect()
    record["gc_collect_after_freeze_s"] = round(time.perf_counter() - begun, 3)
    from torch._dynamo.utils import compile_times

    record["dynamo_compile_times"] = compile_times(repr="str", aggregate=True)[:4000]

    def timed(req: GenerationRequest, mode_name: str) -> tuple[float, Any]:
        torch.cuda.synchronize()
        begun = time.perf_counter()
        video = generator.render_batch([req], mode=mode_name)[0]
        torch.cuda.synchronize()
        return round(time.perf_counter() - begun, 3), video

    exact_req = make_request("512p", 16, 50)
    timed(exact_req, "exact")  # second exact call: any lazily compiled part is in place
    record["exact_s"], exact = timed(exact_req, "exact")
    record["exact_timings"] = {k: round(v, 3) for k, v in exact.timings.items()}
    for spec in ("3,12", "3,10", "4,12"):
        interval, steps = (int(part) for part in spec.split(","))
        generator.fast_options = pred.FastOptions(cache_interval=interval, max_steps=steps)
        begun = time.perf_counter()
        timed(exact_req, "fast")  # the first fast call compiles the shallow graph with scope 'step'
        first = round(time.perf_counter() - begun, 2)
        seconds, fast = timed(exact_req, "fast")
        record[f"fast_{interval}_{steps}"] = {
            "s": seconds,
            "first_call_s": first,
            "timings": {k: round(v, 3) for k, v in fast.timings.items()},
            "psnr_vs_exact_db": round(psnr(fast.frames, exact.frames), 2),
        }
    if vae:
        begun = time.perf_counter()
        compile_cache.compile_regions(parts.vae.decoder, mode)
        image = Image.new("RGB", (512, 512), (128, 128, 128))
        warm_req = GenerationRequest(image, "warm-up", "", 512, 512, 16, 16, 2, 9.0, 0)
        generator.render(warm_req)
        record["vae_compile_first_call_s"] = round(time.perf_counter() - begun, 2)
        record["exact_vae_compiled_s"], again = timed(exact_req, "exact")
        record["exact_vae_compiled_timings"] = {k: round(v, 3) for k, v in again.timings.items()}
        record["vae_compiled_psnr_vs_eager_db"] = round(psnr(again.frames, exact.frames), 2)
    record["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return record


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    begun = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = round(time.perf_counter() - begun, 2)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"child": args, "wall_s": wall, "returncode": done.returncode, "stderr_tail": done.stderr[-3000:]}
    record: dict[str, Any] = json.loads(lines[-1])
    return {"child": args, "wall_s": wall, **record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models" / "i2vgen-xl")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/i2vd-full-random"))
    parser.add_argument("--variants", default="blocks:default,step:reduce-overhead")
    parser.add_argument("--vae", action="store_true", help="also compile the VAE decoder's layers (blocks scope)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--budget", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=Path("gpu_startup.jsonl"))
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind = args.child[0]
        if kind == "load":
            print(json.dumps(child_load(Path(args.child[1]))), flush=True)
        else:
            model_dir, cache, scope, mode, vae = args.child[1:6]
            print(json.dumps(child_compile(Path(model_dir), Path(cache), scope, mode, vae == "1")), flush=True)
        return
    import torch

    if not (args.model_dir / "model_index.json").exists():
        from gpu_daemon import save_model

        print("saved model in", round(save_model(args.configs, args.model_dir), 1), "s", flush=True)
    gpu = torch.cuda.get_device_name()
    del torch

    def emit(record: dict[str, Any]) -> None:
        record = {
            "benchmark": "gpu_startup",
            "gpu": gpu,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        } | record
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    if not args.skip_load:
        emit(run_child(["load", str(args.model_dir)], 300))
    for variant in args.variants.split(","):
        scope, mode = variant.split(":")
        cache = Path(f"/tmp/i2vd-startup-cache-{scope}-{mode}")
        for run in ("cold", "warm"):
            left = args.budget - (time.perf_counter() - STARTED)
            if left < 30:
                emit({"skipped": f"{variant} {run}: budget spent"})
                continue
            vae = "1" if args.vae and scope == "blocks" and run == "warm" else "0"
            try:
                emit({"run": run} | run_child(["compile", str(args.model_dir), str(cache), scope, mode, vae], left))
            except subprocess.TimeoutExpired:
                emit({"run": run, "variant": variant, "timed_out_after_s": round(left, 1)})


if __name__ == "__main__":
    main()

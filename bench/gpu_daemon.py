"""The daemon on the GPU under a backlog against the bare generator, in the same run (issue 7's throughput target,
and what one GPU allows of issue 9: two workers sharing it, and the cost of a killed worker).

1. Builds the full-size I2VGen-XL from the published configs with seeded random weights (`bench/gpu_bench.py`'s
   builder) and saves it in fp16 with `save_pretrained`, so the daemon loads it like real weights.
2. Bare generator: `load_generator` in this process, one warm-up video, then `--videos` timed videos.
3. The real service (`bench/scaling.py`'s `measure`: generation processes, queue, ffmpeg finishing with the
   default variants, atomic publication) on a backlog, with 1 and 2 workers on the same GPU; with 2 workers the
   generation process of w0 is killed mid-job (`--kill-one`).

    python bench/gpu_daemon.py --out results.json [--steps 30] [--videos 3] [--jobs-per-worker 3]
        [--workers 1,2] [--batch-sizes 1,4] [--reuse-model] [--compile default --warm-up-batch-sizes 1,2]

Each service record runs once per `--batch-sizes` entry (`worker.max_batch_size`; 1 isolates what the service's
overlap of finishing, IO and bookkeeping with the GPU achieves, larger values add batching). Prints and writes one
JSON object: bare s/video and videos/hour, the service's records, and their ratios to the bare generator, over the
whole backlog (`ratio_to_bare`) and once the pipeline is full (`steady_ratio_to_bare`, see `scaling.steady_rate`),
and `generator_idle`: the workers' gaps between generations while a job was waiting (`i2vd_generator_idle_seconds`),
which tells the daemon's own share of a gap to the bare rate from that of the generation process's calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_bench import build_components  # noqa: E402
from scaling import measure  # noqa: E402

from daemon.config import load_config  # noqa: E402
from daemon.generate import load_generator  # noqa: E402
from daemon.generate.base import GenerationRequest  # noqa: E402
from daemon.logs import configure_logging  # noqa: E402


def save_model(configs: Path, target: Path) -> float:
    """Random full-size weights, saved in fp16 with the published layout; returns seconds."""
    started = time.perf_counter()
    parts = build_components(configs, torch.device("cuda"))
    if target.exists():
        shutil.rmtree(target)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        getattr(parts, name).to(torch.float16).save_pretrained(target / name)
    for name in ("scheduler", "tokenizer", "feature_extractor"):
        getattr(parts, name).save_pretrained(target / name)
    shutil.copy(configs / "model_index.json", target / "model_index.json")
    del parts
    gc.collect()
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def model_settings(model_dir: Path, args: argparse.Namespace, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """The model section both the bare generator and the service load: fp16 on the GPU, and with `--compile` the
    compile settings of config/production.example.yaml, their cache in `--cache-dir` (shared, so the service's
    generation processes start with what the bare generator compiled, as a restarted daemon does)."""
    settings: dict[str, Any] = {"source": str(model_dir), "device": "cuda", "dtype": "float16"}
    if args.compile != "off":
        settings |= {"compile": args.compile, "cache_dir": args.cache_dir, "warm_up_batch_sizes": batch_sizes}
    return settings


def bare_generator(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model = load_config(None).model.model_copy(update=model_settings(model_dir, args, args.warm_up_batch_sizes))
    load_started = time.perf_counter()
    generator = load_generator(model)
    load_seconds = time.perf_counter() - load_started
    image = Image.new("RGB", (args.size, args.size), (90, 140, 200))
    request = GenerationRequest(
        image, "a lighthouse at dusk", "", args.size, args.size, args.frames, 16, args.steps, 9.0, 1
    )
    generator.generate(request)  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(args.videos):
        generator.generate(dataclasses.replace(request, seed=seed))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.videos
    del generator
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "s_per_video": round(seconds, 3),
        "videos_per_hour": round(3600 / seconds, 1),
        "load_seconds": round(load_seconds, 1),  # with --compile: the cold compile of every warm-up batch size
        "compile": args.compile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models" / "i2vgen-xl")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/i2vd-full-random"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--jobs-per-worker", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-sizes", default="4", help="worker.max_batch_size values, one service run each")
    parser.add_argument("--reuse-model", action="store_true", help="keep a model already saved in --model-dir")
    parser.add_argument("--compile", default="off", help="model.compile for the bare generator and the service")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/i2vd-gpu-daemon-cache"))
    parser.add_argument(
        "--warm-up-batch-sizes",
        type=lambda text: tuple(int(item) for item in text.split(",")),
        default="1",
        help="with --compile: model.warm_up_batch_sizes of the bare generator; each service run warms up those up "
        "to its max batch size",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_logging("warning", "json")
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "date": datetime.now(UTC).isoformat()}
    reuse = args.reuse_model and (args.model_dir / "model_index.json").exists()
    result["save_seconds"] = 0.0 if reuse else round(save_model(args.configs, args.model_dir), 1)
    result["bare"] = bare_generator(args.model_dir, args)
    print(json.dumps(result), flush=True)
    base = load_config(None)
    scaling = argparse.Namespace(
        executor="local", devices=None, share_device="cuda:0", jobs_per_worker=args.jobs_per_worker,
        width=args.size, height=args.size, frames=args.frames, steps=args.steps, timeout=600.0,
        kill_one=False, with_variants=True,
    )  # fmt: skip
    result["service"] = []
    bare_rate = result["bare"]["videos_per_hour"]
    for workers in (int(item) for item in args.workers.split(",")):
        for batch in (int(item) for item in args.batch_sizes.split(",")):
            scaling.kill_one = workers > 1
            scaling.max_batch_size = batch
            warm = tuple(size for size in args.warm_up_batch_sizes if size <= batch) or (1,)
            model = base.model.model_copy(update=model_settings(args.model_dir, args, warm))
            record = measure(base.model_copy(update={"model": model}), workers, scaling) | {"max_batch_size": batch}
            record["ratio_to_bare"] = round(record["videos_per_hour"] / bare_rate, 3)
            steady = record["steady_videos_per_hour"]
            record["steady_ratio_to_bare"] = round(steady / bare_rate, 3) if steady else None
            result["service"].append(record)
            print(json.dumps(record), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

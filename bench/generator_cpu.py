"""Our I2VGen-XL sampling loop against diffusers' stock `I2VGenXLPipeline`, same process, same components, CPU.

On the embedded tiny model (fp32): seconds per video (median of `--repeats` after one warm-up each) and the max
abs difference of the float frames. Writes `bench/results/generator_cpu-<date>.json` and prints the row for
BENCHMARKS.md.

    .venv/bin/python bench/generator_cpu.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from daemon.config import ModelConfig
from daemon.generate.base import GenerationRequest
from daemon.generate.i2vgenxl import load_generator
from daemon.generate.reference import run_stock, stock_pipeline

REPO = Path(__file__).resolve().parent.parent
CASES = ((64, 64, 8, 2), (128, 128, 8, 4), (256, 256, 16, 10))


def timed(function: Any, repeats: int) -> tuple[float, Any]:
    result = function()  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        ours = load_generator(ModelConfig(device="cpu", cache_dir=Path(cache)), clip_skip=None)
        stock = stock_pipeline(ours)
        image = Image.open(REPO / "examples" / "sunset.png").convert("RGB")
        rows = []
        for width, height, frames, steps in CASES:
            request = GenerationRequest(
                image=image,
                prompt="waves at sunset",
                negative_prompt="blurry",
                width=width,
                height=height,
                num_frames=frames,
                target_fps=16,
                steps=steps,
                guidance_scale=9.0,
                seed=42,
            )
            stock_s, stock_frames = timed(lambda r=request: run_stock(stock, r, clip_skip=None), args.repeats)
            ours_s, rendered = timed(lambda r=request: ours.render(r), args.repeats)
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "frames": frames,
                    "steps": steps,
                    "stock_s_per_video": round(stock_s, 3),
                    "ours_s_per_video": round(ours_s, 3),
                    "max_abs_diff": float(np.abs(rendered.frames - stock_frames).max()),
                }
            )
            print(rows[-1])
    result = {
        "benchmark": "generator_cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "model": "embedded-tiny (fp32)",
        "rows": rows,
    }
    out = REPO / "bench" / "results" / f"generator_cpu-{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = "; ".join(
        f"{r['size']}x{r['frames']}f/{r['steps']} steps: stock {r['stock_s_per_video']} s, ours "
        f"{r['ours_s_per_video']} s, max diff {r['max_abs_diff']:.1e}"
        for r in rows
    )
    print(
        f"row for BENCHMARKS.md (Foundation table):\n| {result['date'][:10]} | {result['machine']} | "
        f"`bench/generator_cpu.py` | {summary} |"
    )


if __name__ == "__main__":
    main()

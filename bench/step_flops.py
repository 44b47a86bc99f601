"""FLOPs of one guided I2VGen-XL UNet step at full size, counted on the meta device (no weights, no GPU, seconds).

Counts torch's flop counter over: the stock `I2VGenXLUNet.forward` on the doubled classifier-free-guidance batch,
`gpu_speed.step` on the same batch, and `gpu_speed.step(..., guided=True)` (the latents once: what precedes the
first context computed once for both halves), each for a full pass and a shallow (DeepCache) pass.

    python bench/step_flops.py [--configs ../shared/models/i2vgen-xl] [--shapes 512p:16,768p:16] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from daemon.generate import gpu_speed

REPO = Path(__file__).resolve().parent.parent


def count(function: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        function()
    return int(counter.get_total_flops())


def shape_flops(unet: Any, size: int, frames: int, jobs: int = 1) -> dict[str, Any]:
    """TFLOP of one guided step of `jobs` jobs at size x size x frames, per way of running it."""
    dim = unet.config.cross_attention_dim
    with torch.device("meta"):
        latents = torch.randn(jobs, 4, frames, size // 8, size // 8, dtype=unet.dtype)
        doubled = torch.cat([latents] * 2)
        image_latents = torch.cat([torch.randn_like(latents)] * 2)
        images = torch.randn(2 * jobs, 1, dim, dtype=unet.dtype)
        prompts = torch.randn(2 * jobs, 77, dim, dtype=unet.dtype)
        fps, timestep = torch.full((2 * jobs,), 16), torch.tensor(500)
        prep = gpu_speed.prepare(unet, image_latents, images, prompts, fps)
        deep = gpu_speed.step(unet, doubled, timestep, prep)[1]

        def stock() -> Any:
            return unet(
                doubled,
                timestep,
                encoder_hidden_states=prompts,
                fps=fps,
                image_latents=image_latents,
                image_embeddings=images,
                return_dict=False,
            )

        flops = {
            "stock_forward": count(stock),
            "step_doubled": count(lambda: gpu_speed.step(unet, doubled, timestep, prep)),
            "step_guided": count(lambda: gpu_speed.step(unet, latents, timestep, prep, guided=True)),
            "shallow_doubled": count(lambda: gpu_speed.step(unet, doubled, timestep, prep, deep)),
            "shallow_guided": count(lambda: gpu_speed.step(unet, latents, timestep, prep, deep, guided=True)),
        }
    tflop = {name: round(value / 1e12, 3) for name, value in flops.items()}
    saved = {
        "full": round(1 - flops["step_guided"] / flops["step_doubled"], 4),
        "shallow": round(1 - flops["shallow_guided"] / flops["shallow_doubled"], 4),
    }
    return {"shape": f"{size}p:{frames}", "jobs": jobs, "tflop": tflop, "saved_fraction": saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models" / "i2vgen-xl")
    parser.add_argument("--shapes", default="512p:16,768p:16,1024p:16,512p:32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from diffusers import I2VGenXLUNet

    config = json.loads((args.configs / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = I2VGenXLUNet.from_config(config).half().eval()
    rows = []
    for item in args.shapes.split(","):
        tier, frames = item.split(":")
        row = shape_flops(unet, int(tier.removesuffix("p")), int(frames))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

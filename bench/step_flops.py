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


class GuidedInputs:
    """Random inputs of one guided step of `jobs` jobs at width x height x frames, on the UNet's device and in
    its dtype: the latents once and doubled (unconditional rows first), and both halves' conditioning."""

    def __init__(self, unet: Any, width: int, height: int, frames: int, jobs: int = 1) -> None:
        dim, options = unet.config.cross_attention_dim, {"device": unet.device, "dtype": unet.dtype}
        self.latents = torch.randn(jobs, 4, frames, height // 8, width // 8, **options)
        self.doubled = torch.cat([self.latents] * 2)
        self.image_latents = torch.cat([torch.randn_like(self.latents)] * 2)
        self.images = torch.randn(2 * jobs, 1, dim, **options)
        self.prompts = torch.randn(2 * jobs, 77, dim, **options)
        self.fps = torch.full((2 * jobs,), 16, device=unet.device)
        self.timestep = torch.tensor(500, device=unet.device)

    def stock_forward(self, unet: Any) -> Any:
        """`I2VGenXLUNet.forward` on the doubled batch, as the stock pipeline calls it."""
        return unet(
            self.doubled,
            self.timestep,
            encoder_hidden_states=self.prompts,
            fps=self.fps,
            image_latents=self.image_latents,
            image_embeddings=self.images,
            return_dict=False,
        )


def stock_forward_tflop(unet: Any, width: int, height: int, frames: int, jobs: int = 1) -> float:
    """TFLOP of the stock forward of one guided step, on whatever device the UNet is (the meta device: no
    weights, no GPU); what `gpu_bench`'s TFLOP/s figures divide by."""
    with torch.device(unet.device):
        inputs = GuidedInputs(unet, width, height, frames, jobs)
        return count(lambda: inputs.stock_forward(unet)) / 1e12


def shape_flops(unet: Any, size: int, frames: int, jobs: int = 1) -> dict[str, Any]:
    """TFLOP of one guided step of `jobs` jobs at size x size x frames, per way of running it."""
    with torch.device("meta"):
        inputs = GuidedInputs(unet, size, size, frames, jobs)
        latents, doubled, timestep = inputs.latents, inputs.doubled, inputs.timestep
        prep = gpu_speed.prepare(unet, inputs.image_latents, inputs.images, inputs.prompts, inputs.fps)
        deep = gpu_speed.step(unet, doubled, timestep, prep)[1]
        flops = {
            "stock_forward": count(lambda: inputs.stock_forward(unet)),
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

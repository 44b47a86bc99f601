"""Model CPU offload for the degrade ladder: only the running stage's models on the GPU.

Why not diffusers' `enable_model_cpu_offload`: it needs the (deprecated) pipeline object and accelerate hooks; our
loop knows its stages, so moving whole models at stage boundaries is enough. It costs PCIe copies of the UNet
(~2.8 GB in fp16) per job, which is why it is a late rung of the ladder and never the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from daemon.generate.i2vgenxl_loop import Components


def _models(parts: Components) -> tuple[Any, ...]:
    return (parts.unet, parts.vae, parts.text_encoder, parts.image_encoder)


def stage_placer(parts: Components, device: torch.device, release: Callable[[], None]) -> Callable[[str], None]:
    """A callback for each stage's start that moves the other models to host memory and the stage's to `device`."""
    on_gpu = {
        "encode_prompt": (parts.text_encoder,),
        "encode_image": (parts.image_encoder, parts.vae),
        "denoise": (parts.unet,),
        "decode": (parts.vae,),
    }

    def place(stage: str) -> None:
        wanted = on_gpu.get(stage, _models(parts))
        for model in _models(parts):
            if all(model is not other for other in wanted):
                model.to("cpu")
        for model in wanted:
            model.to(device)
        release()

    return place


def restore(parts: Components, device: torch.device) -> None:
    """Every model back on `device` after the job (the next job starts undegraded)."""
    for model in _models(parts):
        if model.device != device:
            model.to(device)

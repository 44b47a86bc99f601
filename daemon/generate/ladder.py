"""The out-of-memory degrade ladder: what to give up, in which order, when a video does not fit the GPU.

Order (cheapest loss first): a smaller VAE decode chunk (halving down to 1; same pixels) -> VAE tiling and slicing
(same model, tiles blended at the seams) -> model CPU offload (only the running component on the GPU; slower, same
pixels) -> fewer frames (-25%, at least 8) -> the next lower resolution tier (1024p -> 768p -> 512p). An OOM while
decoding only climbs the decode rungs and keeps the denoised latents; an OOM earlier skips them. Each rung taken is
recorded by name (`GenerationResult.degradations`) and the parameters that changed in `GenerationResult.used`.
Torch-free, so the rules are unit-tested without a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIN_FRAMES = 8
TIERS = (512, 768, 1024)
"""Short sides of the resolution tiers; below the lowest there is nothing left to give up."""


@dataclass(frozen=True)
class Plan:
    """How one video is run; the defaults are the undegraded plan."""

    width: int
    height: int
    num_frames: int
    decode_chunk: int
    vae_tiling: bool = False
    cpu_offload: bool = False
    taken: tuple[str, ...] = ()

    def used(self, width: int, height: int, num_frames: int) -> dict[str, object]:
        """The parameters that differ from the request (for `GenerationResult.used`)."""
        changed: dict[str, object] = {}
        if (self.width, self.height) != (width, height):
            changed.update(width=self.width, height=self.height)
        if self.num_frames != num_frames:
            changed["num_frames"] = self.num_frames
        if self.taken:
            changed["decode_chunk_size"] = self.decode_chunk
        return changed


def _lower_tier(plan: Plan) -> Plan | None:
    short = min(plan.width, plan.height)
    lower = [tier for tier in TIERS if tier < short]
    if not lower:
        return None
    scale = lower[-1] / short
    width, height = (max(64, round(side * scale / 8) * 8) for side in (plan.width, plan.height))
    return dataclasses.replace(plan, width=width, height=height, taken=(*plan.taken, f"tier={lower[-1]}p"))


def next_plan(plan: Plan, stage: str) -> Plan | None:
    """The plan after the next rung that can help an OOM in `stage` ('decode' or anything earlier); None: give up."""
    if stage == "decode":
        if plan.decode_chunk > 1:
            chunk = max(1, plan.decode_chunk // 2)
            return dataclasses.replace(plan, decode_chunk=chunk, taken=(*plan.taken, f"decode_chunk={chunk}"))
        if not plan.vae_tiling:
            return dataclasses.replace(plan, vae_tiling=True, taken=(*plan.taken, "vae_tiling"))
    if not plan.cpu_offload:
        return dataclasses.replace(plan, cpu_offload=True, taken=(*plan.taken, "cpu_offload"))
    if stage == "decode":
        return None
    if plan.num_frames > MIN_FRAMES:
        frames = max(MIN_FRAMES, (plan.num_frames * 3) // 4)
        return dataclasses.replace(plan, num_frames=frames, taken=(*plan.taken, f"num_frames={frames}"))
    return _lower_tier(plan)


def apply_rungs(plan: Plan, rungs: tuple[str, ...]) -> Plan:
    """Start a plan already degraded by the preflight's rungs (names as `next_plan` records them)."""
    for rung in rungs:
        name, _, value = rung.partition("=")
        if name == "decode_chunk":
            plan = dataclasses.replace(plan, decode_chunk=int(value))
        elif name == "vae_tiling":
            plan = dataclasses.replace(plan, vae_tiling=True)
        elif name == "cpu_offload":
            plan = dataclasses.replace(plan, cpu_offload=True)
        else:
            raise ValueError(f"unknown preflight rung {rung!r}")
        plan = dataclasses.replace(plan, taken=(*plan.taken, rung))
    return plan

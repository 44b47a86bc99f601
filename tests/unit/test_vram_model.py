"""The measured VRAM model, the preflight built on it, and the out-of-memory degrade ladder (all torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.generate import ladder, vram

GIB = 2**30
POINTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_vram_points-2026-11-25.json"


def test_the_shipped_model_reproduces_the_gpu_measurements() -> None:
    """The coefficients are data fitted from `bench/gpu_bench.py --phases vram` on an H100; they must still
    predict every measured point (denoise peak within 1%, decode peak within 3%)."""
    points = json.loads(POINTS.read_text())
    assert len(points) >= 5
    for point in points:
        width = height = int(point["tier"].removesuffix("p"))
        denoise = vram.denoise_peak(width, height, point["frames"], point["batch"])
        decode = vram.decode_peak(width, height, point["chunk"])
        assert denoise == pytest.approx(point["denoise_peak"], rel=0.01), point
        assert decode == pytest.approx(point["decode_peak"] - point["latent_bytes"], rel=0.03), point


RESULTS = POINTS.parent


def recorded(name: str) -> list[dict[str, Any]]:
    lines = (RESULTS / name).read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("mode") in ("exact", "fast")]


def test_the_time_model_follows_the_measured_shapes() -> None:
    """Against the compiled runs on the H200 (`bench/results/gpu_bench-2026-12-0*.jsonl`): the shipped
    configuration's 512p/16f videos (guidance halves sharing their head, linear biases after their GEMMs) within 2%
    (exact) and 5% (fast), the daemon bench's bare 30-step video relative to the exact video of the same code
    (before the biases moved) within 2%, a batch of two's step relative to one video's (both measured before the
    packed temporal attention) within 5%, each tier's denoising step (packed; 32 frames, which are not packed, from
    the run before) relative to the packed 512p/16f step of the same run within 5%, and the VAE decode within 15%.
    The step terms were scaled for the shared head and for the biases, so the tiers' ratios are those of the runs
    before."""
    for row in recorded("gpu_bench-2026-12-02-split-bias.jsonl"):
        shallow = 8 if row["mode"] == "fast" else 0  # 3@12: 4 full steps, 8 shallow
        want = vram.estimate_seconds(512, 512, 16, row["steps"], shallow_steps=shallow)
        assert want == pytest.approx(row["s_per_video"], rel=0.02 if shallow == 0 else 0.05), row
    bare = json.loads((RESULTS / "gpu_daemon-2026-12-01-compiled-guided.json").read_text())["bare"]
    (same_code,) = [r for r in recorded("gpu_bench-2026-12-01-guided.jsonl") if r["mode"] == "exact"]
    ratio = vram.estimate_seconds(512, 512, 16, 30) / vram.estimate_seconds(512, 512, 16, 50)
    assert ratio == pytest.approx(bare["s_per_video"] / same_code["s_per_video"], rel=0.02)
    (pair,) = recorded("gpu_bench-2026-12-01-batch2.jsonl")
    (single,) = [r for r in recorded("gpu_bench-2026-12-01-shipped.jsonl") if r["mode"] == "exact"]
    assert (pair["batch"], single["batch"]) == (2, 1)
    measured = (pair["timings"]["denoise"] / pair["steps"]) / (single["timings"]["denoise"] / single["steps"])
    batch_step = vram.estimate_seconds(512, 512, 16, 2, batch=2) - vram.estimate_seconds(512, 512, 16, 1, batch=2)
    single_step = vram.estimate_seconds(512, 512, 16, 2) - vram.estimate_seconds(512, 512, 16, 1)
    assert batch_step / single_step == pytest.approx(measured, rel=0.05)
    shipped_run = recorded("gpu_bench-2026-12-01-packed.jsonl")

    def step(width: int, frames: int) -> float:
        return vram.estimate_seconds(width, width, frames, 2) - vram.estimate_seconds(width, width, frames, 1)

    (shipped,) = [r for r in shipped_run if r["mode"] == "exact"]
    base = shipped["timings"]["denoise"] / shipped["steps"]
    tiers = recorded("gpu_bench-2026-12-01-tiers-packed.jsonl")
    tiers += [r for r in recorded("gpu_bench-2026-12-01-tiers-after.jsonl") if r["frames"] == 32]
    assert {(r["tier"], r["frames"]) for r in tiers} == {("768p", 16), ("512p", 32), ("1024p", 16)}
    for row in tiers:
        width, frames = int(row["tier"].removesuffix("p")), row["frames"]
        timings = row["timings"]
        measured = timings["denoise"] / row["steps"] / base
        assert step(width, frames) / step(512, 16) == pytest.approx(measured, rel=0.05), row
        decode = vram.estimate_seconds(width, width, frames, 0) - vram.load_model().fixed_seconds
        assert decode == pytest.approx(timings["decode"], rel=0.15), row


def test_estimate_grows_with_every_dimension() -> None:
    base = vram.estimate_peak_bytes(512, 512, 16)
    assert vram.estimate_peak_bytes(768, 768, 16) > base
    assert vram.estimate_peak_bytes(512, 512, 32) > base
    assert vram.estimate_peak_bytes(512, 512, 16, batch=2) > base
    assert vram.estimate_seconds(512, 512, 16, 50) < vram.estimate_seconds(512, 512, 16, 50, batch=2)


def test_decode_chunk_keeps_the_peak_at_the_denoise_stage() -> None:
    chunk = vram.decode_chunk_within_denoise_peak(512, 512, 16, 1, wanted=8)
    assert 1 <= chunk < 8
    assert vram.decode_peak(512, 512, chunk) <= vram.denoise_peak(512, 512, 16)
    assert vram.decode_peak(512, 512, chunk + 1) > vram.denoise_peak(512, 512, 16)
    assert vram.decode_chunk_within_denoise_peak(512, 512, 16, 1, wanted=2) == 2


def test_max_batch_follows_the_budget() -> None:
    assert vram.max_batch(512, 512, 16, budget_bytes=74 * GIB) == 4
    assert vram.max_batch(512, 512, 16, budget_bytes=int(vram.denoise_peak(512, 512, 16, 2) * 1.2)) == 2
    assert vram.max_batch(1024, 1024, 32, budget_bytes=8 * GIB) == 1


def test_preflight_ok_degrade_refuse() -> None:
    assert vram.preflight(512, 512, 16, budget_bytes=74 * GIB).verdict == "ok"
    tight = vram.preflight(768, 768, 16, budget_bytes=int(vram.denoise_peak(768, 768, 16) * 1.15))
    assert tight.verdict == "degrade"
    assert tight.start_rungs[0].startswith("decode_chunk=")
    assert vram.preflight(1024, 1024, 32, budget_bytes=6 * GIB).verdict == "refuse"


def test_ladder_for_decode_keeps_the_video_and_halves_the_chunk_first() -> None:
    plan = ladder.Plan(512, 512, 16, decode_chunk=4)
    taken = []
    while (plan_next := ladder.next_plan(plan, "decode")) is not None:
        plan = plan_next
        taken.append(plan.taken[-1])
    assert taken == ["decode_chunk=2", "decode_chunk=1", "vae_tiling", "cpu_offload"]
    assert (plan.width, plan.height, plan.num_frames) == (512, 512, 16)


def test_ladder_for_denoise_gives_up_frames_then_resolution() -> None:
    plan = ladder.Plan(1024, 576, 16, decode_chunk=8)
    taken = []
    while (plan_next := ladder.next_plan(plan, "denoise")) is not None:
        plan = plan_next
        taken.append(plan.taken[-1])
    assert taken == ["cpu_offload", "num_frames=12", "num_frames=9", "num_frames=8", "tier=512p"]
    assert (plan.width, plan.height) == (912, 512)
    assert plan.used(1024, 576, 16) == {"width": 912, "height": 512, "num_frames": 8, "decode_chunk_size": 8}


def test_preflight_rungs_apply_and_unknown_rungs_are_refused() -> None:
    plan = ladder.apply_rungs(ladder.Plan(512, 512, 16, 8), ("decode_chunk=2", "vae_tiling"))
    assert (plan.decode_chunk, plan.vae_tiling, plan.taken) == (2, True, ("decode_chunk=2", "vae_tiling"))
    with pytest.raises(ValueError, match="unknown"):
        ladder.apply_rungs(plan, ("num_frames=8",))

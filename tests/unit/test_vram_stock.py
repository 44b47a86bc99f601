"""The stock backends' measured VRAM/time models (`daemon/generate/vram_stock.py`), their fit, and what
`i2vd validate` shows for each backend (all torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import EXIT_OK, main
from daemon.generate import estimates, vram, vram_stock

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
POINT_FILES = {
    "svd": "gpu_backends-2026-12-01-svd-ltx.json",
    "ltx-video": "gpu_backends-2026-12-01-ltx-points.json",
    "wan-i2v": "gpu_backends-2026-12-01-wan.json",
}
BENCH_FILES = {"svd": POINT_FILES["svd"], "ltx-video": POINT_FILES["svd"], "wan-i2v": POINT_FILES["wan-i2v"]}


def measured(backend: str, mode: str, files: dict[str, str]) -> list[dict[str, object]]:
    rows = json.loads((RESULTS / files[backend]).read_text())["rows"]
    return [row for row in rows if row["backend"] == backend and row["mode"] == mode]


def test_latent_geometry_of_each_backend() -> None:
    assert vram_stock.tokens("svd", 1024, 576, 25) == 25 * 72 * 128  # 8x VAE, no temporal compression
    assert vram_stock.tokens("ltx-video", 704, 480, 161) == 21 * 15 * 22  # 32x32 pixels, 8 frames per latent
    assert vram_stock.tokens("wan-i2v", 832, 480, 81) == 21 * 30 * 52  # 8x VAE, 4 frames, 2x2 patches
    assert vram_stock.decoded_pixels("svd", 1024, 576, 25, 8) == 1024 * 576 * 8  # one chunk at a time
    assert vram_stock.decoded_pixels("wan-i2v", 832, 480, 81, 8) == 832 * 480 * 81  # the whole video


@pytest.mark.parametrize("backend", ["svd", "ltx-video", "wan-i2v"])
def test_the_shipped_model_reproduces_the_gpu_points(backend: str) -> None:
    """The coefficients are data fitted by `bench/gpu_backends.py --points --fit` on the GPU; they must still give
    every measured point's peak within 2% (the fit passes through two points per backend)."""
    model = vram_stock.model_for(backend)
    points = measured(backend, "point", POINT_FILES)
    assert len(points) >= 2
    for point in points:
        peak = max(int(point["denoise_peak_bytes"]), int(point["decode_peak_bytes"]))  # type: ignore[call-overload]
        predicted = model.peak_bytes(point["width"], point["height"], point["num_frames"], point["decode_chunk"])  # type: ignore[arg-type]
        assert predicted == pytest.approx(peak, rel=0.02), point


@pytest.mark.parametrize("backend", ["svd", "ltx-video", "wan-i2v"])
def test_the_estimate_matches_the_stock_pipelines_peak_at_the_published_size(backend: str) -> None:
    """Against an independent measurement: the stock diffusers call's peak at the default size (same run)."""
    [stock] = measured(backend, "stock", BENCH_FILES)
    width, height = (int(side) for side in str(stock["size"]).split("x"))
    predicted = estimates.job_peak_bytes(backend, width, height, int(stock["frames"]))  # type: ignore[call-overload]
    assert predicted == pytest.approx(stock["peak_vram_bytes"], rel=0.03)


def test_fit_recovers_known_coefficients() -> None:
    """Points made from known coefficients (two sizes) give those coefficients back."""
    backend, weights = "wan-i2v", 48 * 2**30

    def point(width: int, height: int, frames: int) -> vram_stock.Point:
        count = vram_stock.tokens(backend, width, height, frames)
        pixels = width * height * frames
        return vram_stock.Point(
            width, height, frames, steps=4, decode_chunk=8, weights_bytes=weights,
            denoise_peak_bytes=weights + 2**30 + 12_000 * count, decode_peak_bytes=weights + 2**31 + 20 * pixels,
            denoise_seconds=4 * (1e-4 * count + 2e-9 * count**2), decode_seconds=1e-7 * pixels,
        )  # fmt: skip

    model = vram_stock.fit(backend, [point(832, 480, 81), point(832, 480, 33), point(1280, 720, 81)], "synthetic")
    assert model.weights_bytes == weights
    assert model.denoise_fixed_bytes == pytest.approx(2**30, rel=1e-6)
    assert model.denoise_bytes_per_token == pytest.approx(12_000, rel=1e-6)
    assert model.decode_bytes_per_pixel == pytest.approx(20, rel=1e-6)
    assert model.step_seconds_per_token == pytest.approx(1e-4, rel=1e-6)
    assert model.step_seconds_per_token_squared == pytest.approx(2e-9, rel=1e-6)
    assert model.seconds(832, 480, 81, 50) == pytest.approx(
        50 * (1e-4 * 32760 + 2e-9 * 32760**2) + 1e-7 * 832 * 480 * 81, rel=1e-6
    )


def test_fit_needs_points() -> None:
    with pytest.raises(ValueError, match="no measured points"):
        vram_stock.fit("svd", [], "nothing")


def test_i2vgenxl_keeps_its_own_model() -> None:
    assert estimates.job_peak_bytes("i2vgen-xl", 512, 512, 16) == vram.job_peak_bytes(512, 512, 16)
    assert estimates.job_seconds("i2vgen-xl", 512, 512, 16, 50) == vram.estimate_seconds(512, 512, 16, 50)


@pytest.mark.parametrize(
    ("backend", "low_gib", "high_gib"),
    [("i2vgen-xl", 6, 9), ("svd", 12, 15), ("ltx-video", 18, 22), ("wan-i2v", 50, 56)],
)
def test_validate_shows_the_configured_backends_estimate(
    backend: str, low_gib: float, high_gib: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before this model, every backend showed I2VGen-XL's estimate (~7 GiB), also a 14B Wan."""
    config = tmp_path / "daemon.yaml"
    config.write_text(f"model:\n  backend: {backend}\n  source: /models/any\n")
    sidecar = tmp_path / "job.yaml"
    sidecar.write_text("prompt: a lighthouse at dusk\nseed: 1\n")
    assert main(["validate", "--config", str(config), str(sidecar)]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert low_gib <= plan["estimated_vram_gib"] <= high_gib
    assert plan["estimated_gpu_seconds"] > 0
    assert "bench/gpu_" in plan["estimates_measured_on"]


def test_fast_mode_is_estimated_as_its_capped_steps_with_cheaper_shallow_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """I2VGen-XL fast mode runs at most 12 steps, 4 of them full and 8 shallow at 0.47 of a full one (BENCHMARKS.md,
    "Compile scope"); the `preview` preset (25 steps, fast) is estimated so, and the shipped model reproduces the
    measured H200 figures of the shipped configuration (`gpu_bench-2026-12-02-split-bias.jsonl`: 5.77 s exact and
    1.23 s fast)."""
    capped = estimates.job_seconds("i2vgen-xl", 512, 512, 16, 12)
    fast = estimates.job_seconds("i2vgen-xl", 512, 512, 16, 25, "fast")
    assert fast == pytest.approx(vram.estimate_seconds(512, 512, 16, 12, shallow_steps=8))
    assert fast < capped < estimates.job_seconds("i2vgen-xl", 512, 512, 16, 25, "exact")
    lines = (RESULTS / "gpu_bench-2026-12-02-split-bias.jsonl").read_text().splitlines()
    measured = {row["mode"]: row["s_per_video"] for row in map(json.loads, lines)}
    assert estimates.job_seconds("i2vgen-xl", 512, 512, 16, 50) == pytest.approx(measured["exact"], rel=0.02)
    assert fast == pytest.approx(measured["fast"], rel=0.05)
    assert estimates.job_seconds("svd", 1024, 576, 25, 25, "fast") == estimates.job_seconds("svd", 1024, 576, 25, 25)
    plans = []
    for preset in ("preview", "standard"):
        sidecar = tmp_path / f"{preset}.yaml"
        sidecar.write_text(f"prompt: a lighthouse\npreset: {preset}\n")
        assert main(["validate", str(sidecar)]) == EXIT_OK
        plans.append(json.loads(capsys.readouterr().out))
    preview, standard = plans
    assert preview["mode"] == "fast" and preview["estimated_gpu_seconds"] == round(fast, 1)
    assert standard["estimated_gpu_seconds"] > 3 * preview["estimated_gpu_seconds"]


def test_fit_from_one_size_puts_everything_in_the_per_token_term() -> None:
    """Two runs of one size cannot separate fixed and per-token bytes: the fit attributes all to the size term,
    which over-estimates small jobs rather than under-estimating large ones."""
    count = vram_stock.tokens("svd", 1024, 576, 25)
    point = vram_stock.Point(1024, 576, 25, 3, 8, 4 * 2**30, 4 * 2**30 + 100 * count, 4 * 2**30, 1.0, 1.0)
    model = vram_stock.fit("svd", [point, point], "one size")
    assert model.denoise_fixed_bytes == 0 and model.denoise_bytes_per_token == pytest.approx(100)
    assert model.peak_bytes(1024, 576, 25) == pytest.approx(4 * 2**30 + 100 * count, rel=1e-9)


def test_validate_takes_the_configured_decode_chunk_for_svd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SVD decodes `model.decode_chunk_size` frames at once when the job does not say: a config with chunk 2 must
    show a lower peak than the default 8 (the estimate used to assume 8 whatever the config said), and a job's own
    `decode_chunk_size` still wins."""
    estimates_gib = {}
    for chunk, sidecar_extra in ((8, ""), (2, ""), (2, "decode_chunk_size: 8\n")):
        config = tmp_path / f"daemon-{chunk}.yaml"
        config.write_text(f"model:\n  backend: svd\n  source: /models/any\n  decode_chunk_size: {chunk}\n")
        sidecar = tmp_path / "job.yaml"
        sidecar.write_text("prompt: a lighthouse at dusk\nseed: 1\n" + sidecar_extra)
        assert main(["validate", "--config", str(config), str(sidecar)]) == EXIT_OK
        estimates_gib[(chunk, sidecar_extra)] = json.loads(capsys.readouterr().out)["estimated_vram_gib"]
    assert estimates_gib[(2, "")] < estimates_gib[(8, "")]
    assert estimates_gib[(2, "decode_chunk_size: 8\n")] == estimates_gib[(8, "")]

"""`bench/gpu_backends.py --smoke`: the GPU benchmark's whole path (build, warm-up, stock call, our generator, JSON)
on the tiny pipelines on the CPU, so the script is known to run before it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_backends.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_backends", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_one_stock_and_one_ours_row_per_backend(tmp_path: Path) -> None:
    out = tmp_path / "results" / "smoke.json"
    assert (
        load_script().main(
            ["--smoke", "--device", "cpu", "--backends", "svd", "ltx-video", "wan-i2v", "--out", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gpu_backends" and result["smoke"] is True and result["gpu"] is None
    rows = result["rows"]
    assert [(row["backend"], row["mode"]) for row in rows] == [
        (backend, mode) for backend in ("svd", "ltx-video", "wan-i2v") for mode in ("stock", "ours")
    ]
    for row in rows:
        assert row["s_per_video"] > 0 and row["peak_vram_bytes"] == 0  # CPU: no device memory
        assert (row["size"], row["frames"], row["steps"]) == ("32x32", 9, 2)
        # Same components, arguments and seed: our generator makes exactly the stock pipeline's video.
        assert row["max_abs_diff_uint8"] == 0


def test_published_sizes_build_on_the_meta_device() -> None:
    """The GPU run builds the published architectures; here they are built without memory (meta device) to catch a
    config mistake before a GPU does, and their sizes are checked against the published parameter counts."""
    import torch

    script = load_script()
    billions = {}
    for backend in ("svd", "ltx-video", "wan-i2v"):
        pipe = script.PUBLISHED[backend](lambda: script.on_device(torch.device("meta"), torch.bfloat16))
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        billions[backend] = sum(p.numel() for p in denoiser.parameters()) / 1e9
        assert next(denoiser.parameters()).dtype == torch.bfloat16
        assert pipe.scheduler.sigmas.dtype == torch.float32, "schedulers are built outside the dtype context"
    # SVD-xt UNet 1.52 B, LTX-Video 2B transformer 1.92 B, Wan2.1-I2V-14B transformer 16.4 B (with image layers).
    assert billions["svd"] == pytest.approx(1.52, abs=0.01)
    assert billions["ltx-video"] == pytest.approx(1.92, abs=0.01)
    assert billions["wan-i2v"] == pytest.approx(16.4, abs=0.05)


def test_smoke_points_and_fit_write_a_loadable_model(tmp_path: Path) -> None:
    """`--points --fit`: two points per backend (default and preview-shaped tiny sizes) and a model file that
    `vram_stock.load_models` reads; a backend not measured keeps its entry from `--fit-base`."""
    from daemon.generate import vram_stock

    out, fit = tmp_path / "smoke.json", tmp_path / "fit.json"
    argv = ["--smoke", "--device", "cpu", "--backends", "svd", "--points", "--out", str(out), "--fit", str(fit)]
    assert load_script().main(argv) == 0
    points = [row for row in json.loads(out.read_text())["rows"] if row["mode"] == "point"]
    assert [(row["width"], row["num_frames"]) for row in points] == [(32, 9), (64, 13)]
    assert all(row["denoise_seconds"] > 0 and row["decode_seconds"] > 0 for row in points)
    models = vram_stock.load_models(fit)
    assert set(models) == {"svd", "ltx-video", "wan-i2v"}  # svd fitted here, the others from the shipped file
    assert models["svd"].step_seconds_per_token > 0 and "cpu" in models["svd"].source
    assert models["wan-i2v"] == vram_stock.load_models()["wan-i2v"]

"""Helpers of `bench/gpu_bench.py` that decide what a benchmark row measures, on the CPU: the stock pipeline and
the flop counter must see the plain layers even after ours installed compiled calls on the shared UNet."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from daemon.generate import precompile, tiny

pytestmark = pytest.mark.integration

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the script imports its sibling modules
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eager_layers_takes_compiled_calls_away_and_gives_them_back(gpu_bench: ModuleType, tmp_path: Path) -> None:
    model = torch.nn.ModuleList([ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4)])
    precompile.LayerGraphs(tmp_path, "default", "aot_eager").install([model[0]])
    installed = model[0]._compiled_call_impl
    with gpu_bench.eager_layers(model):
        assert model[0]._compiled_call_impl is None
        model[0](torch.randn(1, 8, 4, 4), None)
    assert model[0]._compiled_call_impl is installed
    assert not list(tmp_path.iterdir())  # the call inside compiled nothing


def test_the_single_step_shape_is_a_known_tier_and_a_frame_count(gpu_bench: ModuleType) -> None:
    assert gpu_bench.step_shape(argparse.Namespace(step_shape="768p:16")) == ("768p", 16)
    assert gpu_bench.step_shape(argparse.Namespace(step_shape="512p:32")) == ("512p", 32)
    with pytest.raises(SystemExit, match="unknown tier '720p'"):
        gpu_bench.step_shape(argparse.Namespace(step_shape="720p:16"))


def test_the_tflop_figure_is_the_stock_forward_on_plain_layers(gpu_bench: ModuleType, tmp_path: Path) -> None:
    """`tflops` in a record divides by the stock forward's FLOPs (`step_flops.stock_forward_tflop`): counted
    through the plain layers even with compiled calls installed on the shared UNet, the same on the CPU as on the
    meta device (no weights), and per job in a batch. On the CPU, SDPA's fused kernel has no FLOP formula in
    torch's counter (CUDA's kernels have), so the CPU count takes the math kernel, as the meta device does."""
    import step_flops  # the bench's sibling script; the fixture put bench/ on sys.path
    from diffusers import I2VGenXLUNet
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        meta_unet = I2VGenXLUNet.from_config(config).eval()
    plain = step_flops.stock_forward_tflop(meta_unet, 64, 64, 4)
    assert plain > 0
    assert step_flops.stock_forward_tflop(meta_unet, 64, 64, 4, jobs=2) == pytest.approx(2 * plain)
    unet = I2VGenXLUNet.from_config(config).eval()
    resnets = [module for module in unet.modules() if isinstance(module, ResnetBlock2D)]
    precompile.LayerGraphs(tmp_path, "default", "aot_eager").install(resnets)
    parts = SimpleNamespace(unet=unet, vae=torch.nn.Identity())
    with sdpa_kernel(SDPBackend.MATH):
        assert gpu_bench.step_tflop(parts, 64, 64, 4, 1) == pytest.approx(plain)
    assert all(module._compiled_call_impl is not None for module in resnets)  # given back afterwards
    assert not list(tmp_path.iterdir())  # the count compiled nothing


def test_the_stock_pipeline_and_the_comparisons_run_the_plain_unet(gpu_bench: ModuleType, tmp_path: Path) -> None:
    """`stock_attention` (the stock pipeline, the flop count) and `plain_unet` (the tuning and changes phases)
    see the UNet as diffusers has it, whatever ours installed on the shared one: plain `Linear`s, unfused
    projections, uncompiled layers, and diffusers' processors for the stock one. Afterwards everything is ours
    again, and a layer compiled meanwhile is uncompiled again."""
    from diffusers import I2VGenXLUNet
    from diffusers.models.attention_processor import AttnProcessor2_0

    from daemon.generate import gpu_speed

    config = json.loads((tiny.SHIPPED_DIR / "unet" / "config.json").read_text(encoding="utf-8"))
    unet = I2VGenXLUNet.from_config(config).eval()
    gpu_speed.install_attention(unet, fuse_projections=True)
    assert gpu_speed.split_linear_bias(unet) > 0
    resnets = [module for module in unet.modules() if isinstance(module, ResnetBlock2D)]
    precompile.LayerGraphs(tmp_path, "default", "aot_eager").install(resnets[:1])
    installed = resnets[0]._compiled_call_impl
    ours = list(unet.attn_processors.values())

    def plain_inside() -> None:
        assert not any(type(m) is gpu_speed.BiasAfterLinear for m in unet.modules())
        assert all(m._compiled_call_impl is None for m in unet.modules())

    with gpu_bench.plain_unet(unet):
        plain_inside()
        assert not any(p.fuse_projections for p in ours)
        resnets[1].compile(backend="eager")  # as the changes phase compiles its variants
    with gpu_bench.stock_attention(unet, torch.nn.Identity()):
        plain_inside()
        assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert any(type(m) is gpu_speed.BiasAfterLinear for m in unet.modules())
    assert resnets[0]._compiled_call_impl is installed and resnets[1]._compiled_call_impl is None
    assert list(unet.attn_processors.values()) == ours and all(p.fuse_projections for p in ours)

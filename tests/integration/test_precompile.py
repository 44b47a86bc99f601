"""Ahead-of-time compiled layer graphs (`daemon.generate.precompile`) on the CPU with real dynamo: a first start
compiles and saves one artefact per distinct layer call, a restart (a fresh interpreter) loads them and traces
nothing, the frames stay the eager ones; same-shaped layers with different constants get their own graph; a
broken artefact is replaced; what cannot be captured whole runs through dynamo; hooks are honoured; a code
generation failure still turns the generator eager. The generator tests use the 'aot_eager' backend (AOTAutograd
without code generation, serialisable like inductor's output); one test runs inductor itself on a single layer."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compiled_copies import compiled_copy
from diffusers.models.resnet import ResnetBlock2D
from PIL import Image

from daemon.config import ModelConfig
from daemon.generate import compile_cache, precompile
from daemon.generate.base import GenerationRequest
from daemon.generate.i2vgenxl import I2VGenXLGenerator, load_generator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def eager(model_cache: Path) -> I2VGenXLGenerator:
    return eager_generator(model_cache)


def request() -> GenerationRequest:
    pixels = np.random.default_rng(3).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return GenerationRequest(Image.fromarray(pixels), "a red kite", "", 64, 64, 8, 8, 3, 9.0, 5)


def precompiled_copy(eager: I2VGenXLGenerator, directory: Path, backend: Any = "aot_eager") -> I2VGenXLGenerator:
    """A generator on deep copies of the eager one's UNet and VAE, its layers running precompiled graphs."""
    return compiled_copy(eager, backend, precompiled_dir=directory)


RESTART = """
import json, sys
from pathlib import Path
import numpy as np
import torch
from torch._dynamo.utils import counters
sys.path.insert(0, {tests!r})
from integration.test_precompile import eager_generator, precompiled_copy, request
generator = precompiled_copy(eager_generator(Path({cache!r})), Path({store!r}))
frames = generator.render(request()).frames
np.save({frames!r}, frames)
stats = generator.step_fn.layer_graphs.stats.as_dict()
stats["dynamo_frames"] = int(sum(counters["frames"].values()))
print(json.dumps(stats))
"""


def eager_generator(cache: Path) -> I2VGenXLGenerator:
    return load_generator(ModelConfig(device="cpu", cache_dir=cache))


@pytest.mark.slow
def test_a_restart_loads_every_layer_graph_and_traces_nothing(
    eager: I2VGenXLGenerator, model_cache: Path, tmp_path: Path
) -> None:
    from torch._dynamo.utils import counters

    store = tmp_path / "layers"
    first = precompiled_copy(eager, store)
    want = eager.render(request()).frames
    before = sum(counters["frames"].values())
    np.testing.assert_allclose(first.render(request()).frames, want, atol=1e-5)
    graphs = first.step_fn.layer_graphs
    assert graphs is not None and first.step_fn.failure is None
    saved = sorted(store.glob(f"*{precompile.SUFFIX}"))
    assert graphs.stats.compiled == len(saved) > 20  # one per distinct layer call, shared by same-shaped layers
    assert graphs.stats.loaded == graphs.stats.dynamo_fallbacks == 0
    assert graphs.stats.compiled < first.step_fn.regions  # far fewer graphs than layer instances
    assert sum(counters["frames"].values()) == before  # `aot_compile` does not go through dynamo's frame hook

    frames = tmp_path / "restart.npy"
    tests = str(Path(__file__).parents[1])
    script = RESTART.format(tests=tests, cache=str(model_cache), store=str(store), frames=str(frames))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["loaded"] == len(saved) and stats["compiled"] == stats["discarded"] == 0
    assert stats["dynamo_frames"] == 0
    np.testing.assert_allclose(np.load(frames), want, atol=1e-5)


def resnet(scale: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4, output_scale_factor=scale).eval()


def test_same_shaped_layers_share_a_graph_unless_their_constants_differ(tmp_path: Path) -> None:
    """Weights are inputs, so two instances with different weights share one graph; a different constant
    (the mid block's `output_scale_factor`) fails the first graph's guards and gets its own."""
    layers = [resnet(1.0, 1), resnet(1.0, 2), resnet(2.0, 3)]
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    with torch.inference_mode():
        want = [layer(x, temb) for layer in layers]
        graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
        graphs.install(layers)
        got = [layer(x, temb) for layer in layers]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert graphs.stats.compiled == 2 == len(list(tmp_path.glob(f"*{precompile.SUFFIX}")))
    assert not torch.equal(want[0], want[1])


@pytest.mark.parametrize("change", ["to_channels_last", "split_linear_bias"])
def test_a_layer_changed_in_layout_or_code_gets_graphs_of_its_own(tmp_path: Path, change: str) -> None:
    """A graph is specialised on its weights' layout like on any input's (`model.channels_last`), and on its code:
    `model.split_linear_bias` changes the class of a layer's `Linear`s, not its weights. Either way the changed
    layer must not be handed the plain one's graph, nor the other way round: two keys, two graphs."""
    from daemon.generate import gpu_speed

    plain, changed = resnet(1.0, 1), resnet(1.0, 1)
    assert getattr(gpu_speed, change)(changed) > 0
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    with torch.inference_mode():
        want = plain._call_impl(x, temb)
        graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
        graphs.install([plain, changed])
        for layer in (plain, changed):
            torch.testing.assert_close(layer(x, temb), want)
    saved = list(tmp_path.glob(f"*{precompile.SUFFIX}"))
    assert graphs.stats.compiled == 2 == len(saved)
    assert len({path.name.split("-")[0] for path in saved}) == 2  # two keys, not two graphs under one key
    assert precompile.state_signature(plain) != precompile.state_signature(changed)


def test_an_attention_processors_settings_are_part_of_the_signature() -> None:
    from diffusers.models.attention_processor import Attention

    from daemon.generate import gpu_speed

    attention = Attention(8, heads=2, dim_head=4)
    attention.set_processor(gpu_speed.AttentionProcessor())  # type: ignore[arg-type]
    separate = precompile.state_signature(attention)
    attention.set_processor(gpu_speed.AttentionProcessor(fuse_projections=True))  # type: ignore[arg-type]
    assert precompile.state_signature(attention) != separate


def test_it_works_where_torch_leaves_the_entry_point_off(tmp_path: Path) -> None:
    """torch 2.11 ships `enable_aot_compile = False`, without which `torch.compile(fn)` has no `aot_compile`."""
    import torch._dynamo

    layer, x, temb = resnet(1.0, 1), torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
    graphs.install([layer])
    with torch._dynamo.config.patch(enable_aot_compile=False), torch.inference_mode():
        want = layer._call_impl(x, temb)
        torch.testing.assert_close(layer(x, temb), want)
    assert (graphs.stats.compiled, graphs.stats.dynamo_fallbacks) == (1, 0)
    assert precompile.available()


def test_two_workers_sharing_the_cache_never_spoil_each_others_graphs(tmp_path: Path) -> None:
    """Two generation processes on one cache dir may compile the same layer call at once: each writes through a
    temp file and a rename under a name taken from the content, so whatever both leave loads at the next start."""
    x, temb = torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    # Made outside inference mode, as the daemon loads its models (weights made inside it are inference tensors:
    # their guards differ, so they would get a graph of their own).
    first, second, restarted = resnet(1.0, 1), resnet(1.0, 1), resnet(1.0, 1)
    with torch.inference_mode():
        want = first._call_impl(x, temb)
        for layer in (first, second):
            precompile.LayerGraphs(tmp_path, "default", "aot_eager").install([layer])
            torch.testing.assert_close(layer(x, temb), want)
        saved = list(tmp_path.glob(f"*{precompile.SUFFIX}"))
        assert 1 <= len(saved) <= 2 and not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
        graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
        graphs.install([restarted])
        torch.testing.assert_close(restarted(x, temb), want)
    assert (graphs.stats.loaded, graphs.stats.compiled) == (len(saved), 0)


def test_a_broken_artefact_is_deleted_and_compiled_again(tmp_path: Path) -> None:
    layer, x, temb = resnet(1.0, 1), torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    with torch.inference_mode():
        want = layer(x, temb)
        precompile.LayerGraphs(tmp_path, "default", "aot_eager").install([layer])
        layer(x, temb)
        (saved,) = tmp_path.glob(f"*{precompile.SUFFIX}")
        saved.write_bytes(saved.read_bytes()[:100])  # a truncated file (a disk that filled up, another torch)
        graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
        graphs.install([layer])
        torch.testing.assert_close(layer(x, temb), want)
    assert (graphs.stats.discarded, graphs.stats.compiled, graphs.stats.loaded) == (1, 1, 0)
    assert not saved.exists() and len(list(tmp_path.glob(f"*{precompile.SUFFIX}"))) == 1


class BreaksTheGraph(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


def test_a_layer_that_cannot_be_captured_whole_runs_through_dynamo(tmp_path: Path) -> None:
    layer, x = BreaksTheGraph(), torch.randn(3)
    graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
    graphs.install([layer])
    torch.testing.assert_close(layer(x), x * 2 + 1)
    torch.testing.assert_close(layer(x), x * 2 + 1)
    assert graphs.stats.dynamo_fallbacks == 1 and graphs.stats.compiled == 0  # decided once per signature
    assert not list(tmp_path.glob(f"*{precompile.SUFFIX}"))


def test_an_input_that_cannot_be_keyed_runs_through_dynamo(tmp_path: Path) -> None:
    class TakesAnObject(torch.nn.Module):
        def forward(self, x: torch.Tensor, scale: Any) -> torch.Tensor:
            return x * scale.value

    class Scale:
        value = 3.0

    layer, x = TakesAnObject(), torch.randn(3)
    graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
    graphs.install([layer])
    torch.testing.assert_close(layer(x, Scale()), x * 3.0)
    assert graphs.stats.compiled == 0 and not list(tmp_path.glob(f"*{precompile.SUFFIX}"))


def test_a_hooked_layer_keeps_its_hooks(tmp_path: Path) -> None:
    layer, x, temb = resnet(1.0, 1), torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    seen: list[int] = []
    layer.register_forward_hook(lambda module, args, output: seen.append(1))
    precompile.LayerGraphs(tmp_path, "default", "aot_eager").install([layer])
    with torch.inference_mode():
        layer(x, temb)
    assert seen == [1]


def test_global_hooks_get_the_normal_call_and_decide_nothing(tmp_path: Path) -> None:
    """torch's flop counter registers global module hooks; under them the layer runs eager with the hooks, and the
    same call without them still gets its precompiled graph (measured: a bench that counted FLOPs at a new shape
    had bound that shape to the dynamo fallback for good)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    layer, x, temb = resnet(1.0, 1), torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    graphs = precompile.LayerGraphs(tmp_path, "default", "aot_eager")
    graphs.install([layer])
    seen: list[str] = []
    handle = register_module_forward_pre_hook(lambda module, args: seen.append(type(module).__name__))
    try:
        with torch.inference_mode():
            want = layer(x, temb)
    finally:
        handle.remove()
    assert "ResnetBlock2D" in seen and graphs.stats.compiled == graphs.stats.dynamo_fallbacks == 0
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, temb), want)
    assert (graphs.stats.compiled, graphs.stats.dynamo_fallbacks) == (1, 0)


def test_inductor_code_is_saved_and_loaded(tmp_path: Path) -> None:
    """The production backend: inductor's generated code survives the round trip through the file."""
    layer, x, temb = resnet(1.0, 1), torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    with torch.inference_mode():
        want = layer(x, temb)
        precompile.LayerGraphs(tmp_path, "default", "inductor").install([layer])
        torch.testing.assert_close(layer(x, temb), want, atol=1e-5, rtol=1e-5)
        graphs = precompile.LayerGraphs(tmp_path, "default", "inductor")
        graphs.install([layer])
        torch.testing.assert_close(layer(x, temb), want, atol=1e-5, rtol=1e-5)
    assert (graphs.stats.loaded, graphs.stats.compiled) == (1, 0)


def broken_backend(graph: Any, example_inputs: Any) -> Any:
    raise RuntimeError("inductor: no working C compiler")


@pytest.mark.slow
def test_a_code_generation_failure_still_turns_the_generator_eager(eager: I2VGenXLGenerator, tmp_path: Path) -> None:
    generator = precompiled_copy(eager, tmp_path, backend=broken_backend)
    np.testing.assert_allclose(generator.render(request()).frames, eager.render(request()).frames, atol=1e-5)
    assert not generator.step_fn.active and "no working C compiler" in (generator.step_fn.failure or "")
    assert generator.step_fn.layer_graphs is None


def test_the_store_is_named_after_model_mode_and_torch_and_can_be_turned_off(tmp_path: Path) -> None:
    from daemon.generate.i2vgenxl import _precompiled_dir

    parts: Any = types.SimpleNamespace(unet=types.SimpleNamespace(config={"sample_size": 32}))
    on = _precompiled_dir(ModelConfig(cache_dir=tmp_path, compile="default"), parts)
    other_mode = _precompiled_dir(ModelConfig(cache_dir=tmp_path, compile="max-autotune-no-cudagraphs"), parts)
    assert on is not None and on.parent == compile_cache.cache_root(tmp_path) and on != other_mode
    off = ModelConfig(cache_dir=tmp_path, compile="default", precompile_layers=False)
    assert _precompiled_dir(off, parts) is None
    assert ModelConfig().precompile_layers


def test_graphs_of_other_code_are_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved guards do not check which code a graph was traced from, so the store's name does: a change to
    the attention processor's module (or another diffusers) means another store, compiled afresh."""
    from daemon.generate import gpu_speed
    from daemon.generate.i2vgenxl import _precompiled_dir

    parts: Any = types.SimpleNamespace(unet=types.SimpleNamespace(config={"sample_size": 32}))
    config = ModelConfig(cache_dir=tmp_path, compile="default")
    before = _precompiled_dir(config, parts)
    assert _precompiled_dir(config, parts) == before  # stable while the code is
    changed = tmp_path / "gpu_speed.py"
    changed.write_bytes(Path(gpu_speed.__file__).read_bytes() + b"\n# another release\n")
    monkeypatch.setattr(gpu_speed, "__file__", str(changed))
    assert _precompiled_dir(config, parts) != before
    monkeypatch.undo()
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.0.1")
    assert _precompiled_dir(config, parts) != before

"""The per-layer ('blocks') compile scope on the embedded tiny model on the CPU: which layers it compiles, that the
compiled generator gives the eager frames, that a compiler failure anywhere (UNet step or VAE decode) turns the
whole generator back to eager for good, and the configuration rules. Dynamo is real here; the backend is
torch.compile's 'eager' (inductor's code generation is what the GPU benchmarks and `tests/gpu` measure)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compiled_copies import compiled_copy
from PIL import Image

from daemon.config import ModelConfig
from daemon.errors import ConfigError
from daemon.generate import compile_cache
from daemon.generate.base import GenerationRequest
from daemon.generate.compile_cache import GuardedCompile
from daemon.generate.i2vgenxl import I2VGenXLGenerator, load_generator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def eager(tmp_path_factory: pytest.TempPathFactory) -> I2VGenXLGenerator:
    return load_generator(ModelConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("cache")))


def fresh_copy(eager: I2VGenXLGenerator, backend: Any, compile_vae: bool = True) -> I2VGenXLGenerator:
    """A generator on deep copies of the eager one's UNet and VAE, compiled per layer with `backend`."""
    return compiled_copy(eager, backend, compile_vae=compile_vae)


def request(mode: str = "exact") -> GenerationRequest:
    pixels = np.random.default_rng(3).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return GenerationRequest(Image.fromarray(pixels), "a red kite", "", 64, 64, 8, 8, 3, 9.0, 5, mode=mode)


def layer_count(*models: torch.nn.Module) -> int:
    return sum(type(m).__name__ in compile_cache.REGION_CLASSES for model in models for m in model.modules())


@pytest.mark.slow
def test_blocks_scope_compiles_every_layer_and_keeps_the_frames(eager: I2VGenXLGenerator) -> None:
    generator = fresh_copy(eager, "eager")
    parts = generator.components
    expected = layer_count(parts.unet, parts.vae.decoder)
    assert generator.step_fn.regions == expected > 20
    assert all(m._compiled_call_impl is not None for m in parts.unet.modules() if type(m).__name__ == "ResnetBlock2D")
    for mode in ("exact", "fast"):
        want = eager.render_batch([request(mode)], mode=mode)[0].frames
        got = generator.render_batch([request(mode)], mode=mode)[0].frames
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert generator.step_fn.active and generator.step_fn.failure is None


def broken_backend(graph: Any, example_inputs: Any) -> Any:
    raise RuntimeError("inductor: no working C compiler")


@pytest.mark.slow
def test_a_compiler_failure_in_a_layer_turns_everything_back_to_eager(eager: I2VGenXLGenerator) -> None:
    """The failure surfaces inside the UNet step (the first compiled layer called); the job still gets the eager
    frames, every layer is uncompiled (the VAE decoder's too), and later jobs never try again."""
    generator = fresh_copy(eager, broken_backend)
    want = eager.render(request()).frames
    got = generator.render(request()).frames
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not generator.step_fn.active and generator.step_fn.regions == 0
    assert "no working C compiler" in (generator.step_fn.failure or "")
    parts = generator.components
    layers = [m for model in (parts.unet, parts.vae.decoder) for m in model.modules()]
    assert all(m._compiled_call_impl is None for m in layers if type(m).__name__ in compile_cache.REGION_CLASSES)
    np.testing.assert_allclose(generator.render(request()).frames, want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("compile_vae", [True, False])
def test_a_failure_inside_the_decode_falls_back_only_when_the_decoder_is_compiled(
    eager: I2VGenXLGenerator, monkeypatch: pytest.MonkeyPatch, compile_vae: bool
) -> None:
    """With the decoder's layers compiled, an error inside the decode is taken for a compile failure: everything is
    uncompiled and the decode runs again eager. Without them, a decode error is the decode's own and propagates."""
    from daemon.generate import batch_render

    generator = fresh_copy(eager, "eager", compile_vae=compile_vae)
    real, calls = batch_render.decode, []

    def decode_failing_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor: C++ compile error")
        return real(*args)

    monkeypatch.setattr(batch_render, "decode", decode_failing_once)
    if not compile_vae:
        with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):
            generator.render(request())
        assert generator.step_fn.active and generator.step_fn.failure is None
        return
    np.testing.assert_allclose(generator.render(request()).frames, eager.render(request()).frames, atol=1e-5)
    assert len(calls) == 3  # failed, again eager, then the eager generator's own
    assert not generator.step_fn.active and generator.step_fn.regions == 0


def one_layer() -> tuple[torch.nn.Module, ...]:
    from diffusers.models.upsampling import Upsample2D

    return (Upsample2D(2),)


def test_a_fallback_calls_its_hook_once_before_the_eager_call() -> None:
    """`on_fallback` (the generator's `gpu_speed.eager_layout`: what pays only when compiled) runs at the fallback,
    before the eager call that follows it, and never again."""
    order: list[str] = []

    def eager_call(x: torch.Tensor) -> torch.Tensor:
        order.append("eager")
        return x * 2

    guarded = GuardedCompile(
        eager_call, "default", scope="step", backend=broken_backend, on_fallback=lambda: order.append("hook")
    )
    assert torch.equal(guarded(torch.ones(2)), torch.full((2,), 2.0))
    guarded(torch.ones(2))
    assert order == ["hook", "eager", "eager"] and not guarded.active


def test_run_guards_other_work_and_lets_out_of_memory_through() -> None:
    """`run` is how the VAE decode goes under the same fallback as the step, when layers are compiled."""
    layers = one_layer()
    guarded = GuardedCompile(lambda x: x, "default", scope="blocks", regions=layers, backend="eager")
    assert guarded.regions == 1
    calls: list[int] = []

    def decode_failing_once(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("triton: compilation failed")
        return x * 2

    assert guarded.run(decode_failing_once, 3, through=layers[0]) == 6 and calls == [3, 3]
    assert not guarded.active and guarded.regions == 0 and "triton" in (guarded.failure or "")

    def out_of_memory(x: int) -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    layers = one_layer()
    guarded = GuardedCompile(lambda x: x, "default", scope="blocks", regions=layers, backend="eager")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        guarded.run(out_of_memory, 1, through=layers[0])
    assert guarded.active


def test_run_without_compiled_layers_is_a_plain_call() -> None:
    """With the whole step compiled, a decode error is the decode's own: it propagates and the step stays compiled."""
    guarded = GuardedCompile(lambda x: x, "default", scope="step", backend="eager")

    def broken_decode(x: int) -> int:
        raise RuntimeError("cuDNN error")

    with pytest.raises(RuntimeError, match="cuDNN"):
        guarded.run(broken_decode, 1, through=torch.nn.Linear(2, 2))
    assert guarded.active and guarded.failure is None


def test_a_blocks_compile_needs_models() -> None:
    with pytest.raises(ValueError, match="needs the models"):
        GuardedCompile(lambda x: x, "default", scope="blocks")


def test_the_layer_cache_limit_is_raised() -> None:
    import torch._dynamo

    compile_cache.compile_regions([torch.nn.Linear(2, 2)], "default", backend="eager")
    limits = torch._dynamo.config
    limit = getattr(limits, "recompile_limit", None) or limits.cache_size_limit
    assert limit >= compile_cache.REGION_CACHE_LIMIT


@pytest.mark.parametrize(
    ("mode", "scope", "resolved"),
    [
        ("default", "auto", "blocks"),
        ("max-autotune-no-cudagraphs", "auto", "blocks"),
        ("reduce-overhead", "auto", "step"),
        ("max-autotune", "auto", "step"),
        ("reduce-overhead", "step", "step"),
        ("default", "step", "step"),
        ("off", "auto", "blocks"),
    ],
)
def test_compile_scope_resolution(mode: str, scope: str, resolved: str) -> None:
    assert ModelConfig(compile=mode, compile_scope=scope).resolved_compile_scope == resolved  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_are_refused_per_layer(tmp_path: Path, mode: str) -> None:
    from daemon.config import load_config

    path = tmp_path / "daemon.yaml"
    path.write_text(f"model:\n  compile: {mode}\n  compile_scope: blocks\n")
    with pytest.raises(ConfigError, match=r"needs model\.compile_scope"):
        load_config(path)


def test_loading_pauses_automatic_collections_and_restores_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from daemon.generate import i2vgenxl

    seen: list[bool] = []
    real = i2vgenxl.load_components

    def spying(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(i2vgenxl, "load_components", spying)
    assert gc.isenabled()
    load_generator(ModelConfig(device="cpu", cache_dir=tmp_path))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        with i2vgenxl.collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()


@pytest.mark.slow
def test_the_warm_up_compiles_every_listed_batch_size_before_ready(eager: I2VGenXLGenerator, tmp_path: Path) -> None:
    """Every batch size is its own set of static-shape layer graphs: after a warm-up over sizes 1 and 2, a batch
    of two jobs compiles nothing more (dynamo counts its compiled frames), while a size left out (3) still does."""
    from torch._dynamo.utils import counters

    generator = fresh_copy(eager, "eager", compile_vae=False)
    stale = compile_cache.cache_root(tmp_path) / "mega-of-an-older-torch.bin"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 40 * 86400,) * 2)
    warm = generator.warm_up(tmp_path, width=64, height=64, num_frames=8, batch_sizes=(1, 2), prune_after_days=30)
    assert warm["batch_sizes"] == [1, 2]
    assert warm["pruned"] == [stale.name] and not stale.exists()

    def compiled_frames() -> int:
        return int(sum(counters["frames"].values()))

    def batch(size: int) -> list[GenerationRequest]:
        return [
            GenerationRequest(Image.new("RGB", (64, 64)), "a kite", "", 64, 64, 8, 8, 2, 9.0, s) for s in range(size)
        ]

    before = compiled_frames()
    generator.render_batch(batch(2))
    assert compiled_frames() == before
    generator.render_batch(batch(3))
    assert compiled_frames() > before


def test_the_daemon_prunes_with_the_configured_age(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def spying(self: I2VGenXLGenerator, cache_dir: Path, **kwargs: Any) -> dict[str, object]:
        seen.update(kwargs, cache_dir=cache_dir)
        return {}

    monkeypatch.setattr(I2VGenXLGenerator, "warm_up", spying)
    load_generator(ModelConfig(device="cpu", cache_dir=tmp_path, compile_cache_max_age_days=7))
    assert seen["prune_after_days"] == 7 and seen["cache_dir"] == tmp_path


def test_warm_up_batch_sizes_are_sorted_and_must_fit_the_batch_limit() -> None:
    from daemon.config import DaemonConfig

    assert ModelConfig(warm_up_batch_sizes=(4, 1, 2, 1)).warm_up_batch_sizes == (1, 2, 4)
    with pytest.raises(ValueError, match=r"larger than worker\.max_batch_size"):
        DaemonConfig(model={"warm_up_batch_sizes": [1, 8]}, worker={"max_batch_size": 4})
    with pytest.raises(ValueError):
        ModelConfig(warm_up_batch_sizes=())


def test_inductor_caches_go_to_the_model_cache_even_after_diffusers_set_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing diffusers writes torch's default (/tmp/torchinductor_<user>) into TORCHINDUCTOR_CACHE_DIR; under
    the unit's PrivateTmp that cache would vanish at each restart. A directory the operator chose is kept."""
    import diffusers  # noqa: F401  (the import that sets the default)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    compile_cache.point_caches_at(tmp_path)
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == compile_cache.cache_root(tmp_path) / "inductor"
    assert Path(os.environ["TRITON_CACHE_DIR"]) == compile_cache.cache_root(tmp_path) / "triton"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    compile_cache.point_caches_at(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "operator")

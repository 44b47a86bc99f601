"""`torch.compile` for the UNet step, with a fallback to eager and a compile cache that survives restarts.

Why: compiling the full-size UNet costs minutes (185 s measured with stock settings) and would be paid at every
start. Three layers keep it off the restart path: inductor's and Triton's on-disk caches are pointed into the model
cache directory (`<cache_dir>/compile/`); after the first compiled run the "mega-cache"
(`torch.compiler.save_cache_artifacts`) is written there too and loaded before the next start compiles; and with
the per-layer scope each layer's graph is saved whole (`precompile`), so a restart does not even trace them. A compile
that fails (unsupported op, missing compiler toolchain) must never fail a job: the step falls back to eager for
the rest of the process and says so once; only out-of-memory errors pass through, for the degrade ladder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daemon.fsio import atomic_write_bytes

if TYPE_CHECKING:
    from daemon.generate import precompile

log = logging.getLogger(__name__)

CompileMode = str
"""'off', 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune-no-cudagraphs' or 'max-autotune'."""

CompileScope = str
"""'step': the whole UNet step is one graph; 'blocks': every layer of `REGION_CLASSES` is its own graph."""

REGION_CLASSES = frozenset(
    {
        "ResnetBlock2D",
        "TemporalConvLayer",
        "Transformer2DModel",
        "TransformerTemporalModel",
        "Downsample2D",
        "Upsample2D",
    }
)
"""The layers a block-scope compile compiles (diffusers' "regional compilation", `compile_repeated_blocks`). The
I2VGen-XL UNet calls them 83 times per step with 33 distinct (class, weight shapes, input shapes; 43 with
channels-last weights, as precompiled graphs, BENCHMARKS.md): dynamo traces
each distinct one once and reuses it for the other instances, and the glue between them (concatenations, reshapes)
stays eager. The shallow (fast mode) pass is made of the same layers, so it needs no graph of its own."""

REGION_CACHE_LIMIT = 256
"""Every compiled layer runs through `nn.Module._call_impl`, so all layer graphs share one code object's cache,
which dynamo limits to 8 entries by default (then it silently runs the rest eager). One batch size needs 33 for
the UNet and about 10 for the VAE decoder; each further batch size or resolution its own set."""


def cache_root(cache_dir: Path) -> Path:
    return cache_dir / "compile"


def point_caches_at(cache_dir: Path) -> None:
    """Inductor and Triton keep their caches under the model cache dir unless the operator's environment says where.

    Importing diffusers already asks inductor for its cache directory, which writes torch's default
    (`/tmp/torchinductor_<user>`) into `TORCHINDUCTOR_CACHE_DIR`; that value is taken for unset, or the cache would
    live in the unit's private /tmp (`PrivateTmp=yes`) and be gone at every restart."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


STALE_PATTERNS = ("mega-*.bin", "layers-*")
"""Our own artefacts in the cache root (inductor's and Triton's folders are torch's to manage)."""


def prune_stale(cache_dir: Path, in_use: Sequence[Path], max_age_days: float) -> list[str]:
    """Mark `in_use` as used now and delete our other artefacts not used for `max_age_days` (0: keep everything);
    returns the names deleted.

    Why: the artefacts are keyed by torch version, GPU, model and compile mode (the layer graphs also by the code
    they were traced from, `precompile.code_fingerprint`), so every upgrade leaves the old ones behind (~80 MB of
    layer graphs and ~50 MB of mega-cache per key at 512p). Age, not the key, decides,
    because workers of other models may share the cache dir: each marks its own at every start, and one that was
    not restarted for `max_age_days` only pays a compile at its next start (graphs it saves meanwhile go into a
    folder made again). Links are left alone."""
    for path in in_use:
        try:
            os.utime(path)
        except FileNotFoundError:
            pass  # not saved (nothing compiled, or the save failed)
        except OSError as exc:  # a read-only cache: nothing of ours will be deleted either
            log.warning("compile artefact %s not marked as used: %s", path.name, exc)
    if max_age_days <= 0:
        return []
    root = cache_root(cache_dir)
    keep = {path.resolve() for path in in_use}
    cutoff = time.time() - max_age_days * 86400
    removed = []
    for pattern in STALE_PATTERNS:
        for entry in sorted(root.glob(pattern)):
            try:
                if entry.is_symlink() or entry.resolve() in keep or entry.stat().st_mtime >= cutoff:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:  # another worker deleting it too, or no permission: not this start's problem
                log.warning("stale compile artefact %s not removed: %s", entry.name, exc)
                continue
            removed.append(entry.name)
    return removed


def artifact_key(model_config: Any, mode: CompileMode, extra: str = "") -> str:
    """What a compiled artefact depends on: torch version, GPU, model shape, compile mode (and the caller's extra)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload = json.dumps([torch.__version__, device, dict(model_config), mode, extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_artifacts(path: Path) -> bool:
    """Feed a saved mega-cache to torch before compiling; False when there is none or it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        return torch.compiler.load_cache_artifacts(data) is not None
    except Exception as exc:
        log.warning("compile cache %s unusable, compiling from scratch: %s", path, exc)
        return False


def save_artifacts(path: Path) -> int:
    """Write the mega-cache atomically (temp file + rename); returns its size (0: nothing saved). A cache that
    cannot be written costs the next start a compile, never this start."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        data = saved[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return len(data)
    except Exception as exc:
        log.warning("compile cache %s not saved: %s", path, exc)
        return 0


Backend = str | Callable[..., Any]
"""torch.compile's backend: 'inductor', or e.g. 'eager' / a callable in tests."""


def compile_regions(
    models: Sequence[torch.nn.Module],
    mode: CompileMode,
    backend: Backend = "inductor",
    layer_graphs: precompile.LayerGraphs | None = None,
) -> list[torch.nn.Module]:
    """Compile every `REGION_CLASSES` layer of `models` in place; returns them. With `layer_graphs` each layer runs
    saved ahead-of-time compiled graphs (`precompile`), else `nn.Module.compile` (dynamo at every start)."""
    raise_graph_limits()
    regions = [module for model in models for module in model.modules() if type(module).__name__ in REGION_CLASSES]
    if layer_graphs is not None:
        layer_graphs.install(regions)
        return regions
    for module in regions:
        module.compile(**dynamo_compile_kwargs(mode, backend))
    return regions


def raise_graph_limits() -> None:
    """Dynamo's per-code-object graph limits raised to `REGION_CACHE_LIMIT` (never lowered): every compiled layer
    shares `nn.Module._call_impl`'s code object."""
    import torch._dynamo

    limits = torch._dynamo.config
    name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"
    setattr(limits, name, max(getattr(limits, name), REGION_CACHE_LIMIT))
    limits.accumulated_cache_size_limit = max(limits.accumulated_cache_size_limit, 4 * REGION_CACHE_LIMIT)


def dynamo_compile_kwargs(mode: CompileMode, backend: Backend) -> dict[str, Any]:
    """Static shapes, graph breaks allowed; the mode only means something to inductor."""
    kwargs: dict[str, Any] = {"fullgraph": False, "dynamic": False, "backend": backend}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode
    return kwargs


def uncompile_regions(regions: list[torch.nn.Module]) -> None:
    """Undo `compile_regions`: the layers run their eager `forward` again."""
    for module in regions:
        module._compiled_call_impl = None


class GuardedCompile:
    """A compiled callable that turns into its eager original at the first compile failure.

    `scope` 'step' compiles `eager` itself; 'blocks' compiles the layers of `regions` (`compile_regions`) and calls
    `eager`, which runs them; `run` puts other work that goes through one of those models (the VAE decode) under
    the same fallback. `backend` is torch.compile's (tests use 'eager' to check the wiring on the CPU). With
    `layer_graphs` (scope 'blocks' only) the layers' compiled graphs are saved whole and loaded at the next start;
    `on_fallback` runs once when it falls back."""

    def __init__(
        self,
        eager: Callable[..., Any],
        mode: CompileMode,
        *,
        scope: CompileScope = "step",
        regions: Sequence[torch.nn.Module] = (),
        backend: Backend = "inductor",
        layer_graphs: precompile.LayerGraphs | None = None,
        on_fallback: Callable[[], object] | None = None,
    ) -> None:
        self.eager = eager
        self.on_fallback = on_fallback
        """Called once at a fallback, before the eager call (the generator puts back what only pays compiled)."""
        self.mode = mode
        self.scope = scope
        self.compiled: Callable[..., Any] | None = None
        self.failure: str | None = None
        self._regions: list[torch.nn.Module] = []
        self._compiled_models: tuple[torch.nn.Module, ...] = ()
        self.layer_graphs = layer_graphs if scope == "blocks" and mode != "off" else None
        if mode == "off":
            return
        if scope == "blocks":
            if not regions:
                raise ValueError("a 'blocks' compile needs the models whose layers it compiles")
            self._regions = compile_regions(regions, mode, backend, self.layer_graphs)
            self._compiled_models = tuple(regions)
            self.compiled = eager
        else:
            self.compiled = torch.compile(eager, **dynamo_compile_kwargs(mode, backend))

    @property
    def active(self) -> bool:
        return self.compiled is not None

    @property
    def regions(self) -> int:
        """How many layers are compiled (0 with scope 'step' or after a fallback)."""
        return len(self._regions)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            self._fall_back(exc)
            return self.eager(*args)

    def run(self, function: Callable[..., Any], *args: Any, through: torch.nn.Module) -> Any:
        """`function(*args)`, which goes through the model `through`: when that model's layers are compiled, a
        failure inside it uncompiles every layer and it runs again eager. Otherwise a plain call (its errors are
        its own). Out-of-memory errors pass through for the degrade ladder."""
        if not any(through is model for model in self._compiled_models):
            return function(*args)
        try:
            return function(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            self._fall_back(exc)
            return function(*args)

    def _fall_back(self, exc: Exception) -> None:
        self.failure = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("torch.compile (%s) failed, running eager from now on: %s", self.mode, self.failure)
        self.compiled = None
        uncompile_regions(self._regions)
        self._regions = []
        self._compiled_models = ()
        self.layer_graphs = None
        if self.on_fallback is not None:
            self.on_fallback()

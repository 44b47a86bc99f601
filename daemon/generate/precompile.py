"""Per-layer compiled graphs kept whole on disk, so a restart loads them instead of tracing every layer again.

Why: with a warm inductor cache a restart still runs dynamo over each of the 33 layer graphs (bytecode tracing,
AOTAutograd, building guards), ~5.6 s of the 10.6 s warm-up of the full-size model on the H200 (BENCHMARKS.md,
"Restart to READY"). torch's ahead-of-time compile (`torch.compile(fn, fullgraph=True).aot_compile`) captures one
layer call as a self-contained artefact: the compiled graph and its guards, serialised. `load_compiled_function`
brings it back without tracing anything. On the tiny model on the CPU (inductor), the first video after a restart
took 6.65 s through dynamo's caches and 2.43 s from these artefacts.

How it is used: `LayerGraphs.install` replaces each layer's compiled call (what `nn.Module.compile` sets) with a
`PrecompiledLayer`. The store is named after the model, mode, torch, GPU and the traced code (`code_fingerprint`).
A call's signature (the layer's class and weight shapes and strides, every input's shape, stride, dtype and
device, the plain values, the grad mode) names a group of artefacts; the first whose guards accept the call runs
it (guards tell apart same-shaped layers with different constants, e.g. the mid block's `output_scale_factor`).
None saved, or none accepting: it is compiled now and saved. Instances of the same layer with the same weight shapes
share the artefact, as dynamo shares its graphs: the weights are inputs, not constants.

Guards that cannot be serialised (identity of the module's global functions and builtins) are left out, as torch's
own precompile does; the signature covers what they would have protected against in this process. A call that
cannot be compiled this way (a graph break, an input that is neither tensor nor plain value) runs through an
ordinary dynamo compile of that layer instead; an artefact that cannot be loaded (truncated, another torch) is
deleted and compiled again. Out-of-memory errors pass through for the degrade ladder; every other compile failure
goes up to `GuardedCompile`, which runs eager from then on.

The artefacts are pickles: they are read from the model cache directory only, which belongs to the service (never
from the inbox).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.exc import BackendCompilerFailed

from daemon.fsio import atomic_write_bytes
from daemon.generate.compile_cache import Backend, dynamo_compile_kwargs

log = logging.getLogger(__name__)

SUFFIX = ".aot"
THROUGH_DYNAMO = object()
"""What a layer call that cannot be precompiled is bound to: an ordinary dynamo compile of the layer."""


class UnsupportedCall(Exception):
    """A layer call whose inputs cannot be part of a signature."""


def available() -> bool:
    """Whether this torch can save and load ahead-of-time compiled functions (experimental since torch 2.9)."""
    import torch._dynamo

    return hasattr(torch.compiler, "load_compiled_function") and hasattr(torch._dynamo.config, "enable_aot_compile")


def code_fingerprint() -> str:
    """What the layers' traced code is, beyond torch (which the store's name already covers): diffusers' version
    and the source of `gpu_speed`, whose attention processor runs inside every attention layer's graph. The saved
    guards leave out the identity of the functions a graph was traced from, so without this an upgraded daemon
    would load graphs of the code it replaced and run that instead."""
    import diffusers

    from daemon.generate import gpu_speed

    digest = hashlib.sha256(diffusers.__version__.encode())
    digest.update(Path(gpu_speed.__file__).read_bytes())
    return digest.hexdigest()[:16]


def value_signature(value: object) -> Hashable:
    """What a compiled graph is specialised on for one input (static shapes): a tensor's shape, strides, dtype,
    device and grad flag; a plain value itself; containers element by element."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, bool | int | float | str):
        return (type(value).__name__, value)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(value_signature(item) for item in value))
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return ("dict", tuple((key, value_signature(value[key])) for key in sorted(value)))
    raise UnsupportedCall(f"cannot key a compiled layer on a {type(value).__name__}")


def state_signature(module: torch.nn.Module) -> Hashable:
    """The classes of the layer and of each of its submodules (and their attention processors, with their
    settings), and the names, shapes, strides and dtypes of its weights and buffers (their device is checked per
    call: offloading moves models). Weights are graph inputs, and a graph is specialised on their layout as on any
    input's (channels-last convolution weights need their own graphs); a submodule's class is its code
    (`model.split_linear_bias` swaps `Linear` for `gpu_speed.BiasAfterLinear`, same weights). The signature is
    taken when the layer is installed, so a layout or class change means installing again."""
    classes = tuple((name, _qualified(sub), _processor(sub)) for name, sub in module.named_modules())
    tensors = [*module.named_parameters(), *module.named_buffers()]
    weights = tuple((name, tuple(t.shape), t.stride(), t.dtype) for name, t in tensors)
    return (classes, weights)


def _qualified(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _processor(module: torch.nn.Module) -> Hashable:
    """An attention layer's processor: its class and its plain settings (`AttentionProcessor.fuse_projections`)."""
    processor = getattr(module, "processor", None)
    if processor is None:
        return None
    settings = getattr(processor, "__dict__", {})
    plain = tuple(sorted((k, v) for k, v in settings.items() if isinstance(v, (bool, int, float, str, type(None)))))
    return (_qualified(processor), plain)


def serialisable_guards(entries: Sequence[Any]) -> list[bool]:
    """torch's default filter for precompiled functions: no guards on globals, none of the types it cannot save."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (entry.is_global or entry.guard_type in unsupported or unsupported.intersection(entry.derived_guard_types))
        for entry in entries
    ]


@dataclasses.dataclass
class LayerGraphStats:
    """What the store did since it was made (logged with the warm-up)."""

    loaded: int = 0
    compiled: int = 0
    discarded: int = 0
    dynamo_fallbacks: int = 0
    load_seconds: float = 0.0
    compile_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        return {key: round(value, 2) if isinstance(value, float) else value for key, value in values.items()}


class LayerGraphs:
    """The artefacts of one model's layers in `directory` (named after the model, mode and torch, see
    `compile_cache.artifact_key`), loaded on first use and compiled when missing."""

    def __init__(self, directory: Path, mode: str, backend: Backend = "inductor") -> None:
        self.directory = directory
        self.mode = mode
        self.backend = backend
        self.stats = LayerGraphStats()
        self._groups: dict[str, list[Any]] = {}

    def install(self, layers: Sequence[torch.nn.Module]) -> None:
        """Route every call of each layer through its precompiled graphs (what `nn.Module.compile` does with dynamo)."""
        for layer in layers:
            layer._compiled_call_impl = PrecompiledLayer(layer, self)

    def function_for(self, layer: torch.nn.Module, signature: Hashable, args: tuple[Any, ...], kwargs: Any) -> Any:
        """The saved (or now compiled and saved) function that accepts this call."""
        digest = hashlib.sha256(repr(signature).encode()).hexdigest()[:24]
        group = self._groups.get(digest)
        if group is None:
            group = self._groups[digest] = self._load(digest)
        for function in group:
            if function.guard_check(layer, *args, **kwargs):
                return function
        function = self._compile(layer, args, kwargs)
        self._save(digest, function)
        group.append(function)
        return function

    def _load(self, digest: str) -> list[Any]:
        functions = []
        for path in sorted(self.directory.glob(f"{digest}-*{SUFFIX}")):
            started = time.perf_counter()
            try:
                with path.open("rb") as source:
                    function: Any = torch.compiler.load_compiled_function(source)
            except Exception as exc:
                log.warning("precompiled layer %s unusable, compiling it again: %s", path.name, exc)
                path.unlink(missing_ok=True)
                self.stats.discarded += 1
                continue
            function.disable_guard_check()  # checked by `function_for`, before the call
            functions.append(function)
            self.stats.loaded += 1
            self.stats.load_seconds += time.perf_counter() - started
        return functions

    def _compile(self, layer: torch.nn.Module, args: tuple[Any, ...], kwargs: Any) -> Any:
        started = time.perf_counter()
        options: dict[str, Any] = {"guard_filter_fn": serialisable_guards}
        if self.backend == "inductor":
            from torch._inductor import list_mode_options

            options.update(list_mode_options(self.mode))
        # The `aot_compile` entry point exists only when this flag is on at `torch.compile` time (off by default
        # in torch 2.11, on from 2.13).
        with torch._dynamo.config.patch(enable_aot_compile=True):
            compiled: Any = torch.compile(
                type(layer).forward, fullgraph=True, dynamic=False, backend=self.backend, options=options
            )
        function = compiled.aot_compile(((layer, *args), dict(kwargs)))
        function.disable_guard_check()
        self.stats.compiled += 1
        self.stats.compile_seconds += time.perf_counter() - started
        return function

    def _save(self, digest: str, function: Any) -> None:
        """Atomically (temp file + rename), named by content so that two processes never overwrite each other's
        variants. A failed save costs the next start a compile of this layer, never this call."""
        try:
            data = type(function).serialize(function).serialized_data
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.directory / f"{digest}-{hashlib.sha256(data).hexdigest()[:12]}{SUFFIX}", data)
        except Exception as exc:
            log.warning("precompiled layer not saved: %s", exc)


class PrecompiledLayer:
    """One layer's compiled call: picks (once per signature) the store's function for it and calls it with the
    layer. Hooks would be skipped by a compiled `forward`, so while the layer or every module has hooks (torch's
    flop counter and module tracker install global ones) the call runs its normal, eager way, and nothing about
    the signature is decided then."""

    def __init__(self, layer: torch.nn.Module, store: LayerGraphs) -> None:
        self.layer = layer
        self.store = store
        self._state = state_signature(layer)
        self._chosen: dict[Hashable, Any] = {}
        """Per call signature: the loaded function (its guards checked once), or `THROUGH_DYNAMO`."""
        self._dynamo: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        if layer._forward_hooks or layer._forward_pre_hooks or _global_hooks():
            normal_call: Callable[..., Any] = layer._call_impl
            return normal_call(*args, **kwargs)
        try:
            parameter = next(layer.parameters(), None)
            call = (
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
                None if parameter is None else parameter.device,
                value_signature(args),
                value_signature(kwargs),
            )
        except UnsupportedCall:
            return self._through_dynamo(*args, **kwargs)
        function: Any = self._chosen.get(call)
        if function is None:
            try:
                function = self.store.function_for(layer, (self._state, call), args, kwargs)
            except (torch.cuda.OutOfMemoryError, BackendCompilerFailed):
                raise  # code generation would fail the same way under dynamo: `GuardedCompile` goes eager
            except Exception as exc:  # a graph break under fullgraph, a guard torch cannot save, an older torch
                log.warning("layer %s not precompiled, compiling it with dynamo: %s", type(layer).__name__, exc)
                self.store.stats.dynamo_fallbacks += 1
                function = THROUGH_DYNAMO
            self._chosen[call] = function
        if function is THROUGH_DYNAMO:
            return self._through_dynamo(*args, **kwargs)
        return function(layer, *args, **kwargs)

    def _through_dynamo(self, *args: Any, **kwargs: Any) -> Any:
        if self._dynamo is None:  # what `nn.Module.compile` would install
            options = dynamo_compile_kwargs(self.store.mode, self.store.backend)
            self._dynamo = torch.compile(self.layer._call_impl, **options)
        return self._dynamo(*args, **kwargs)


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)

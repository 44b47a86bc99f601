"""`torch.compile` for the UNet step, with a fallback to eager and a compile cache that survives restarts.

Why: compiling the full-size UNet costs minutes (185 s measured with stock settings) and would be paid at every
start. Two layers keep it off the restart path: inductor's and Triton's on-disk caches are pointed into the model
cache directory (`<cache_dir>/compile/`), and after the first compiled run the "mega-cache"
(`torch.compiler.save_cache_artifacts`) is written there too and loaded before the next start compiles. A compile
that fails (unsupported op, missing compiler toolchain) must never fail a job: the step falls back to eager for
the rest of the process and says so once; only out-of-memory errors pass through, for the degrade ladder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CompileMode = str
"""'off', 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune-no-cudagraphs' or 'max-autotune'."""


def cache_root(cache_dir: Path) -> Path:
    return cache_dir / "compile"


def point_caches_at(cache_dir: Path) -> None:
    """Inductor and Triton keep their caches under the model cache dir unless the environment already says where."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


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
        handle, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
        return len(data)
    except Exception as exc:
        log.warning("compile cache %s not saved: %s", path, exc)
        return 0


class GuardedCompile:
    """A compiled callable that turns into its eager original at the first compile failure."""

    def __init__(self, eager: Callable[..., Any], mode: CompileMode) -> None:
        self.eager = eager
        self.mode = mode
        self.compiled: Callable[..., Any] | None = None
        self.failure: str | None = None
        if mode != "off":
            chosen = None if mode == "default" else mode
            self.compiled = torch.compile(eager, fullgraph=False, dynamic=False, mode=chosen)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("torch.compile (%s) failed, running eager from now on: %s", self.mode, self.failure)
            self.compiled = None
            return self.eager(*args)

"""The embedded tiny I2VGen-XL: real diffusers/transformers classes, tiny widths, deterministic random weights.

Why it exists: model weights cannot be downloaded where the daemon is developed and tested, yet every code path
(loading with `from_pretrained`, the sampling loop, decoding) must run for real. The configs shipped in
`daemon/generate/tiny/` keep the published model's shape relations (four VAE levels, so latents are 1/8 of the
image; four UNet levels with the published block types; temporal layers; the published scheduler and feature
extractor) with widths small enough for a CPU. `materialize_tiny_model` turns them into an ordinary diffusers
directory, so the daemon loads the tiny model through exactly the same path as real weights.

Builds are deterministic (a fixed seed before each component) and idempotent: the directory name and the
marker file carry a key over the shipped files, the build recipe and the library versions; a build happens in a
temporary directory that is renamed into place only once complete, so a killed or concurrent build never leaves
a half model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).with_name("tiny")
MARKER_NAME = "i2vd-tiny.json"
RECIPE_VERSION = 1
"""Bump when the build recipe below changes in a way that changes the produced files."""

COPIED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
)
WEIGHT_SEEDS = {"text_encoder": 1, "image_encoder": 2, "vae": 3, "unet": 4}
"""One fixed seed per component, so a component's weights do not depend on the others' construction."""

STALE_TEMP_SECONDS = 3600.0


def _library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _shipped_files() -> list[Path]:
    """The config and tokenizer files that define the tiny model (what package-data ships)."""
    return sorted(path for path in SHIPPED_DIR.rglob("*") if path.is_file() and path.suffix in {".json", ".txt"})


def build_key() -> str:
    """A hash of everything the built files depend on: shipped files, recipe version, library versions."""
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION}\n".encode())
    digest.update(json.dumps(_library_versions(), sort_keys=True).encode())
    for path in _shipped_files():
        digest.update(path.relative_to(SHIPPED_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def materialize_tiny_model(cache_dir: Path) -> Path:
    """Return a complete diffusers directory for the tiny model under `cache_dir`, building it if needed."""
    key = build_key()
    target = cache_dir / "embedded-tiny" / key[:16]
    if _is_complete(target, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    temp = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))
    try:
        _build_into(temp, key)
        _publish(temp, target, key)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def tiny_revision(model_dir: Path) -> str:
    """The content hash of a materialised tiny model's weights, recorded in its marker at build time."""
    marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    return str(marker["revision"])


def _is_complete(directory: Path, key: str) -> bool:
    """Complete = the marker (written last) matches `key` and every file it lists has the recorded size."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
        files: dict[str, int] = marker["files"]
        return bool(marker["key"] == key) and all(
            (directory / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(temp: Path, target: Path, key: str) -> None:
    """Atomically rename the finished build into place; a complete copy from a concurrent build wins."""
    try:
        temp.rename(target)
        return
    except OSError:
        if _is_complete(target, key):
            return
    # An incomplete directory under the final name (only by outside damage): move it aside, then retry.
    broken = target.with_name(f".broken-{target.name}-{os.getpid()}")
    target.rename(broken)
    shutil.rmtree(broken, ignore_errors=True)
    temp.rename(target)


def _remove_stale_temps(parent: Path) -> None:
    """Delete leftovers of builds killed long ago (a live concurrent build is younger than the cutoff)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for entry in parent.glob(".*"):
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _build_into(directory: Path, key: str) -> None:
    """Write the shipped files, then each component's seeded weights, then the marker (last)."""
    for name in COPIED_FILES:
        destination = directory / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHIPPED_DIR / name, destination)
    for name, model in _build_models().items():
        model.save_pretrained(directory / name, safe_serialization=True)
    weights = sorted(path for path in directory.rglob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    files = {path.relative_to(directory).as_posix(): path.stat().st_size for path in directory.rglob("*")}
    marker = {
        "recipe": RECIPE_VERSION,
        "key": key,
        "revision": f"sha256:{digest.hexdigest()[:16]}",
        "versions": _library_versions(),
        "files": {name: size for name, size in sorted(files.items()) if (directory / name).is_file()},
    }
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _build_models() -> dict[str, Any]:
    """Construct each component from its shipped config right after seeding the global RNG with its own seed."""
    import torch
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    def config(name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((SHIPPED_DIR / name / "config.json").read_text(encoding="utf-8"))
        return loaded

    vae_class: Any = AutoencoderKL
    unet_class: Any = I2VGenXLUNet
    builders: dict[str, Callable[[], Any]] = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config("image_encoder"))),
        "vae": lambda: vae_class.from_config(config("vae")),
        "unet": lambda: unet_class.from_config(config("unet")),
    }
    models: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for name, build in builders.items():
            torch.manual_seed(WEIGHT_SEEDS[name])
            models[name] = build().eval()
    return models

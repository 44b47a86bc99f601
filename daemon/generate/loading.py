"""Loading I2VGen-XL's components: device and dtype resolution, a checked model directory, offline
`from_pretrained` with errors that name the component, and the embedded tiny model's materialisation.

Split from `i2vgenxl` (which re-exports `resolve_device_dtype` and `library_versions`) so that the generator module
holds only the running of jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from daemon.config import ModelConfig
from daemon.errors import ConfigError, DeviceUnavailable, FatalError
from daemon.generate import i2vgenxl_loop as loop
from daemon.generate.tiny import materialize_tiny_model

REQUIRED_FILES: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "scheduler": (("scheduler_config.json",),),
    "text_encoder": (("config.json",),),
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "image_encoder": (("config.json",),),
    "feature_extractor": (("preprocessor_config.json",),),
}
"""Per component, alternative sets of files of which one must be complete (transformers 5 saves a CLIP tokenizer
as tokenizer.json; the published repo ships vocab.json + merges.txt)."""


def library_versions() -> dict[str, str]:
    """Versions recorded in ModelInfo, since outputs depend on them. Plain `str`: `torch.__version__` is a
    `TorchVersion`, and unpickling one in the daemon's process (ModelInfo travels from the generation process)
    imported torch there, ~3 s of restart-to-READY on the GPU machine (BENCHMARKS.md) for nothing."""
    import diffusers
    import transformers

    return {
        "torch": str(torch.__version__),
        "diffusers": str(diffusers.__version__),
        "transformers": str(transformers.__version__),
    }


def resolve_device_dtype(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """`auto` means CUDA + float16 when CUDA is available, else CPU + float32; explicit values are honoured
    unless they cannot work (CUDA absent, float16 on the CPU), which is a configuration error."""
    cuda = torch.cuda.is_available()
    name = config.device if config.device != "auto" else ("cuda" if cuda else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise DeviceUnavailable(f"model.device: {name!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"model.device: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    dtype_name = config.dtype if config.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    if dtype_name == "float16" and device.type == "cpu":
        raise ConfigError("model.dtype: float16 is not supported on the CPU; use 'auto', 'float32' or 'bfloat16'")
    dtype: torch.dtype = getattr(torch, dtype_name)
    return device, dtype


def check_model_dir(directory: Path) -> None:
    """Fail early, naming what is missing and where, instead of a library traceback halfway through loading."""
    expected = "a diffusers I2VGen-XL directory (model_index.json, " + ", ".join(REQUIRED_FILES) + ")"
    if not directory.is_dir():
        raise FatalError(f"model directory {directory} does not exist (model.source); expected {expected}")
    missing = [] if (directory / "model_index.json").is_file() else ["model_index.json"]
    for name, alternatives in REQUIRED_FILES.items():
        if not any(all((directory / name / file).is_file() for file in files) for files in alternatives):
            missing.append(" or ".join("+".join(f"{name}/{file}" for file in files) for files in alternatives))
    if missing:
        raise FatalError(
            f"model directory {directory} is incomplete: missing {', '.join(missing)}; expected {expected}"
        )


def _load(cls: Any, directory: Path, name: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(directory/name)` offline; any failure is fatal and says which component and where."""
    path = directory / name
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise FatalError(f"cannot load {name} ({cls.__name__}) from {path}: {exc}") from exc


def _transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 calls the argument `dtype` (and warns about `torch_dtype`); older ones `torch_dtype`."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_components(
    directory: Path, device: torch.device, dtype: torch.dtype, *, direct: bool = False
) -> loop.Components:
    """Load every component with `from_pretrained` (the same path for real weights and the tiny model).

    `direct` has the libraries put the weights straight onto `device` (`device_map`) instead of materialising them
    in host memory and moving them. Off: on an H200 it was not faster (14.5 s against 13.5 s for the full-size model,
    bench/load_speed.py, BENCHMARKS.md "Restart to READY"); the option stays for re-measuring elsewhere."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    check_model_dir(directory)
    placement: dict[str, Any] = {"device_map": str(device)} if direct else {}
    text_kwargs = _transformers_dtype(dtype) | placement
    models = {
        "unet": _load(I2VGenXLUNet, directory, "unet", torch_dtype=dtype, **placement),
        "vae": _load(AutoencoderKL, directory, "vae", torch_dtype=dtype, **placement),
        "text_encoder": _load(CLIPTextModel, directory, "text_encoder", **text_kwargs),
        "image_encoder": _load(CLIPVisionModelWithProjection, directory, "image_encoder", **text_kwargs),
    }
    for model in models.values():
        model.to(device).eval()
    return loop.Components(
        **models,
        scheduler=_load(DDIMScheduler, directory, "scheduler"),
        tokenizer=_load(CLIPTokenizer, directory, "tokenizer"),
        feature_extractor=_load(CLIPImageProcessor, directory, "feature_extractor"),
    )


def quiet_progress_bars() -> None:
    """The daemon logs structured lines; the libraries' tqdm bars (loading/saving shards) would be noise."""
    import diffusers
    import transformers

    libraries: tuple[Any, ...] = (diffusers, transformers)
    for library in libraries:
        library.utils.logging.disable_progress_bar()


def embedded_tiny_dir(cache_dir: Path) -> Path:
    """Materialise the tiny model; a cache directory that cannot be written is fatal (config or disk problem)."""
    try:
        return materialize_tiny_model(cache_dir)
    except OSError as exc:
        raise FatalError(f"cannot build the embedded tiny model under {cache_dir} (model.cache_dir): {exc}") from exc

"""`load_components` with the weights put straight onto the device (`device_map`, the CUDA default) gives the
same model as loading into host memory and moving it (the older path), on the embedded tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.generate.loading import embedded_tiny_dir, load_components

pytestmark = pytest.mark.integration


def test_direct_placement_loads_the_same_weights(tmp_path: Path) -> None:
    directory = embedded_tiny_dir(tmp_path / "cache")
    cpu = torch.device("cpu")
    direct = load_components(directory, cpu, torch.float32, direct=True)
    via_host = load_components(directory, cpu, torch.float32, direct=False)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        first, second = getattr(direct, name).state_dict(), getattr(via_host, name).state_dict()
        assert first.keys() == second.keys(), name
        for key, tensor in first.items():
            assert tensor.device == cpu and tensor.dtype == second[key].dtype, (name, key)
            assert torch.equal(tensor, second[key]), (name, key)
        assert not getattr(direct, name).training

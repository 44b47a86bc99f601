"""Shared fixtures. Paths of the shipped config and examples, and a small valid image factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a small RGB gradient image; returns its path."""

    def factory(name: str = "cat.png", size: tuple[int, int] = (96, 64), directory: Path | None = None) -> Path:
        target = (directory or tmp_path) / name
        image = Image.new("RGB", size)
        image.putdata(
            [((x * 255) // size[0], (y * 255) // size[1], 128) for y in range(size[1]) for x in range(size[0])]
        )
        image.save(target)
        return target

    return factory

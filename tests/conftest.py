"""Shared fixtures. Paths of the shipped config and examples, and a small valid image factory."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.protocols
import pytest
from PIL import Image

from daemon.manifest import manifest_json_schema
from daemon.publish import STAGING_DIR_NAME

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """The tests model a terminal session. Run under `nohup` (or by a runner that ignores SIGHUP), this process
    and every `i2vd run` it starts would inherit SIGHUP ignored, which the daemon rightly keeps
    (tests/unit/test_signals.py tests that case on its own)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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


@pytest.fixture(scope="session")
def manifest_validator() -> jsonschema.protocols.Validator:
    """The shipped manifest JSON Schema (daemon/schemas/manifest.schema.json), checked itself first."""
    schema = manifest_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(schema)
    return validator


def assert_valid_manifest(validator: jsonschema.protocols.Validator, path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    errors = sorted(validator.iter_errors(data), key=lambda error: list(error.absolute_path))
    assert not errors, f"{path.name} does not match the manifest schema:\n" + "\n".join(
        f"  {'/'.join(str(p) for p in error.absolute_path)}: {error.message}" for error in errors
    )
    return data


@pytest.fixture(autouse=True)
def _every_manifest_matches_the_schema(
    request: pytest.FixtureRequest, manifest_validator: jsonschema.protocols.Validator
) -> Iterator[None]:
    """After every integration or acceptance test, validate every manifest it published under its tmp_path
    (outboxes, daily subfolders), so no test can produce a manifest the schema does not describe."""
    node = request.node
    checked = node.get_closest_marker("integration") is not None or node.get_closest_marker("acceptance") is not None
    root: Path | None = request.getfixturevalue("tmp_path") if checked and "tmp_path" in request.fixturenames else None
    yield
    if root is None:
        return
    for path in sorted(root.rglob("video_*.json")):
        if STAGING_DIR_NAME not in path.parts:
            assert_valid_manifest(manifest_validator, path)

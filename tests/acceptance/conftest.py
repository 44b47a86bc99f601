"""Fixtures of the acceptance tests (helpers live in opshelpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opshelpers import OpsDaemon, free_port


@pytest.fixture(scope="session")
def ops_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ops-model-cache")


@pytest.fixture
def ops_daemon(tmp_path: Path, ops_model_cache: Path) -> Iterator[Callable[..., OpsDaemon]]:
    """Start `i2vd run` on the tiny CPU model (64x64, 8 frames, 2 steps), metrics on a fixed free port."""
    started: list[OpsDaemon] = []

    def start(
        *extra_args: str, env: dict[str, str] | None = None, port: int | None = None, **overrides: Any
    ) -> OpsDaemon:
        config: dict[str, Any] = {
            "inbox": "inbox",
            "outbox": "outbox",
            "model": {
                "source": "embedded-tiny",
                "device": "cpu",
                "dtype": "float32",
                "cache_dir": str(ops_model_cache),
            },
            "generation": {"defaults": {"width": 64, "height": 64, "num_frames": 8, "steps": 2}},
            "intake": {"stable_seconds": 0.2, "rescan_seconds": 0.3},
            "worker": {"retry_delay_seconds": 0.5},
            "metrics": {"host": "127.0.0.1", "port": port if port is not None else free_port()},
            "logging": {"format": "json"},
        }
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value}
        daemon = OpsDaemon(tmp_path, config, env or {}, extra_args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()

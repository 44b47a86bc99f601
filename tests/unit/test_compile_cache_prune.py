"""Stale compile artefacts: what the warm-up deletes from `<cache_dir>/compile/` and what it must leave."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.config import ModelConfig
from daemon.generate import compile_cache

DAY = 86400


def aged(path: Path, days: float) -> Path:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))
    return path


def make_cache(tmp_path: Path) -> dict[str, Path]:
    root = compile_cache.cache_root(tmp_path)
    root.mkdir(parents=True)
    paths: dict[str, Path] = {}
    for name in ("layers-old", "layers-current", "layers-recent", "inductor", "triton"):
        (root / name).mkdir()
        (root / name / "graph.aot").write_bytes(b"x" * 10)
        paths[name] = root / name
    for name in ("mega-old.bin", "mega-current.bin", "notes-old.txt"):
        (root / name).write_bytes(b"y")
        paths[name] = root / name
    (root / "layers-link").symlink_to(paths["layers-old"], target_is_directory=True)
    paths["layers-link"] = root / "layers-link"
    for name in ("layers-old", "layers-current", "inductor", "triton", "mega-old.bin", "mega-current.bin"):
        aged(paths[name], 40)
    aged(paths["notes-old.txt"], 400)
    aged(paths["layers-recent"], 5)
    return paths


def test_only_our_unused_old_artefacts_go_and_those_in_use_are_marked(tmp_path: Path) -> None:
    paths = make_cache(tmp_path)
    in_use = [paths["mega-current.bin"], paths["layers-current"]]
    removed = compile_cache.prune_stale(tmp_path, in_use, max_age_days=30)
    assert removed == ["mega-old.bin", "layers-old"]
    assert not paths["mega-old.bin"].exists() and not paths["layers-old"].exists()
    for kept in ("mega-current.bin", "layers-current", "layers-recent", "inductor", "triton", "notes-old.txt"):
        assert paths[kept].exists(), kept
    assert paths["layers-link"].is_symlink()  # a link is not ours to follow or delete
    for used in in_use:  # marked as used now: the next start (of another model) keeps them for 30 days
        assert time.time() - used.stat().st_mtime < 60


def test_zero_days_keeps_everything(tmp_path: Path) -> None:
    paths = make_cache(tmp_path)
    assert compile_cache.prune_stale(tmp_path, [paths["layers-current"]], max_age_days=0) == []
    assert all(path.exists() for path in paths.values())
    assert time.time() - paths["layers-current"].stat().st_mtime < 60


def test_a_missing_cache_root_or_artefact_is_no_error(tmp_path: Path) -> None:
    assert compile_cache.prune_stale(tmp_path / "none", [tmp_path / "none" / "mega-x.bin"], max_age_days=30) == []


def test_the_default_age_and_its_bounds() -> None:
    assert ModelConfig().compile_cache_max_age_days == 30
    assert ModelConfig(compile_cache_max_age_days=0).compile_cache_max_age_days == 0
    with pytest.raises(ValueError, match="compile_cache_max_age_days"):
        ModelConfig(compile_cache_max_age_days=-1)


def test_a_read_only_cache_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_cache(tmp_path)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "utime", refused)
    monkeypatch.setattr(compile_cache.shutil, "rmtree", refused)
    monkeypatch.setattr(Path, "unlink", refused)
    assert compile_cache.prune_stale(tmp_path, [paths["layers-current"]], max_age_days=30) == []
    assert paths["layers-old"].exists() and paths["mega-old.bin"].exists()

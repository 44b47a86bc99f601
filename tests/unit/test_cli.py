"""The CLI commands that need no model: validate, submit, check-config, status; and their exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from daemon.cli import EXIT_CONFIG, EXIT_DATAERR, EXIT_OK, main
from daemon.jobspec import parse_sidecar


def test_validate_prints_the_resolved_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = tmp_path / "cat.yaml"
    sidecar.write_text("prompt: a cat\npreset: high\nseed: 3\n")
    assert main(["validate", str(sidecar)]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert plan["valid"] is True
    assert (plan["width"], plan["height"], plan["resolution"]) == (768, 768, "768p")
    assert plan["num_frames"] == 16 and plan["steps"] == 50 and plan["seed"] == 3
    assert plan["estimated_vram_gib"] > 7
    assert plan["output_name"] == "cat"


def test_validate_uses_the_image_aspect(
    tmp_path: Path, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar = tmp_path / "wide.yaml"
    sidecar.write_text("prompt: wide\n")
    image = make_image("wide.png", size=(192, 108))
    assert main(["validate", str(sidecar), str(image)]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert (plan["width"], plan["height"]) == (912, 512)


def test_validate_invalid_exits_65_with_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = tmp_path / "bad.yaml"
    sidecar.write_text("prompt: x\nnum_frames: 999\nstrength: 1\n")
    assert main(["validate", str(sidecar)]) == EXIT_DATAERR
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["valid"] is False
    assert any("num_frames" in problem for problem in report["detail"])
    assert any("strength" in problem for problem in report["detail"])
    assert "invalid" in captured.err


def test_validate_rejects_a_non_image(tmp_path: Path) -> None:
    sidecar = tmp_path / "x.yaml"
    sidecar.write_text("prompt: x\n")
    fake = tmp_path / "x.png"
    fake.write_text("not an image")
    assert main(["validate", str(sidecar), str(fake)]) == EXIT_DATAERR


def test_check_config(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(repo_root / "config" / "daemon.yaml")]) == EXIT_OK
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging:\n  level: loud\n")
    assert main(["check-config", str(bad)]) == EXIT_CONFIG
    assert "logging.level" in capsys.readouterr().err
    no_ffmpeg = tmp_path / "no-ffmpeg.yaml"
    no_ffmpeg.write_text(f"encode:\n  ffmpeg: {tmp_path / 'nonexistent' / 'ffmpeg'}\n")
    assert main(["check-config", str(no_ffmpeg)]) == EXIT_CONFIG  # found here, not after the model has loaded
    assert "encode.ffmpeg" in capsys.readouterr().err


def test_submit_drops_a_valid_pair_sidecar_last(
    tmp_path: Path, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    image = make_image("Holiday Photo.png")
    assert main(["submit", str(image), "--prompt", "a beach", "--inbox", str(inbox)]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["submitted"] == "Holiday_Photo"
    assert (inbox / "Holiday_Photo.png").read_bytes() == image.read_bytes()
    assert parse_sidecar((inbox / "Holiday_Photo.yaml").read_bytes()).prompt == "a beach"
    assert not list(inbox.glob("*.part"))
    # A second submit of the same name never overwrites the first.
    assert main(["submit", str(image), "--prompt", "again", "--inbox", str(inbox)]) == EXIT_OK
    assert len(list(inbox.glob("*.yaml"))) == 2


def test_submit_refuses_an_invalid_sidecar(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    sidecar = tmp_path / "s.yaml"
    sidecar.write_text(yaml.safe_dump({"prompt": "x", "steps": 0}))
    inbox = tmp_path / "inbox"
    assert main(["submit", str(make_image()), "--sidecar", str(sidecar), "--inbox", str(inbox)]) == EXIT_DATAERR
    assert not inbox.exists() or not any(inbox.iterdir())


def test_submit_of_files_that_are_not_there_is_invalid_input_not_a_traceback(
    tmp_path: Path, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    missing = tmp_path / "missing.png"
    assert main(["submit", str(missing), "--prompt", "x", "--inbox", str(inbox)]) == EXIT_DATAERR
    assert "no such image file" in capsys.readouterr().err
    sidecar = tmp_path / "missing.yaml"
    assert main(["submit", str(make_image()), "--sidecar", str(sidecar), "--inbox", str(inbox)]) == EXIT_DATAERR
    assert "cannot read the sidecar" in capsys.readouterr().err
    assert not inbox.exists() or not any(inbox.iterdir())


def test_status_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"inbox: {tmp_path / 'inbox'}\n")
    assert main(["status", "--config", str(config)]) == EXIT_OK
    assert "daemon: not running" in capsys.readouterr().out
    assert main(["status", "--config", str(config), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["daemon"]["alive"] is False and report["claimed"] == []


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "--no-such-flag"])
    assert caught.value.code == 2

"""Logs: JSON or console, stdout under systemd, and no user-controlled newline can forge a line."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from daemon.logs import configure_logging, log_stream


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    yield None
    structlog.reset_defaults()


def test_console_renderer_escapes_newlines_in_values_and_event() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    structlog.get_logger("t").info("job\nforged", stem="evil\nlevel=error event=forged", prompt=["a\rb"])
    text = stream.getvalue()
    assert text.count("\n") == 1, text
    assert "job\\nforged" in text and "evil\\nlevel=error" in text and "a\\rb" in text


def test_json_lines_escape_newlines() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    structlog.get_logger("t").info("job_claimed", stem="evil\n{}")
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["stem"] == "evil\n{}"


def test_stdout_under_systemd_stderr_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert log_stream() is sys.stderr
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert log_stream() is sys.stdout


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    structlog.get_logger("t").info("service_ready")
    assert json.loads(stream.getvalue())["event"] == "service_ready"

"""structlog setup: JSON lines for machines (journald, files, pipes), readable text on a terminal.

Where logs go: under systemd (`$JOURNAL_STREAM` or `$INVOCATION_ID` set) to stdout, which journald reads as the
service's stream; otherwise to stderr, so stdout stays free for command output. Format `auto` means JSON unless
that stream is a terminal.

Events use a fixed snake_case vocabulary (README, "Log events"); `job_id` is bound per job with contextvars so
every line of a job can be found with one grep. Nothing user-controlled can split a line: JSON escapes control
characters, and for the console renderer `escape_control_characters` escapes them (a file name or prompt holding
"\\n" would otherwise forge a log line).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]


def log_stream() -> TextIO:
    """stdout under systemd (journald), stderr elsewhere."""
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    return sys.stdout if under_systemd else sys.stderr


def _escape(value: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in value)


def escape_control_characters(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Escape control characters in the event text, which ConsoleRenderer prints as is. Other values it prints
    with repr() as soon as they hold such a character (tests/unit/test_logs.py keeps that promise checked), so
    escaping them here too would only double the backslashes."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = _escape(event)
    return event_dict


def configure_logging(level: str = "info", log_format: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Route structlog (and stdlib logging from libraries) to one stream in one format."""
    stream = stream if stream is not None else log_stream()
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # JSON needs the traceback turned into a string first; the console escapes everything a user could control.
    finishing: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if use_json else [escape_control_characters]
    )
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *finishing, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=stream, format="%(name)s: %(message)s")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger

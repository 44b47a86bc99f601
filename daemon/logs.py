"""structlog setup: JSON lines when stderr is not a terminal (systemd/journald, files), readable colours when it is.

Events use a fixed snake_case vocabulary (`job_claimed`, `job_rejected`, `generate_step`, `job_published`...);
`job_id` is bound per job with contextvars so every line of a job can be found with one grep.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(level: str = "info", log_format: LogFormat = "auto") -> None:
    """Route structlog (and stdlib logging from libraries) to stderr in one format."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    # ConsoleRenderer formats exc_info itself; JSON needs the traceback turned into a string first.
    exceptions: list[structlog.types.Processor] = [structlog.processors.format_exc_info] if use_json else []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger

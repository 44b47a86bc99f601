"""The error hierarchy, split by what the caller does with an error (not by where it came from).

- `JobRejected`: the input itself is bad; retrying cannot help. The pair is quarantined with a reason file.
- `TransientJobError`: the job may succeed if tried again (out of memory, ffmpeg crash, disk full).
- `JobInterrupted`: the service is stopping; the job is released back to the queue, not failed.
- `FatalError`: the daemon cannot go on (bad config, model missing); it exits non-zero and systemd restarts it.

Each class's docstring is its default message, as in rq and dramatiq.
"""

from __future__ import annotations

from typing import Any


class I2vdError(Exception):
    """i2vd failed."""

    def __init__(self, message: str | None = None, *, detail: Any = None) -> None:
        self.message = message or (type(self).__doc__ or "").strip()
        self.detail = detail
        super().__init__(self.message)


class JobRejected(I2vdError):
    """The input pair is invalid and was quarantined."""

    def __init__(self, message: str | None = None, *, reason: str = "invalid_input", detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.reason = reason


class TransientJobError(I2vdError):
    """The job failed for a reason that may go away; it will be retried."""


class JobInterrupted(I2vdError):
    """The job was interrupted because the service is stopping; it goes back to the queue."""


class FatalError(I2vdError):
    """The daemon cannot continue."""


class StartAbandoned(I2vdError):
    """A stop was asked for while the model was still loading: the start is given up (not a failure)."""


class ConfigError(FatalError):
    """The configuration is invalid."""


class DeviceUnavailable(FatalError):
    """The configured GPU is not there (yet): exit 1, so systemd starts the daemon again later (a driver that
    loads late at boot), where a `ConfigError` (exit 78) would keep it stopped."""


class StorageFull(TransientJobError):
    """There is no space left to write the job's outputs; it stays pending until space returns."""

    consumes_attempt = False
    """A full disk says nothing about the job: the worker keeps it pending (and retries after a delay) without
    counting the attempt, so a long outage never sends good jobs to failed/."""


class OutputLost(TransientJobError):
    """A written output could not be made durable (fsync failed); it was discarded and must be written again."""

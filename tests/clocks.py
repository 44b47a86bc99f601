"""Deterministic clocks for tests (tests/ is on `sys.path`: pytest inserts the rootdir conftest's folder)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class SteppingClock:
    """A `now()` for the store: every call is one second after the previous one, from `start`."""

    def __init__(self, start: datetime = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)) -> None:
        self.value = start

    def __call__(self) -> datetime:
        self.value += timedelta(seconds=1)
        return self.value

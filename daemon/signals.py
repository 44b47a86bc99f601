"""Signal handling that only sets flags (rq/dramatiq style): the main loop notices, logs and acts.

First SIGINT/SIGTERM asks for a graceful stop (no new claims; the running job is interrupted between denoising
steps and released back to the queue). A second one asks for an immediate stop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopSignals:
    """Counts stop signals; `stop_requested` and `force_requested` are what the service loops poll or wait on."""

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.force_requested = threading.Event()

    def install(self) -> None:
        """Install handlers; only possible from the main thread."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested.is_set():
            self.force_requested.set()
        self.stop_requested.set()

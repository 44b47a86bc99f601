"""One daemon per inbox: a second `i2vd run` on the same inbox (here an operator's `run --once` beside the running
service) exits at once with the first one's pid, and takes none of its claimed jobs; the first one carries on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from opshelpers import JOB_SECONDS, OpsDaemon, drop_pair

pytestmark = pytest.mark.acceptance


def test_a_second_daemon_on_the_same_inbox_is_refused(ops_daemon: Callable[..., OpsDaemon], tmp_path: Path) -> None:
    first = ops_daemon()
    first.wait_for_event("service_ready")
    second = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--once", "--config", str(tmp_path / "daemon.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1
    assert f"another i2vd (pid {first.process.pid}) is already running on this inbox" in second.stderr
    assert first.process.poll() is None
    drop_pair(first.inbox, "after", "prompt: still served\nvariants: []\n")
    first.wait_for_event("job_finished", JOB_SECONDS, name="after", outcome="succeeded")
    assert first.stop() == 0

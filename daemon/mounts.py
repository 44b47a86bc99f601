"""Refuse to start on a missing mount (checklist D33), so nothing is written into the bare mountpoint directory.

If the share holding the inbox or outbox is not mounted at start, `mkdir -p` would quietly create the folders on
the root filesystem underneath: jobs would be claimed into, and videos published onto, a disk nobody reads, and
hidden by the real share once it mounts. systemd's answer is `RequiresMountsFor=` in the unit; `require_mounts`
in the config gives the same guarantee outside systemd: each listed path must exist and be a mount point, checked
before the daemon creates or writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from daemon.errors import FatalError


def check_mounts(paths: Iterable[Path]) -> None:
    """Raise `FatalError` unless every path exists and is a mount point (never creates anything)."""
    missing = [str(path) for path in paths if not (path.is_dir() and os.path.ismount(path))]
    if missing:
        raise FatalError(
            f"not mounted: {', '.join(missing)} (require_mounts); not starting, so nothing is written into the "
            "mountpoint directory underneath",
            detail={"not_mounted": missing},
        )

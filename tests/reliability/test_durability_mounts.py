"""Checklist D33: an outbox or inbox share that is not mounted at start stops the daemon before it writes anything.

A real unmounted share needs root here; the check works on any path, so a plain directory (not a mount point)
stands for the bare mountpoint and `/` for a mounted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DaemonConfig
from daemon.errors import FatalError
from daemon.mounts import check_mounts


def test_a_bare_mountpoint_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """Checklist D33: the listed outbox share is only an empty directory (not mounted) -> FatalError naming it;
    nothing is created inside."""
    bare = tmp_path / "mnt" / "outbox-share"
    bare.mkdir(parents=True)
    with pytest.raises(FatalError, match=r"not mounted: .*outbox-share") as raised:
        check_mounts([Path("/"), bare])
    assert raised.value.detail == {"not_mounted": [str(bare)]}
    assert list(bare.iterdir()) == []


def test_a_missing_mountpoint_is_refused_and_not_created(tmp_path: Path) -> None:
    """Checklist D33: the mountpoint does not even exist -> refused, and the check does not create it."""
    missing = tmp_path / "not-there"
    with pytest.raises(FatalError):
        check_mounts([missing])
    assert not missing.exists()


def test_mounted_paths_pass_and_config_lists_them() -> None:
    """Checklist D33: mounted paths pass; `require_mounts` is a config key (empty by default)."""
    check_mounts([Path("/"), Path("/proc")])
    assert DaemonConfig().require_mounts == []
    assert DaemonConfig(require_mounts=["/srv/share"]).require_mounts == [Path("/srv/share")]  # type: ignore[list-item]

"""Crash-safe filesystem primitives shared by the store and the publisher.

The rules (Maildir, Postfix, SQLite's documentation): write to a temporary name on the same filesystem, fsync the
file, rename into place, fsync the directory. `os.link` is the no-clobber rename: it fails with EEXIST instead of
replacing a file someone else put there.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old or the new content, never a part."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def link_no_clobber(source: Path, destination: Path) -> bool:
    """Atomically give `source` the name `destination` unless that name exists; True on success.

    Where hard links are unsupported (some SMB mounts) it falls back to check-then-rename, which is not atomic.
    """
    try:
        os.link(source, destination, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if destination.exists() or destination.is_symlink():
            return False
        os.rename(source, destination)
        return True
    source.unlink()
    return True

"""Crash-safe filesystem primitives shared by the store and the publisher.

The rules (Maildir, Postfix, SQLite's documentation): write to a temporary name on the same filesystem, fsync the
file, rename into place, fsync the directory. `rename_no_replace` is the no-clobber rename: `renameat2` with
`RENAME_NOREPLACE` on Linux (fails with EEXIST instead of replacing a file someone else put there), `os.link`
plus unlink where the filesystem lacks it (NFS, some FUSE).

Two failure rules from the field (reliability-anchors.md §2):
- fsync errors are not retried. After a failed fsync Linux may mark the dirty pages clean, so a second fsync
  "succeeds" with the data gone (PostgreSQL's "fsyncgate"). The temp file is discarded and written again from
  scratch, or the error goes up.
- On NFS "you can not assume that if the operation failed, the file was not renamed" (rename(2), BUGS): a failed
  rename whose source is gone and whose target holds the expected bytes is a success (Postfix `sane_rename`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import secrets
import sys
import threading
from collections.abc import Callable
from pathlib import Path

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errors that mean "no room to write", not "this job is bad": the job waits for space instead of failing."""
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_NOREPLACE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})
REWRITE_ATTEMPTS = 2
"""How many times a small file (job.json, manifest) is written from scratch after an fsync EIO before giving up."""


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` is an OSError saying the filesystem (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc without the wrapper
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    typed: Callable[..., int] = function
    return typed


_renameat2 = _load_renameat2()


def _temp_name(path: Path) -> Path:
    """A hidden name next to `path`, unique per process, thread and call (two writers never share a temp)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident():x}-{secrets.token_hex(3)}")


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


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) holding `data`, fsynced and closed; on any error it is removed.

    Errors at write, fsync *and* close are reported (NFS reports write errors at close, nfs(5)).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


def write_durable_temp(path: Path, data: bytes) -> Path:
    """Write `data` to a fresh hidden temp name next to `path` and fsync it; return the temp's path.

    An fsync EIO discards that temp and writes a new one from scratch (never a second fsync of the same file),
    up to `REWRITE_ATTEMPTS` times; then the EIO goes up. Every other error goes up at once, temp removed.
    """
    for attempt in range(1, REWRITE_ATTEMPTS + 1):
        temp = _temp_name(path)
        try:
            write_new_file(temp, data)
        except OSError as exc:
            if exc.errno != errno.EIO or attempt == REWRITE_ATTEMPTS:
                raise
            continue
        return temp
    raise AssertionError("unreachable")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old or the new content, never a part."""
    temp = write_durable_temp(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def check_single_name(value: str, what: str) -> None:
    """Raise ValueError unless `value` is one non-empty path component (no `/`, not `.` or `..`, no NUL): a name
    that becomes part of a path under the inbox, the state folder or the outbox must never lead out of it."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} must be a single non-empty path component")


def link_no_clobber(source: Path, destination: Path) -> bool:
    """Atomically give `source` the name `destination` unless that name exists; True on success.

    Where hard links are unsupported (some SMB mounts) it falls back to check-then-rename, which is not atomic.
    If `destination` already is `source` (a crash between the link and the unlink), the move is finished.
    """
    try:
        os.link(source, destination, follow_symlinks=False)
    except FileExistsError:
        if not _same_file(os.lstat(source), os.lstat(destination)):
            return False
        # A crash between our link and the unlink below left both names on one file: finish the move.
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if destination.exists() or destination.is_symlink():
            return False
        os.rename(source, destination)
        return True
    source.unlink()
    return True


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holds(path: Path, sha256: str | None, identity: os.stat_result) -> bool:
    """Whether `path` is the file we tried to move: the same inode, or (if given) the same SHA-256."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if _same_file(info, identity):
        return True
    if sha256 is None or info.st_size != identity.st_size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha256


def _rename_noreplace_syscall(source: Path, destination: Path) -> bool | None:
    """`renameat2(RENAME_NOREPLACE)`: True done, False exists, None unsupported here (fall back to link)."""
    if _renameat2 is None:
        return None
    result = _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    if code in _NOREPLACE_UNSUPPORTED:
        return None
    raise OSError(code, os.strerror(code), str(source), None, str(destination))


def rename_no_replace(source: Path, destination: Path, sha256: str | None = None) -> bool:
    """Give `source` the name `destination` unless that name exists; True when moved, False when taken.

    The final name appears by rename (or link) of a complete file, never by open. A failure reported for a move
    that was in fact done (NFS retransmissions) is reconciled: `source` gone and `destination` holding the same
    inode or, if `sha256` is given, the same bytes counts as done.
    """
    identity = os.lstat(source)
    try:
        done = _rename_noreplace_syscall(source, destination)
        if done is None:
            done = link_no_clobber(source, destination)
    except OSError:
        if not os.path.lexists(source) and _holds(destination, sha256, identity):
            return True
        raise
    if not done and os.path.lexists(source) and _holds(destination, None, identity):
        os.unlink(source)  # a link that was made but reported EEXIST: same inode under both names
        return True
    return done


def rename_or_confirm(source: Path, destination: Path) -> bool:
    """`os.rename`, where a failure that in fact happened (NFS: rename(2), BUGS) is confirmed instead of raised:
    source gone and destination the same inode -> done, returning True ("reconciled"). Any other failure (ENOENT:
    someone else moved it first) goes up."""
    identity = os.lstat(source)
    try:
        os.rename(source, destination)
    except OSError:
        if os.path.lexists(source) or not os.path.lexists(destination):
            raise
        if not _same_file(os.lstat(destination), identity):
            raise
        return True
    return False

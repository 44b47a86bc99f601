"""Which inbox entries form a job (names only), and when a file stopped changing (the stability window).

Pairing looks at names alone: no `stat` that follows a link, so a symlink still forms a pair and is then rejected
with a clear reason instead of being silently skipped or, worse, read. Stems are compared in Unicode NFC, because
macOS clients (over SMB) write decomposed names (NFD) while Linux and Windows write composed ones: `café.png` from
one and `café.yaml` from the other are one pair. Two files whose stems differ only in normalization are ambiguous
(two images or two sidecars for one stem) and quarantined, never guessed.
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Callable, Collection
from pathlib import Path
from stat import S_ISREG

from daemon.store import Pair

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SIDECAR_EXTENSIONS = frozenset({".yaml", ".yml"})
_IGNORED_NAMES = frozenset({"failed", "thumbs.db", "desktop.ini", "@eadir", "__macosx", "$recycle.bin"})
_IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", ".swp", "~")


def is_ignored(name: str) -> bool:
    """Names that are never jobs: hidden/OS junk, partial downloads and the daemon's own `failed`/`.i2vd`.

    Hidden covers `.DS_Store`, `._*` (AppleDouble), `.nfsXXXX` (NFS silly renames), `.smbdeleteXXXX`, `.Trashes`;
    `~$x` are Office lock files.
    """
    lower = name.lower()
    return name.startswith((".", "~$")) or lower in _IGNORED_NAMES or lower.endswith(_IGNORED_SUFFIXES)


def file_kind(name: str) -> str | None:
    """ "image", "sidecar" or None, by extension (case-insensitive). What the file really is is checked later."""
    suffix = os.path.splitext(name)[1].lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "sidecar" if suffix in SIDECAR_EXTENSIONS else None


def stem_of(name: str) -> str:
    """The pairing key: the name without its extension, in Unicode NFC."""
    return unicodedata.normalize("NFC", os.path.splitext(name)[0])


def find_pairs(inbox: Path) -> tuple[list[Pair], list[Path]]:
    """Complete pairs in the inbox's top level, and the candidate files that are not (yet) part of one.

    Decided by name alone: what a file really is gets checked after the claim. A stem with two images or two
    sidecars (`a.png` + `a.jpg`) is ambiguous and never paired; see `ambiguous_groups`.
    Raises OSError when the inbox itself cannot be listed (deleted, unmounted, share unreachable).
    """
    groups: dict[str, tuple[list[Path], list[Path]]] = {}
    with os.scandir(inbox) as entries:
        for entry in entries:
            kind = None if is_ignored(entry.name) else file_kind(entry.name)
            if kind is not None:
                images, sidecars = groups.setdefault(stem_of(entry.name), ([], []))
                (images if kind == "image" else sidecars).append(Path(entry.path))
    pairs: list[Pair] = []
    unpaired: list[Path] = []
    for stem in sorted(groups):
        images, sidecars = groups[stem]
        if len(images) == 1 and len(sidecars) == 1:
            pairs.append(Pair(stem=stem, image=images[0], sidecar=sidecars[0]))
        else:
            unpaired.extend(sorted(images + sidecars))
    return pairs, unpaired


def ambiguous_groups(unpaired: Collection[Path]) -> dict[str, list[Path]]:
    """Among `find_pairs`' unpaired files: stems with images and sidecars that still do not pair (two of a kind)."""
    groups: dict[str, list[Path]] = {}
    for path in unpaired:
        groups.setdefault(stem_of(path.name), []).append(path)
    complete = {"image", "sidecar"}
    return {stem: sorted(paths) for stem, paths in groups.items() if {file_kind(p.name) for p in paths} == complete}


Signature = tuple[int, int, int]


def signature_of(info: os.stat_result) -> Signature:
    """What must stay the same for a file to count as finished: (size, mtime_ns, inode)."""
    return (info.st_size, info.st_mtime_ns, info.st_ino)


class StabilityTracker:
    """Says when a file stopped changing: same (size, mtime_ns, inode) for `stable_seconds` of `clock`.

    The clock is injected so tests need no sleeps. An empty regular file needs `empty_grace_seconds` more: a copy
    that has not written its first byte yet looks exactly like that. After it, the file is checked (and refused,
    with a reason file) like any other, so an empty file never sits in the inbox unanswered (None: never stable).
    """

    def __init__(
        self,
        stable_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        empty_grace_seconds: float | None = None,
    ) -> None:
        self.stable_seconds = stable_seconds
        self.empty_grace_seconds = empty_grace_seconds
        self._clock = clock
        self._seen: dict[Path, tuple[Signature, float]] = {}

    def observe(self, path: Path, stat: os.stat_result) -> bool:
        """True once `stat`'s (size, mtime_ns, inode) has been unchanged for `stable_seconds`."""
        signature = signature_of(stat)
        now = self._clock()
        previous = self._seen.get(path)
        if previous is None or previous[0] != signature:
            previous = (signature, now)
            self._seen[path] = previous
        wait = self.stable_seconds
        if S_ISREG(stat.st_mode) and stat.st_size == 0:
            if self.empty_grace_seconds is None:
                return False
            wait += self.empty_grace_seconds
        return now - previous[1] >= wait

    def unchanged_for(self, path: Path) -> float:
        """Seconds since `path` was first seen with its current signature (0 if never observed)."""
        previous = self._seen.get(path)
        return 0.0 if previous is None else self._clock() - previous[1]

    def signature(self, path: Path) -> Signature | None:
        previous = self._seen.get(path)
        return None if previous is None else previous[0]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def retain(self, paths: Collection[Path]) -> None:
        """Drop every path not in `paths`, so files that went away do not accumulate."""
        for path in set(self._seen) - set(paths):
            del self._seen[path]

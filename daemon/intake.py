"""Intake: find image + sidecar pairs in the inbox, wait until both are complete, claim them, validate the copies.

The inbox is shared with people and scripts we do not control, so every step assumes hostile input:
- pairing looks at names only (no `stat` that follows a link), so a symlink still forms a pair and is then
  rejected with a clear reason instead of being silently skipped or, worse, read;
- a pair is claimed only after both files kept the same (size, mtime, inode) for `stable_seconds`, because
  events arrive before a copy ends and network filesystems send none at all;
- validation runs on the claimed copies, after the atomic rename, so nobody can swap a file between the check and
  the use (TOCTOU). Files are opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO would otherwise block the daemon),
  size-capped before they are read, and the image is decoded from exactly the bytes that were hashed.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFMT, S_IFSOCK, S_ISLNK, S_ISREG
from typing import Any

import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.config import DaemonConfig
from daemon.errors import JobRejected
from daemon.jobspec import JobSpec, ResolvedJob, parse_sidecar, resolve_job
from daemon.store import ClaimedJob, JobStore
from daemon.store import Pair as Pair  # re-exported: intake's callers may import Pair from here

log = structlog.get_logger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SIDECAR_EXTENSIONS = frozenset({".yaml", ".yml"})
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_IGNORED_NAMES = frozenset({"failed", "thumbs.db", "desktop.ini", "@eadir", "__macosx", "$recycle.bin"})
_IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", ".swp", "~")
_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"))
_HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftypmsf1")
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_CHUNK_BYTES = 1024 * 1024
_SPECIAL_KINDS = {S_IFDIR: "a folder", S_IFIFO: "a named pipe", S_IFSOCK: "a socket"}
_SPECIAL_KINDS |= {S_IFCHR: "a device", S_IFBLK: "a device"}
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a bomb must be an error, always. Installed once,
# process-wide, because warnings.catch_warnings() per call is not thread-safe (intake and worker both decode).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class InputRejected(JobRejected):
    """The input pair is invalid and was quarantined; `input_name` says which of its two files is at fault."""

    def __init__(self, message: str, *, reason: str, input_name: str, detail: Any = None) -> None:
        super().__init__(message, reason=reason, detail=detail)
        self.input_name = input_name


# ----- names and pairing -----------------------------------------------------------------------------------------
def is_ignored(name: str) -> bool:
    """Names that are never jobs: hidden/OS junk, partial downloads and the daemon's own `failed`/`.i2vd`."""
    lower = name.lower()
    return name.startswith((".", "~$")) or lower in _IGNORED_NAMES or lower.endswith(_IGNORED_SUFFIXES)


def _kind(name: str) -> str | None:
    suffix = os.path.splitext(name)[1].lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "sidecar" if suffix in SIDECAR_EXTENSIONS else None


def find_pairs(inbox: Path) -> tuple[list[Pair], list[Path]]:
    """Complete pairs in the inbox's top level, and the candidate files that are not (yet) part of one.

    Decided by name alone: what a file really is gets checked after the claim. A stem with two images or two
    sidecars (`a.png` + `a.jpg`) is ambiguous and never paired; see `ambiguous_groups`.
    """
    groups: dict[str, tuple[list[Path], list[Path]]] = {}
    with os.scandir(inbox) as entries:
        for entry in entries:
            kind = None if is_ignored(entry.name) else _kind(entry.name)
            if kind is not None:
                images, sidecars = groups.setdefault(os.path.splitext(entry.name)[0], ([], []))
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
        groups.setdefault(os.path.splitext(path.name)[0], []).append(path)
    complete = {"image", "sidecar"}
    return {stem: sorted(paths) for stem, paths in groups.items() if {_kind(p.name) for p in paths} == complete}


# ----- stability -------------------------------------------------------------------------------------------------
class StabilityTracker:
    """Says when a file stopped changing: same (size, mtime_ns, inode) for `stable_seconds` of `clock`.

    The clock is injected so tests need no sleeps. An empty regular file is never stable: a copy that has not
    written its first byte yet looks exactly like that.
    """

    def __init__(self, stable_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._seen: dict[Path, tuple[tuple[int, int, int], float]] = {}

    def observe(self, path: Path, stat: os.stat_result) -> bool:
        """True once `stat`'s (size, mtime_ns, inode) has been unchanged for `stable_seconds`."""
        signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        now = self._clock()
        previous = self._seen.get(path)
        if previous is None or previous[0] != signature:
            previous = (signature, now)
            self._seen[path] = previous
        if S_ISREG(stat.st_mode) and stat.st_size == 0:
            return False
        return now - previous[1] >= self.stable_seconds

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def retain(self, paths: Collection[Path]) -> None:
        """Drop every path not in `paths`, so files that went away do not accumulate."""
        for path in set(self._seen) - set(paths):
            del self._seen[path]


# ----- safe reading and validation -------------------------------------------------------------------------------
def _rejected(name: str, reason: str, message: str, detail: Any = None) -> InputRejected:
    return InputRejected(message, reason=reason, input_name=name, detail=detail)


def _check_kind(info: os.stat_result, name: str, max_bytes: int) -> None:
    if S_ISLNK(info.st_mode):
        message = f"{name} is a symbolic link. Links are not accepted, for safety: put the real file in the inbox."
        raise _rejected(name, "symlink", message)
    if not S_ISREG(info.st_mode):
        kind = _SPECIAL_KINDS.get(S_IFMT(info.st_mode), "a special file")
        raise _rejected(name, "not_regular_file", f"{name} is {kind}, not a normal file.")
    if info.st_size > max_bytes:
        raise _too_large(name, info.st_size, max_bytes)


def _too_large(name: str, size: int, limit: int) -> InputRejected:
    message = f"{name} is {size:,} bytes; the limit is {limit:,} bytes. Use a smaller file."
    return _rejected(name, "too_large", message, f"{size} > {limit} bytes")


def read_input(path: Path, max_bytes: int | None, name: str) -> bytes:
    """The bytes of a claimed input, refusing links, non-regular files and anything over `max_bytes`.

    lstat, open with O_NOFOLLOW, then fstat and compare (Postfix's safe_open): what is read is what was
    checked. `name` is the user's file name, for messages.
    """
    limit = sys.maxsize if max_bytes is None else max_bytes
    try:
        before = os.lstat(path)
        _check_kind(before, name, limit)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise _rejected(name, "input_missing", f"{name} disappeared before it could be read.") from exc
    except OSError as exc:  # ELOOP: replaced by a link after the lstat
        raise _rejected(name, "not_regular_file", f"{name} cannot be opened: {exc.strerror}.") from exc
    with os.fdopen(fd, "rb", buffering=0) as handle:
        after = os.fstat(handle.fileno())
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise _rejected(name, "not_regular_file", f"{name} was replaced while it was being checked.")
        _check_kind(after, name, limit)
        chunks: list[bytes] = []
        size = 0
        while chunk := handle.read(_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:  # it grew after the fstat
                raise _too_large(name, size, limit)
            chunks.append(chunk)
    return b"".join(chunks)


def _unidentified(data: bytes, name: str) -> InputRejected:
    found = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    if found is None and data[4:12] in _HEIF_BRANDS:
        found = "HEIC/AVIF"
    if found is None:
        return _rejected(name, "image_unreadable", f"{name} is not a readable PNG, JPEG or WEBP image.")
    message = f"{name} is really a {found} image; only PNG, JPEG and WEBP are accepted. Convert it and try again."
    return _rejected(name, "image_format", message, found)


def decode_image(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Decode PNG/JPEG/WEBP bytes fully, after checking the header's size against `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _rejected(
            name, "decompression_bomb", f"{name} has far too many pixels to open safely.", str(exc)
        ) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, name) from exc
    except Exception as exc:  # a hostile header can raise anything from a plugin (ValueError, struct.error...)
        raise _rejected(name, "image_unreadable", f"{name} has a damaged header and cannot be read.", str(exc)) from exc
    width, height = image.size
    if width * height > max_pixels:
        message = (
            f"{name} says it is {width}x{height} pixels ({width * height:,}), more than the limit of "
            f"{max_pixels:,}. Scale it down and try again."
        )
        raise _rejected(name, "decompression_bomb", message, f"{width}x{height} > {max_pixels} pixels")
    try:
        image.load()
    except Exception as exc:
        message = f"{name} is damaged or cut short and cannot be decoded."
        raise _rejected(name, "image_unreadable", message, str(exc)) from exc
    return image


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF rotation, which is what the worker will feed the model."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:
        return width, height
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _parse_spec(data: bytes, name: str) -> JobSpec:
    try:
        return parse_sidecar(data)
    except JobRejected as exc:
        raise _rejected(name, exc.reason, f"The sidecar {name} is not valid: {exc.message}", exc.detail) from exc


def validate_claimed(job: ClaimedJob, config: DaemonConfig) -> tuple[ResolvedJob, str]:
    """Check a claimed pair and decide every setting; return (resolved job, image sha256) or raise JobRejected.

    A job validated before (recovered after a restart) keeps its seed, so it still makes the same video.
    """
    limits = config.intake
    spec = _parse_spec(read_input(job.sidecar_path, limits.max_sidecar_bytes, job.sidecar_name), job.sidecar_name)
    data = read_input(job.image_path, limits.max_image_bytes, job.image_name)
    image_sha256 = hashlib.sha256(data).hexdigest()
    size = _oriented_size(decode_image(data, limits.max_image_pixels, job.image_name))
    seed = job.resolved.seed if job.resolved is not None else None
    try:
        resolved = resolve_job(spec, config.generation, config.encode, stem=job.stem, image_size=size, seed=seed)
    except JobRejected as exc:
        message = f"The sidecar {job.sidecar_name} asks for something this daemon cannot do: {exc.message}"
        raise _rejected(job.sidecar_name, exc.reason, message, exc.detail) from exc
    return resolved, image_sha256


def load_image_rgb(path: Path, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Load a validated image for the model: same safety checks, EXIF rotation applied, RGB."""
    image = decode_image(read_input(path, max_bytes, path.name), max_pixels, path.name)
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:
        log.warning("exif_transpose_failed", path=str(path))
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency must go through RGBA, or Pillow warns
    return image.convert("RGB")


# ----- the poll loop ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntakeResult:
    """One poll's outcome.

    `settling` counts complete pairs (and ambiguous groups) whose files are still changing: the caller should look
    again soon rather than at the rescan period. `waiting` adds files that still lack their partner; those can wait
    forever, so `--once` does not wait for them.
    """

    accepted: list[ClaimedJob] = field(default_factory=list)
    rejected: list[tuple[str, JobRejected, Path]] = field(default_factory=list)
    waiting: int = 0
    settling: int = 0


class Intake:
    """Turns what is in the inbox into validated claimed jobs; one bad pair never stops the others."""

    def __init__(self, config: DaemonConfig, store: JobStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._store = store
        self._tracker = StabilityTracker(config.intake.stable_seconds, clock)
        self._announced: set[str] = set()

    def poll(self) -> IntakeResult:
        """Scan once: claim and validate every pair that is stable; quarantine ambiguous ones."""
        pairs, unpaired = find_pairs(self._config.inbox)
        result = IntakeResult()  # filled in place by the helpers; `waiting` is set at the end
        settling = 0
        for pair in pairs:
            try:
                settling += self._handle_pair(pair, result)
            except Exception:
                log.exception("intake_pair_failed", stem=_printable(pair.stem))
        orphans, unsettled_groups = self._handle_unpaired(unpaired, result)
        settling += unsettled_groups
        self._tracker.retain([p for pair in pairs for p in (pair.image, pair.sidecar)] + unpaired)
        self._announced &= {pair.stem for pair in pairs}
        return replace(result, waiting=settling + orphans, settling=settling)

    def _is_stable(self, path: Path) -> bool:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self._tracker.forget(path)
            return False
        return self._tracker.observe(path, info)

    def _handle_pair(self, pair: Pair, result: IntakeResult) -> int:
        """Claim and validate the pair if both files are stable; return 1 if it is still settling."""
        image_stable, sidecar_stable = self._is_stable(pair.image), self._is_stable(pair.sidecar)
        if not (image_stable and sidecar_stable):
            if pair.stem not in self._announced:
                self._announced.add(pair.stem)
                log.info("pair_waiting", stem=_printable(pair.stem))
            return 1
        self._announced.discard(pair.stem)
        for path in (pair.image, pair.sidecar):
            self._tracker.forget(path)
        if not _is_text(pair.image.name, pair.sidecar.name):
            message = "The file name is not valid UTF-8 text. Rename the files and drop them in again."
            self._quarantine(pair.stem, pair, "bad_filename", message, None, result)
            return 0
        try:
            job = self._store.claim(pair)
        except FileNotFoundError:
            log.info("pair_vanished", stem=pair.stem)
            return 0
        log.info("job_claimed", job_id=job.job_id, stem=job.stem, image=job.image_name, sidecar=job.sidecar_name)
        self._admit(job, result)
        return 0

    def _admit(self, job: ClaimedJob, result: IntakeResult) -> None:
        """Validate a claimed job into `result.accepted`, or quarantine it into `result.rejected`."""
        try:
            resolved, image_sha256 = validate_claimed(job, self._config)
        except JobRejected as exc:
            rejection = exc
        except Exception as exc:
            log.exception("validation_crashed", job_id=job.job_id)
            message = (
                f"The daemon hit an internal error while checking {job.image_name} and {job.sidecar_name} (not a "
                "problem with the files as far as we know). They are kept here: drop them in again to retry."
            )
            rejection = JobRejected(message, reason="validation_error", detail=repr(exc))
        else:
            result.accepted.append(self._store.mark_validated(job, resolved, image_sha256))
            return
        failed_dir = self._store.fail(job, rejection)
        log.warning(
            "job_rejected", job_id=job.job_id, stem=job.stem, reason=rejection.reason, failed_dir=str(failed_dir)
        )
        result.rejected.append((job.stem, rejection, failed_dir))

    def _handle_unpaired(self, unpaired: list[Path], result: IntakeResult) -> tuple[int, int]:
        """Quarantine stable ambiguous groups; everything else unpaired is waiting for its partner.

        Returns (files waiting for a partner, ambiguous groups still settling).
        """
        groups = ambiguous_groups(unpaired)
        orphans = sum(1 for path in unpaired if os.path.splitext(path.name)[0] not in groups)
        settling = 0
        for stem, paths in groups.items():
            if not all([self._is_stable(path) for path in paths]):
                settling += 1
                continue
            names = [path.name for path in paths]
            message = (
                f"Several files are named '{stem}' ({', '.join(names)}), so it is not clear which image "
                "goes with which sidecar. Give each pair its own name and drop them in again."
            )
            try:
                self._quarantine(stem, paths, "ambiguous_pair", message, names, result)
            except Exception:
                log.exception("intake_pair_failed", stem=_printable(stem))
        return orphans, settling

    def _quarantine(
        self, stem: str, files: Pair | list[Path], reason: str, message: str, detail: Any, result: IntakeResult
    ) -> None:
        try:
            failed_dir = self._store.quarantine(files, reason, message, detail)
        except FileNotFoundError:
            return  # gone already: nothing to keep
        log.warning("job_rejected", stem=_printable(stem), reason=reason, failed_dir=_printable(str(failed_dir)))
        result.rejected.append((stem, JobRejected(message, reason=reason, detail=detail), failed_dir))


def _printable(text: str) -> str:
    """Names that are not UTF-8 (surrogate escapes) would crash a UTF-8 log line: show them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_text(*names: str) -> bool:
    return all(_printable(name) == name for name in names)

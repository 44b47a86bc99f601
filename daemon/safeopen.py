"""Reading hostile inbox files safely, and decoding images without letting a header allocate the machine.

The rules come from Postfix's `safe_open` and Pillow's own bomb checks (docs/reliability-anchors §6):
- `lstat`, then `open(O_NOFOLLOW | O_NONBLOCK)`, then `fstat`, and require the same (dev, ino): what is read is what
  was checked, a symlink swapped in between fails with ELOOP, and a FIFO never blocks the daemon;
- regular files only, with one link: a hard link to a file outside the inbox (`st_nlink > 1`) is refused, so the
  daemon never archives, quarantines or deletes someone else's file under a second name;
- the size cap is checked on the `lstat` result, before the file is even opened, and again while reading;
- the format is decided by content (Pillow's `formats=` allowlist: PNG, JPEG, WEBP only), and the header's pixel
  count is checked against the limit before anything is decoded. `LOAD_TRUNCATED_IMAGES` is never touched.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import warnings
from pathlib import Path
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFMT, S_IFSOCK, S_ISLNK, S_ISREG
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import JobRejected

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
INPUT_PIXELS_PER_OUTPUT_PIXEL = 64
"""An input is scaled down to at most `generation.max_pixels`; one with more than 64x that (8x per side) carries
nothing the model can use, so the decode limit is tied to the model's output limit (and `intake.max_image_pixels`)."""
_MAGIC = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"SIMPLE  =", "FITS"),
    (b"\x00\x00\x01\x00", "ICO"),
)
_HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftypmsf1")
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


def rejected(name: str, reason: str, message: str, detail: Any = None) -> InputRejected:
    return InputRejected(message, reason=reason, input_name=name, detail=detail)


def _check_kind(info: os.stat_result, name: str, max_bytes: int) -> None:
    if S_ISLNK(info.st_mode):
        message = f"{name} is a symbolic link. Links are not accepted, for safety: put the real file in the inbox."
        raise rejected(name, "symlink", message)
    if not S_ISREG(info.st_mode):
        kind = _SPECIAL_KINDS.get(S_IFMT(info.st_mode), "a special file")
        raise rejected(name, "not_regular_file", f"{name} is {kind}, not a normal file.")
    if info.st_nlink > 1:
        message = (
            f"{name} is a hard link ({info.st_nlink} names for one file). Hard links are not accepted, for safety: "
            "copy the file into the inbox instead."
        )
        raise rejected(name, "hard_link", message, f"st_nlink={info.st_nlink}")
    if info.st_size > max_bytes:
        raise _too_large(name, info.st_size, max_bytes)


def _too_large(name: str, size: int, limit: int) -> InputRejected:
    message = f"{name} is {size:,} bytes; the limit is {limit:,} bytes. Use a smaller file."
    return rejected(name, "too_large", message, f"{size} > {limit} bytes")


def _open_checked(path: Path, name: str, limit: int) -> tuple[int, os.stat_result]:
    try:
        before = os.lstat(path)
        _check_kind(before, name, limit)
        return os.open(path, _OPEN_FLAGS), before
    except FileNotFoundError as exc:
        raise rejected(name, "input_missing", f"{name} disappeared before it could be read.") from exc
    except PermissionError as exc:
        message = f"{name} cannot be read by the daemon (permission denied). Make it readable and drop it in again."
        raise rejected(name, "unreadable", message, exc.strerror) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link after the lstat
            raise rejected(name, "symlink", f"{name} was replaced by a link while it was being checked.") from exc
        raise rejected(name, "not_regular_file", f"{name} cannot be opened: {exc.strerror}.") from exc


def read_checked(path: Path, max_bytes: int | None, name: str) -> tuple[bytes, os.stat_result]:
    """The bytes of an input and its `fstat` taken after the last read, refusing links, hard links, non-regular
    files and anything over `max_bytes`.

    lstat, open with O_NOFOLLOW, then fstat and compare (Postfix's safe_open): what is read is what was
    checked. `name` is the user's file name, for messages.
    """
    limit = sys.maxsize if max_bytes is None else max_bytes
    fd, before = _open_checked(path, name, limit)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        after = os.fstat(handle.fileno())
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise rejected(name, "replaced", f"{name} was replaced while it was being checked.")
        _check_kind(after, name, limit)
        chunks: list[bytes] = []
        size = 0
        while chunk := handle.read(_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:  # it grew after the fstat
                raise _too_large(name, size, limit)
            chunks.append(chunk)
        return b"".join(chunks), os.fstat(handle.fileno())


def read_input(path: Path, max_bytes: int | None, name: str) -> bytes:
    """`read_checked` without the final stat."""
    return read_checked(path, max_bytes, name)[0]


def _unidentified(data: bytes, name: str) -> InputRejected:
    found = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    if found is None and data[4:12] in _HEIF_BRANDS:
        found = "HEIC/AVIF"
    if found is None:
        return rejected(name, "image_unreadable", f"{name} is not a readable PNG, JPEG or WEBP image.")
    message = f"{name} is really a {found} image; only PNG, JPEG and WEBP are accepted. Convert it and try again."
    return rejected(name, "image_format", message, found)


MAX_JPEG_SCANS = 100
"""A progressive JPEG has about 10 scans; libjpeg decodes every scan over the whole image, so thousands of tiny
repeated scans make a small file take minutes of CPU (libjpeg-turbo's own tools cap them for the same reason)."""


def _check_jpeg_scans(data: bytes, name: str) -> None:
    """Refuse a JPEG with more than `MAX_JPEG_SCANS` start-of-scan markers, before decoding. Entropy-coded data
    stuffs every 0xFF byte, so 0xFFDA only appears as a marker (or in metadata, which can only over-count)."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        message = f"{name} is a JPEG of {scans} scans (more than {MAX_JPEG_SCANS}): too costly to decode safely."
        raise rejected(name, "decompression_bomb", message, {"scans": scans, "max_scans": MAX_JPEG_SCANS})


def decode_image(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Decode PNG/JPEG/WEBP bytes fully, after checking the header's size against `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise rejected(name, "decompression_bomb", f"{name} has far too many pixels to open safely.", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, name) from exc
    except MemoryError:
        raise  # the decode's limit, not damage (`decodebox`)
    except Exception as exc:  # a hostile header can raise anything from a plugin (ValueError, struct.error...)
        raise rejected(name, "image_unreadable", f"{name} has a damaged header and cannot be read.", str(exc)) from exc
    width, height = image.size
    if width * height > max_pixels:
        message = (
            f"{name} says it is {width}x{height} pixels ({width * height:,}), more than the limit of "
            f"{max_pixels:,}. Scale it down and try again."
        )
        raise rejected(name, "decompression_bomb", message, f"{width}x{height} > {max_pixels} pixels")
    if image.format == "JPEG":
        _check_jpeg_scans(data, name)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        message = f"{name} is damaged or cut short and cannot be decoded."
        raise rejected(name, "image_unreadable", message, str(exc)) from exc
    return image


_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def upright_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """The decoded image as the model takes it: EXIF rotation applied, RGB; and False if the rotation could not
    be read (the image is then used as stored)."""
    rotated = True
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:
        rotated = False
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency must go through RGBA, or Pillow warns
    return image.convert("RGB"), rotated


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF rotation, which is what the worker will feed the model."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:
        return width, height
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)

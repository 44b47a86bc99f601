"""Checking an image + sidecar pair: safe reads, sidecar parse, the sidecar's `sha256`, the full image decode.

Used twice per pair: in place in the inbox before the claim (to learn whether the pair is complete) and on the
claimed copies after it (what is validated is what will run). The second check reuses the first one's decode when
the image's hash is the same, so a large image is decoded once.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import Image

from daemon.config import DaemonConfig
from daemon.decodebox import (
    DecodeLimits,
    DecodeUnavailable,
    decode_oriented_size,
    isolated_model_rgb,
    isolated_oriented_size,
)
from daemon.errors import JobRejected
from daemon.jobspec import JobSpec, parse_sidecar
from daemon.safeopen import (
    INPUT_PIXELS_PER_OUTPUT_PIXEL,
    decode_image,
    read_input,
    rejected,
    upright_rgb,
)

log = structlog.get_logger(__name__)


def image_pixel_limit(config: DaemonConfig) -> int:
    """The decode limit: `intake.max_image_pixels`, and never more than 64x the model's output pixel limit."""
    return min(config.intake.max_image_pixels, config.generation.max_pixels * INPUT_PIXELS_PER_OUTPUT_PIXEL)


@dataclass(frozen=True)
class Inspection:
    """What checking a pair found: the parsed sidecar, the image's sha256 and its size after EXIF rotation."""

    spec: JobSpec
    image_sha256: str
    image_size: tuple[int, int]


def _parse_spec(data: bytes, name: str) -> JobSpec:
    try:
        return parse_sidecar(data)
    except JobRejected as exc:
        raise rejected(name, exc.reason, f"The sidecar {name} is not valid: {exc.message}", exc.detail) from exc


def read_pair(image: Path, sidecar: Path, names: tuple[str, str], config: DaemonConfig) -> tuple[bytes, bytes]:
    """The (image, sidecar) bytes, each read safely under its size cap; `names` are the user's names."""
    limits = config.intake
    sidecar_data = read_input(sidecar, limits.max_sidecar_bytes, names[1])
    return read_input(image, limits.max_image_bytes, names[0]), sidecar_data


@contextlib.contextmanager
def decoding_guarded(guard_dir: Path | None, digest: str, name: str) -> Iterator[None]:
    """Leave a mark (`guard_dir/<sha256>`) while an image decodes in this process. A mark found before decoding
    means a previous process died decoding these very bytes (a decoder crash, not an exception): the image is
    refused instead of killing the daemon again at every start. The mark goes with the refusal, so the same
    bytes dropped again get one more try (a kill that was not the image's fault costs one refusal)."""
    if guard_dir is None:
        yield
        return
    mark = guard_dir / digest
    if mark.exists():
        mark.unlink(missing_ok=True)
        message = f"Decoding {name} stopped the daemon the last time it was tried; it was not decoded again."
        raise rejected(name, "decode_crashed", message, {"sha256": digest})
    mark.write_bytes(b"")  # no fsync: it has to outlive the process, not the machine
    try:
        yield
    finally:
        mark.unlink(missing_ok=True)


def inspect_data(
    image_data: bytes,
    sidecar_data: bytes,
    names: tuple[str, str],
    config: DaemonConfig,
    known: Inspection | None,
    guard_dir: Path | None = None,
) -> Inspection:
    """Parse the sidecar, check its `sha256`, decode the image fully (unless `known` already did, same hash);
    `guard_dir`: where `decoding_guarded` leaves its marks (the daemon's; None: no guard, as for the CLI)."""
    image_name, sidecar_name = names
    spec = _parse_spec(sidecar_data, sidecar_name)
    digest = hashlib.sha256(image_data).hexdigest()
    if spec.sha256 is not None and spec.sha256 != digest:
        message = (
            f"{image_name} does not match the sha256 given in {sidecar_name}: the image is incomplete or not the "
            "one the sidecar was written for."
        )
        raise rejected(image_name, "sha256_mismatch", message, {"expected": spec.sha256, "actual": digest})
    if known is not None and known.image_sha256 == digest:
        return Inspection(spec, digest, known.image_size)
    return Inspection(spec, digest, decoded_size(image_data, image_name, digest, config, guard_dir))


def decoded_size(data: bytes, name: str, digest: str, config: DaemonConfig, guard_dir: Path | None) -> tuple[int, int]:
    """Decode the image fully and return its size after EXIF rotation: in a child under limits
    (`intake.decode_in_child`, `decodebox`), or in this process under `decoding_guarded`'s mark."""
    limit = image_pixel_limit(config)
    limits = decode_isolation(config)
    if limits is not None:
        try:
            return isolated_oriented_size(data, limit, name, limits)
        except DecodeUnavailable as exc:
            log.warning("decode_child_unavailable", error=str(exc))  # then in process, under the crash mark
    with decoding_guarded(guard_dir, digest, name):
        try:
            return decode_oriented_size(data, limit, name)
        except MemoryError as exc:
            message = f"Decoding {name} ran out of memory; it was not accepted."
            raise rejected(name, "decode_too_costly", message, {"limit": "memory"}) from exc


def inspect_inputs(
    image: Path,
    sidecar: Path,
    names: tuple[str, str],
    config: DaemonConfig,
    known: Inspection | None = None,
    guard_dir: Path | None = None,
) -> Inspection:
    """Safely read both files, parse the sidecar, check the sidecar's `sha256`, decode the image fully.

    When `known` holds the same image hash (the copy checked in the inbox before the claim), the decode is not
    repeated.
    """
    image_data, sidecar_data = read_pair(image, sidecar, names, config)
    return inspect_data(image_data, sidecar_data, names, config, known, guard_dir)


def load_image_rgb(
    path: Path,
    max_pixels: int,
    max_bytes: int | None = None,
    expected_sha256: str | None = None,
    name: str | None = None,
    isolation: DecodeLimits | None = None,
) -> Image.Image:
    """Load a validated image for the model: same safety checks, EXIF rotation applied, RGB.

    `expected_sha256`: the bytes intake validated. The claimed copy is still the dropper's file (its inode), so
    it can be rewritten after validation; a changed image is rejected instead of run under the old checksum.
    `name`: the file's name in messages (the claimed copy's own name is the daemon's). `isolation`: decode in a
    child under these limits (`decodebox`), as intake did; None: in this process."""
    name = name or path.name
    data = read_input(path, max_bytes, name)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        message = f"{name} changed after it was accepted; drop the pair again to run the new image."
        raise rejected(name, "input_changed", message, {"expected_sha256": expected_sha256})
    decoded: tuple[Image.Image, bool] | None = None
    if isolation is not None:
        try:
            decoded = isolated_model_rgb(data, max_pixels, name, isolation)
        except DecodeUnavailable as exc:
            log.warning("decode_child_unavailable", error=str(exc))
    image, rotated = decoded or upright_rgb(decode_image(data, max_pixels, name))
    if not rotated:
        log.warning("exif_transpose_failed", path=str(path))
    return image


def decode_isolation(config: DaemonConfig) -> DecodeLimits | None:
    """The limits of the decode child (`intake.decode_in_child`), or None to decode in the daemon's process."""
    settings = config.intake
    if not settings.decode_in_child:
        return None
    return DecodeLimits.for_image(image_pixel_limit(config), settings.max_image_bytes, settings.decode_cpu_seconds)

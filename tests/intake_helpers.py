"""Shared by the intake reliability tests (events, completeness, hostile input): a fake clock, image builders and
an `Intake` harness on a real store in `tmp_path`. Not a test module itself."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from daemon.config import DaemonConfig, GenerationConfig, IntakeConfig
from daemon.intake import Intake, IntakeResult
from daemon.store import JobStore

SIDECAR = b"prompt: a cat surfing\nseed: 42\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG", mode: str = "RGB", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=0).save(buffer, fmt, **save)
    return buffer.getvalue()


def noise_image(size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    """Incompressible content, so a cut-short copy really lacks data."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims `width`x`height`: a decompression bomb costs nothing to build."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


class Harness:
    """An `Intake` with a fake clock over a real inbox and store."""

    def __init__(self, inbox: Path, generation: GenerationConfig | None = None, **intake: Any) -> None:
        inbox.mkdir(parents=True, exist_ok=True)
        self.inbox = inbox
        self.clock = FakeClock()
        settings = {"stable_seconds": 2.0, "incomplete_grace_seconds": 10.0, **intake}
        self.config = DaemonConfig(
            inbox=inbox,
            outbox=inbox.parent / "outbox",
            intake=IntakeConfig(**settings),
            generation=generation or GenerationConfig(),
        )
        self.store = JobStore(inbox, self.config.state_path)
        self.intake = Intake(self.config, self.store, clock=self.clock)

    @property
    def stable(self) -> float:
        return self.config.intake.stable_seconds

    @property
    def grace(self) -> float:
        return self.config.intake.incomplete_grace_seconds

    def drop(self, name: str | bytes, data: bytes) -> Path:
        path = self.inbox / os.fsdecode(name)
        path.write_bytes(data)
        return path

    def drop_pair(self, stem: str = "cat", image: bytes | None = None, sidecar: bytes = SIDECAR) -> None:
        self.drop(f"{stem}.png", image if image is not None else image_bytes())
        self.drop(f"{stem}.yaml", sidecar)

    def poll(self, advance: float = 0.0) -> IntakeResult:
        self.clock.advance(advance)
        return self.intake.poll()

    def settle(self) -> IntakeResult:
        """Polls until nothing is settling any more (window, then grace), merging what was accepted/rejected."""
        result = self.poll()
        for step in (self.stable, self.grace, self.grace):
            if not result.settling and (result.accepted or result.rejected):
                break
            later = self.poll(step)
            result = replace(
                later, accepted=result.accepted + later.accepted, rejected=result.rejected + later.rejected
            )
        return result

    def failed(self, name: str) -> Path:
        return self.inbox / "failed" / name

    def reason(self, name: str) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.failed(name) / "reason.json").read_text())
        return record


def reasons(result: IntakeResult) -> list[tuple[str, str]]:
    return sorted((stem, error.reason) for stem, error, _ in result.rejected)

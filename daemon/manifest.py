"""The per-job manifest: what was asked, what was used, by which model and code, how long it took, what came out.

Versioned by `schema` so downstream scripts can refuse a format they do not know: additions (new keys) keep the
version, removals or changes of meaning bump it. The JSON Schema shipped as `daemon/schemas/manifest.schema.json`
describes it and the tests validate every manifest they produce against it. Built from frozen inputs only; writing
it (last, atomically) is the publisher's job.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

from daemon import __version__

MANIFEST_SCHEMA = "i2vd.manifest/1"


@dataclass(frozen=True)
class OutputRecord:
    """One published file as read back from disk."""

    name: str
    role: str
    """`main` for the MP4, else the variant preset's name."""
    sha256: str
    bytes: int
    codec: str
    width: int
    height: int
    frames: int
    fps: float
    duration_seconds: float


@dataclass(frozen=True)
class ManifestInputs:
    job_id: str
    image_name: str
    sidecar_name: str
    image_sha256: str
    received_at: datetime
    asked: Mapping[str, Any]
    used: Mapping[str, Any]
    model: Mapping[str, Any]
    library_versions: Mapping[str, str]
    timings: Mapping[str, float]
    peak_vram_bytes: int
    attempts: int
    finished_at: datetime
    sanity: Mapping[str, Any] = field(default_factory=dict)
    """`{check: {result, value, threshold, message}}` from daemon/sanity.py."""
    degradations: Sequence[str] = ()
    """Out-of-memory degrade steps taken, in order (`used` already holds the values they changed)."""


def build_manifest(inputs: ManifestInputs, outputs: Sequence[OutputRecord]) -> dict[str, Any]:
    """The JSON-ready manifest; keys are part of the outbox contract documented in the README."""
    return {
        "schema": MANIFEST_SCHEMA,
        "job_id": inputs.job_id,
        "input": {
            "image": inputs.image_name,
            "sidecar": inputs.sidecar_name,
            "image_sha256": inputs.image_sha256,
            "received_at": inputs.received_at.isoformat(),
        },
        "asked": dict(inputs.asked),
        "used": dict(inputs.used),
        "seed": inputs.used.get("seed"),
        "model": dict(inputs.model),
        "versions": {"i2vd": __version__, "python": platform.python_version(), **inputs.library_versions},
        "timings_seconds": {stage: round(seconds, 4) for stage, seconds in inputs.timings.items()},
        "peak_vram_bytes": inputs.peak_vram_bytes,
        "attempts": inputs.attempts,
        "degradations": list(inputs.degradations),
        "finished_at": inputs.finished_at.isoformat(),
        "sanity": {check: dict(result) for check, result in inputs.sanity.items()},
        "outputs": [output.__dict__ for output in outputs],
    }


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of `MANIFEST_SCHEMA`, shipped in the package (`daemon/schemas/manifest.schema.json`)."""
    text = resources.files("daemon").joinpath("schemas/manifest.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema

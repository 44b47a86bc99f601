"""Finishing a generated job: ffmpeg variants, their verification, the manifest, publication and input archival.

This is the CPU half of a job. The worker runs it on a small thread pool so the generator starts the next job
while ffmpeg works on this one (DESIGN.md §1: the GPU never waits for ffmpeg). Everything here is per job and
touches only the job's own staging directory, claimed directory and outputs, so several jobs can finish at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from daemon.config import DaemonConfig
from daemon.encode import Encoder, MediaInfo
from daemon.generate.base import ModelInfo
from daemon.jobspec import ResolvedJob, parse_sidecar
from daemon.manifest import ManifestInputs, OutputRecord, build_manifest
from daemon.publish import Publisher, sha256_file
from daemon.store import ClaimedJob, JobStore


@dataclass(frozen=True)
class StagedOutput:
    """A verified file in the job's staging directory, waiting to be published as `<base><suffix>`."""

    path: Path
    suffix: str
    role: str
    info: MediaInfo


@dataclass
class GeneratedJob:
    """What the GPU half hands to the CPU half: no frames, only the main MP4 on disk and what the manifest needs."""

    job: ClaimedJob
    resolved: ResolvedJob
    main: StagedOutput
    timings: dict[str, float]
    generate_timings: Mapping[str, float] = field(default_factory=dict)
    running: Mapping[str, float] = field(default_factory=dict)
    """Stages still running, by their `time.perf_counter` start (StageTimer.running): `publish` when the
    manifest is made; the manifest gives it its time so far."""
    peak_vram_bytes: int = 0
    sanity: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    degradations: tuple[str, ...] = ()
    """Out-of-memory degrade steps the generator took (GenerationResult.degradations), for the manifest."""
    published: list[Path] = field(default_factory=list)
    """Set by `Finisher.publish`: what `archive_inputs` records in the completed-input ledger."""


class Finisher:
    """Makes the variants of a generated job, publishes the set with its manifest, archives the inputs."""

    def __init__(
        self, config: DaemonConfig, encoder: Encoder, publisher: Publisher, store: JobStore, model: ModelInfo
    ) -> None:
        self._config = config
        self._encoder = encoder
        self._publisher = publisher
        self._store = store
        self._model = model

    def make_variants(self, generated: GeneratedJob) -> list[StagedOutput]:
        """Every variant the job asked for, made from the main MP4 and verified, in the job's order."""
        made = []
        main = generated.main
        for name in generated.resolved.variants:
            spec = self._config.encode.variants[name]
            destination = main.path.parent / f"{name}.{spec.ext}"
            info = self._encoder.make_variant(name, spec, main.path, main.info, destination)
            made.append(StagedOutput(destination, f".{name}.{spec.ext}", name, info))
        return made

    def publish(self, generated: GeneratedJob, staged: list[StagedOutput]) -> list[Path]:
        """Publish the staged files and the manifest (last); return the published paths, manifest last."""
        records = [(item, sha256_file(item.path), item.path.stat().st_size) for item in staged]
        inputs = self._manifest_inputs(generated)

        def manifest_for(base: str) -> dict[str, object]:
            """The publisher picks the final base name (a clash moves the whole set to `-2`), then asks for this
            before the first output gets its name: the job's state notes the names first, so a crash after any
            rename leaves recovery a record of what to take back or to finish."""
            names = [f"{base}{item.suffix}" for item in staged]
            digests = [digest for _, digest, _ in records]
            self._store.mark_publishing(generated.job, directory, base, names, digests, self._archive)
            outputs = [
                OutputRecord(
                    name=f"{base}{item.suffix}",
                    role=item.role,
                    sha256=digest,
                    bytes=size,
                    codec=item.info.codec,
                    width=item.info.width,
                    height=item.info.height,
                    frames=item.info.frames,
                    fps=item.info.fps,
                    duration_seconds=item.info.duration_seconds,
                )
                for item, digest, size in records
            ]
            return build_manifest(inputs, outputs)

        directory, base = self._publisher.reserve(generated.resolved.output_name)
        files = [(item.path, item.suffix) for item in staged]
        generated.published = self._publisher.publish(base, files, manifest_for, directory)
        return generated.published

    @property
    def _archive(self) -> bool:
        return self._config.publish.processed_inputs == "archive"

    def archive_inputs(self, generated: GeneratedJob) -> None:
        """Only after the outputs are durable: record them in the completed-input ledger, then move (or delete)
        the claimed inputs. Inputs that cannot be moved (read-only share) are logged and counted by the store,
        never raised: the outputs are published, so a retry would only publish them twice."""
        self._store.complete(generated.job, archive=self._archive, outputs=generated.published)

    def _manifest_inputs(self, generated: GeneratedJob) -> ManifestInputs:
        job, resolved, model = generated.job, generated.resolved, self._model
        asked = parse_sidecar(job.sidecar_path.read_bytes()).model_dump(mode="json", exclude_unset=True)
        return ManifestInputs(
            job_id=job.job_id,
            image_name=job.image_name,
            sidecar_name=job.sidecar_name,
            image_sha256=job.image_sha256 or sha256_file(job.image_path),
            received_at=job.received_at,
            asked=asked,
            used=resolved.model_dump(mode="json"),
            model={"id": model.model_id, "revision": model.revision, "device": model.device, "dtype": model.dtype},
            library_versions=dict(model.library_versions),
            timings={
                **generated.timings,
                **{stage: time.perf_counter() - started for stage, started in generated.running.items()},
                **{f"generate.{k}": v for k, v in generated.generate_timings.items()},
            },
            peak_vram_bytes=generated.peak_vram_bytes,
            attempts=job.attempts,
            finished_at=datetime.now().astimezone(),
            sanity=generated.sanity,
            degradations=generated.degradations,
        )

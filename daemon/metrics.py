"""Prometheus metrics on an own registry, served with `/healthz` on loopback by default.

Conventions (Prometheus naming docs): prefix `i2vd_`, base units (seconds, bytes), `_total` counters, no unbounded
labels (never a file name or a job id), every label value initialised to 0 so `rate()` works from the first scrape.
Counters satisfy `received = succeeded + failed + in_progress + pending`, where `failed` is every terminal failure:
outcomes `failed`, `rejected`, `cancelled` and `poison` (a job that killed the daemon `max_attempts` times, found at
recovery); `duplicate` (a re-dropped identical pair skipped by the ledger) is terminal too. `retried`, `interrupted`
and `degraded` are not terminal (a retried or interrupted job is pending again; a degraded job also counts as
`succeeded` or `failed`), so they stay out of it.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

OUTCOMES = (
    "succeeded",
    "failed",
    "rejected",
    "cancelled",
    "poison",
    "duplicate",
    "retried",
    "interrupted",
    "degraded",
)
TERMINAL_OUTCOMES = ("succeeded", "failed", "rejected", "cancelled", "poison", "duplicate")
"""Outcomes that end a job: `received = sum(jobs_total{outcome in TERMINAL_OUTCOMES}) + in_progress + pending`."""
DEGRADE_RUNGS = ("decode_chunk", "vae_tiling", "vae_slicing", "cpu_offload", "num_frames", "tier")
"""The out-of-memory ladder's rungs: the bounded `rung` label of `i2vd_degrade_steps_total` (plus `other`)."""
COMPONENTS = ("watcher", "intake", "worker", "model")
STAGES = ("validate", "queue_wait", "load_image", "generate", "encode", "variants", "publish")
# 0.1 s .. 1 h: a tiny CPU job takes well under a second, a 1024p GPU job can take many minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
IDLE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MEMORY_KINDS = ("allocated", "reserved", "total", "free")
SANITY_CHECKS = ("nonfinite", "frame_count", "black", "white", "frozen")
SANITY_RESULTS = ("pass", "warn", "fail")

MemorySource = Callable[[], Mapping[str, int]]
HealthSource = Callable[[], Mapping[str, bool]]


class _GpuMemoryCollector(Collector):
    """Reads device memory at scrape time, so the gauge is never stale between jobs (one series per device)."""

    def __init__(self, sources: Callable[[], Mapping[str, MemorySource]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "i2vd_gpu_memory_bytes", "Device memory by kind (0 on CPU)", labels=["device", "kind"]
        )
        sources = dict(self._sources()) or {"cpu": dict}
        for device, reader in sorted(sources.items()):
            stats: Mapping[str, int] = reader()
            for kind in MEMORY_KINDS:
                family.add_metric([device, kind], float(stats.get(kind, 0)))
        yield family


class WorkerState(Protocol):
    """What the per-worker gauges read (a `Worker` plus its generator's restart count)."""

    @property
    def name(self) -> str: ...
    @property
    def device(self) -> str: ...
    def up(self) -> bool: ...
    def busy(self) -> bool: ...
    def restarts(self) -> int: ...


class _WorkerCollector(Collector):
    """`i2vd_worker_{up,busy,restarts}` per worker; labels are bounded by the number of devices times
    `executor.workers_per_device` (or `executor.ray.workers`)."""

    def __init__(self, source: Callable[[], Sequence[WorkerState]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["worker", "device"]
        up = GaugeMetricFamily("i2vd_worker_up", "1 while the worker thread and its generator run", labels=labels)
        busy = GaugeMetricFamily("i2vd_worker_busy", "1 while the worker generates or finishes a job", labels=labels)
        restarts = CounterMetricFamily(
            "i2vd_worker_restarts", "Generation processes restarted (crash, timeout)", labels=labels
        )
        for worker in self._source():
            key = [worker.name, worker.device]
            up.add_metric(key, 1.0 if worker.up() else 0.0)
            busy.add_metric(key, 1.0 if worker.busy() else 0.0)
            restarts.add_metric(key, float(worker.restarts()))
        yield up
        yield busy
        yield restarts


class _ComponentCollector(Collector):
    """`i2vd_component_up{component}`: what /healthz says, per part, so dashboards and alerts see the same truth."""

    def __init__(self, source: Callable[[], HealthSource | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "i2vd_component_up", "1 while this part of the daemon is healthy", labels=["component"]
        )
        reader = self._source()
        parts: Mapping[str, bool] = reader() if reader is not None else {}
        for component in COMPONENTS:
            family.add_metric([component], 1.0 if parts.get(component, False) else 0.0)
        yield family


class DaemonMetrics:
    """Every metric the daemon exports. One instance per process, passed to the stages that update it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.jobs = Counter("i2vd_jobs", "Jobs by outcome", ["outcome"], registry=registry)
        self.received = Counter("i2vd_jobs_received", "Pairs taken from the inbox", registry=registry)
        self.in_progress = Gauge("i2vd_jobs_in_progress", "Jobs being generated or finished now", registry=registry)
        self.pending = Gauge("i2vd_jobs_pending", "Claimed jobs waiting in the queue", registry=registry)
        self.queue_depth = Gauge("i2vd_queue_depth", "Jobs waiting in the queue", registry=registry)
        self.oldest_pending_age = Gauge(
            "i2vd_oldest_pending_age_seconds", "Age of the oldest job waiting in the queue", registry=registry
        )
        self.job_duration = Histogram(
            "i2vd_job_duration_seconds", "Claim to publish", buckets=DURATION_BUCKETS, registry=registry
        )
        self.stage_duration = Histogram(
            "i2vd_stage_duration_seconds",
            "Time per stage",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.denoise_step = Histogram(
            "i2vd_denoise_step_seconds",
            "One denoising step (with CFG)",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.generator_idle = Histogram(
            "i2vd_generator_idle_seconds",
            "From the end of a worker's generation to the start of its next one while a job was already waiting: "
            "the generator idle for the daemon's own work (loading, checks, finishing room, batch wait)",
            ["worker"],
            buckets=IDLE_BUCKETS,
            registry=registry,
        )
        self.frames_generated = Counter("i2vd_frames_generated", "Frames generated", registry=registry)
        self.video_seconds_generated = Counter(
            "i2vd_video_seconds_generated", "Seconds of video generated (at encode fps)", registry=registry
        )
        self.job_peak_gpu_memory = Gauge(
            "i2vd_job_peak_gpu_memory_bytes", "Peak device memory of the last job", registry=registry
        )
        self.oom = Counter("i2vd_oom", "Out-of-memory errors", registry=registry)
        self.sanity_checks = Counter(
            "i2vd_sanity_checks", "Sanity checks on generated frames by result", ["check", "result"], registry=registry
        )
        for check in SANITY_CHECKS:
            for result in SANITY_RESULTS:
                self.sanity_checks.labels(check=check, result=result)
        self.storage_full = Gauge(
            "i2vd_storage_full", "1 while outputs cannot be written for lack of space (jobs wait)", registry=registry
        )
        self.inputs_not_removed = Gauge(
            "i2vd_inputs_not_removed",
            "Published jobs whose inputs could not be moved out of the inbox (read-only share); the ledger keeps "
            "them from running again",
            registry=registry,
        )
        self.degrade_steps = Counter(
            "i2vd_degrade_steps",
            "Out-of-memory degrade ladder steps taken, by rung (decode_chunk, vae_tiling, cpu_offload, ...)",
            ["rung"],
            registry=registry,
        )
        self.degraded_jobs = Counter("i2vd_degraded_jobs", "Jobs run with degraded settings", registry=registry)
        self.model_load_seconds = Gauge("i2vd_model_load_seconds", "Time to load the model", registry=registry)
        self.model_loaded = Gauge("i2vd_model_loaded", "1 while the model is loaded", registry=registry)
        self.watcher_up = Gauge("i2vd_watcher_up", "1 while the inbox watcher runs", registry=registry)
        self.watcher_mode = Gauge(
            "i2vd_watcher_mode", "Watcher implementation in use (1 = active)", ["mode"], registry=registry
        )
        self.last_success = Gauge(
            "i2vd_last_success_timestamp_seconds", "Unix time of the last published job", registry=registry
        )
        self.build_info = Info("i2vd_build", "Versions and model", registry=registry)
        self.queue_paused = Gauge("i2vd_queue_paused", "1 while `i2vd pause` holds the queue", registry=registry)
        self._memory_sources: dict[str, MemorySource] = {}
        self._health_source: HealthSource | None = None
        self._workers: Callable[[], Sequence[WorkerState]] = list
        self.worker_jobs = Counter(
            "i2vd_worker_jobs", "Jobs by worker and outcome", ["worker", "outcome"], registry=registry
        )
        registry.register(_GpuMemoryCollector(lambda: self._memory_sources))
        registry.register(_WorkerCollector(lambda: self._workers()))
        registry.register(_ComponentCollector(lambda: self._health_source))
        for outcome in OUTCOMES:
            self.jobs.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for rung in (*DEGRADE_RUNGS, "other"):
            self.degrade_steps.labels(rung=rung)
        for mode in ("inotify", "polling"):
            self.watcher_mode.labels(mode=mode).set(0)

    def watch_device_memory(self, device: str, source: MemorySource) -> None:
        """Export `source()` as `i2vd_gpu_memory_bytes{device=...}` at every scrape (one source per device)."""
        self._memory_sources[device] = source

    def watch_workers(self, source: Callable[[], Sequence[WorkerState]], outcomes: Sequence[str] = ()) -> None:
        """Export the per-worker gauges from `source()`; start `worker_jobs_total` at 0 for every outcome."""
        self._workers = source
        for worker in source():
            for outcome in outcomes or OUTCOMES:
                self.worker_jobs.labels(worker=worker.name, outcome=outcome)

    def watch_health(self, source: HealthSource) -> None:
        """Export `source()` (the /healthz parts) as `i2vd_component_up{component=...}` at every scrape."""
        self._health_source = source

    def set_watcher_mode(self, mode: str) -> None:
        for known in ("inotify", "polling"):
            self.watcher_mode.labels(mode=known).set(1 if known == mode else 0)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every 15 s would flood the journal; access logs are not useful here."""


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """Serves `/metrics` (Prometheus text format) and `/healthz` (200 or 503 with a JSON body naming each part)."""

    def __init__(self, metrics: DaemonMetrics, health: HealthSource, host: str, port: int) -> None:
        metrics_app = make_wsgi_app(metrics.registry)
        self._health = health

        def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                parts = dict(self._health())
                healthy = all(parts.values())
                body = json.dumps({"healthy": healthy, "parts": parts}).encode()
                status = "200 OK" if healthy else "503 Service Unavailable"
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            result: list[bytes] = metrics_app(environ, start_response)
            return result

        self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="i2vd-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
